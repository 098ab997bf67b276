//! A [`NetBackend`] on one end of a `SOCK_SEQPACKET` socketpair, for unit tests of the device: the test
//! holds the other end and sees every frame (vnet header included) as one datagram.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use crate::{NetBackend, RecvBuf, SendBuf};

/// The device's end of the pair. Records the offloads it was asked for, as a tap would apply them.
#[derive(Debug)]
pub struct SocketpairBackend {
    fd: OwnedFd,
    /// The TUN_F_* flags this backend accepts (the rest are refused, as a kernel without them would).
    pub accepted_offloads: u32,
    /// The flags set by the last `set_offloads`.
    pub offloads: u32,
    /// What `set_queue_enabled` was last told.
    pub enabled: bool,
}

impl SocketpairBackend {
    /// A backend and the test's end of the pair; both non-blocking.
    pub fn pair(accepted_offloads: u32) -> io::Result<(Self, UnixDatagram)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two fds into the two-element array it is given.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by socketpair and are owned by nobody else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let backend = SocketpairBackend {
            fd: ours,
            accepted_offloads,
            offloads: 0,
            enabled: true,
        };
        Ok((backend, UnixDatagram::from(theirs)))
    }
}

impl NetBackend for SocketpairBackend {
    type Error = io::Error;

    fn read_frame(&mut self, bufs: &[RecvBuf<'_>]) -> io::Result<Option<usize>> {
        crate::iov::readv(&self.fd, bufs)
    }

    fn write_frame(&mut self, bufs: &[SendBuf<'_>]) -> io::Result<Option<usize>> {
        crate::iov::writev(&self.fd, bufs)
    }

    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<u32> {
        self.offloads = tun_flags & self.accepted_offloads;
        Ok(self.offloads)
    }

    fn set_queue_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.enabled = enabled;
        Ok(())
    }
}

impl AsRawFd for SocketpairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_UFO};

    #[test]
    fn frames_keep_their_boundaries_both_ways_and_eagain_is_none() {
        let (mut backend, peer) =
            SocketpairBackend::pair(TUN_F_CSUM | TUN_F_TSO4).expect("socketpair");
        let mut a = [0u8; 4];
        let mut b = [0u8; 64];
        assert_eq!(
            backend
                .read_frame(&[RecvBuf::new(&mut a), RecvBuf::new(&mut b)])
                .expect("read"),
            None
        );
        peer.send(b"0123456789").expect("send");
        peer.send(b"xy").expect("send");
        let n = backend
            .read_frame(&[RecvBuf::new(&mut a), RecvBuf::new(&mut b)])
            .expect("read");
        assert_eq!(n, Some(10));
        assert_eq!(&a, b"0123");
        assert_eq!(&b[..6], b"456789");
        let n = backend.read_frame(&[RecvBuf::new(&mut b)]).expect("read");
        assert_eq!(n, Some(2));

        let sent = backend
            .write_frame(&[SendBuf::new(b"head"), SendBuf::new(b"-body")])
            .expect("write");
        assert_eq!(sent, Some(9));
        let mut got = [0u8; 32];
        let n = peer.recv(&mut got).expect("recv");
        assert_eq!(&got[..n], b"head-body");

        assert_eq!(
            backend
                .set_offloads(TUN_F_CSUM | TUN_F_UFO)
                .expect("offloads"),
            TUN_F_CSUM
        );
    }
}
