//! `readv`/`writev` on the caller's buffers, with EAGAIN turned into `Ok(None)` and EINTR retried.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

fn outcome(ret: isize) -> Option<io::Result<Option<usize>>> {
    if ret >= 0 {
        return Some(Ok(Some(ret as usize)));
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::Interrupted => None,
        io::ErrorKind::WouldBlock => Some(Ok(None)),
        _ => Some(Err(err)),
    }
}

/// Reads one datagram or frame from `fd` into `bufs`.
pub(crate) fn readv(fd: impl AsFd, bufs: &mut [IoSliceMut<'_>]) -> io::Result<Option<usize>> {
    let fd = fd.as_fd().as_raw_fd();
    let count = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    loop {
        // SAFETY: IoSliceMut is ABI-compatible with `struct iovec`; each borrows memory writable for its
        // length for the whole call, and `count` does not exceed the slice's length.
        let ret = unsafe { libc::readv(fd, bufs.as_ptr().cast(), count) };
        if let Some(r) = outcome(ret) {
            return r;
        }
    }
}

/// Writes one datagram or frame gathered from `bufs` to `fd`.
pub(crate) fn writev(fd: impl AsFd, bufs: &[IoSlice<'_>]) -> io::Result<Option<usize>> {
    let fd = fd.as_fd().as_raw_fd();
    let count = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    loop {
        // SAFETY: IoSlice is ABI-compatible with `struct iovec`; each borrows memory readable for its
        // length for the whole call, and `count` does not exceed the slice's length.
        let ret = unsafe { libc::writev(fd, bufs.as_ptr().cast(), count) };
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
