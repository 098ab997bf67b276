//! Frame buffers as raw iovecs, and `readv`/`writev` on them with EAGAIN turned into `Ok(None)` and
//! EINTR retried.
//!
//! The buffers are address and length, never a Rust reference: a guest's buffers live in memory the
//! guest may change at any moment and may overlap each other, which `&mut [u8]` slices could not
//! soundly describe. A buffer made from a slice borrows it; one made from a raw pointer (guest
//! memory) carries its maker's promise that the memory stays mapped while it is used.

use std::io;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

/// A buffer a frame is gathered from (`write_frame`).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct SendBuf<'a> {
    iov: libc::iovec,
    _memory: PhantomData<&'a [u8]>,
}

/// A buffer a frame is scattered into (`read_frame`).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct RecvBuf<'a> {
    iov: libc::iovec,
    _memory: PhantomData<&'a mut [u8]>,
}

// SAFETY: a buffer is an address and a length; moving it to another thread accesses nothing, and
// the memory it names is only ever touched by the kernel inside readv/writev.
unsafe impl Send for SendBuf<'_> {}
// SAFETY: as for SendBuf.
unsafe impl Send for RecvBuf<'_> {}

impl<'a> SendBuf<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: bytes.as_ptr().cast_mut().cast(),
                iov_len: bytes.len(),
            },
            _memory: PhantomData,
        }
    }

    /// A buffer of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped and readable for `'a`. Others may write it meanwhile
    /// (a guest does): the kernel then sends whatever it reads.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            },
            _memory: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> RecvBuf<'a> {
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: bytes.as_mut_ptr().cast(),
                iov_len: bytes.len(),
            },
            _memory: PhantomData,
        }
    }

    /// A buffer of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped and writable for `'a`, and no Rust reference may
    /// point into it meanwhile (guest memory, reached only through raw pointers, qualifies).
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _memory: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for SendBuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendBuf({:p}, {})", self.iov.iov_base, self.iov.iov_len)
    }
}

impl std::fmt::Debug for RecvBuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvBuf({:p}, {})", self.iov.iov_base, self.iov.iov_len)
    }
}

fn outcome(ret: isize) -> Option<io::Result<Option<usize>>> {
    if let Ok(n) = usize::try_from(ret) {
        return Some(Ok(Some(n)));
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::Interrupted => None,
        io::ErrorKind::WouldBlock => Some(Ok(None)),
        _ => Some(Err(err)),
    }
}

/// How many of `n` buffers one call takes: the kernel refuses more than UIO_MAXIOV with EINVAL.
fn count(n: usize) -> libc::c_int {
    libc::c_int::try_from(n.min(1024)).unwrap_or(1024)
}

/// Reads one datagram or frame from `fd` into `bufs`.
pub(crate) fn readv(fd: impl AsFd, bufs: &[RecvBuf<'_>]) -> io::Result<Option<usize>> {
    let fd = fd.as_fd().as_raw_fd();
    loop {
        // SAFETY: RecvBuf is a transparent `struct iovec`; each names memory writable for its
        // length for its lifetime, which covers this call (its constructors' contract), and
        // `count` does not exceed the slice's length.
        let ret = unsafe { libc::readv(fd, bufs.as_ptr().cast(), count(bufs.len())) };
        if let Some(r) = outcome(ret) {
            return r;
        }
    }
}

/// Writes one datagram or frame gathered from `bufs` to `fd`.
pub(crate) fn writev(fd: impl AsFd, bufs: &[SendBuf<'_>]) -> io::Result<Option<usize>> {
    let fd = fd.as_fd().as_raw_fd();
    loop {
        // SAFETY: SendBuf is a transparent `struct iovec`; each names memory readable for its
        // length for its lifetime, which covers this call, and `count` does not exceed the
        // slice's length.
        let ret = unsafe { libc::writev(fd, bufs.as_ptr().cast(), count(bufs.len())) };
        if let Some(r) = outcome(ret) {
            return r;
        }
    }
}
/// Whether `fd` takes a write now. Polling a tap queue also arms its write-space wakeup: the kernel
/// only signals EPOLLOUT for a full tap queue after a poll found it full (tap_poll sets
/// SOCKWQ_ASYNC_NOSPACE), and an edge-triggered epoll never polls on its own.
pub(crate) fn poll_writable(fd: impl AsFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, zero timeout.
        let ret = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ret >= 0 {
            return Ok(pfd.revents & libc::POLLOUT != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
