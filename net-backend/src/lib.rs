//! The host side of Tapir's NIC: macvtap (found by name or created through rtnetlink), plain tap and
//! ready file descriptors, the vnet header size and offloads, and frame I/O on the caller's buffers.
//!
//! The virtio-net device in `tapir-devices` sees a queue only through [`NetBackend`]; this crate knows
//! nothing of guests, queues of descriptors or KVM.

pub mod iov;
pub mod mac;
pub mod netlink;
pub mod nic;
pub mod offload;
pub mod socketpair;
pub mod tap;
pub mod vnet;

use std::os::fd::AsRawFd;

pub use iov::{RecvBuf, SendBuf};
pub use mac::MacAddr;
pub use netlink::MacvtapMode;
pub use nic::{
    Nic, NicError, NicSpec, OpenOptions, VhostMode, DEFAULT_COALESCE_US, MAX_COALESCE_US,
};
pub use tap::TapQueue;
pub use vnet::{VnetHdr, VNET_HDR_LEN};

/// One queue pair's host side, as the virtio-net device uses it. Every frame starts with a 12-byte
/// little-endian `virtio_net_hdr_v1`.
///
/// `Ok(None)` from the I/O methods means the operation would block (EAGAIN): a normal result that asks
/// the caller to wait for the fd (readable for reads, writable for writes), never an error.
pub trait NetBackend: AsRawFd + Send {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads one frame, vnet header included, scattered over `bufs`. Returns its length.
    fn read_frame(&mut self, bufs: &[RecvBuf<'_>]) -> Result<Option<usize>, Self::Error>;

    /// Writes one frame, vnet header included, gathered from `bufs`. Returns the bytes taken.
    fn write_frame(&mut self, bufs: &[SendBuf<'_>]) -> Result<Option<usize>, Self::Error>;

    /// Lets the host hand the guest frames with these TUN_F_* offloads (see [`offload`]); returns the
    /// flags actually set, which may lack some that the host refused.
    fn set_offloads(&mut self, tun_flags: u32) -> Result<u32, Self::Error>;

    /// With several queues on one NIC: whether the host hands this queue frames at all (a queue the
    /// guest does not use must not be given flows it will never read).
    fn set_queue_enabled(&mut self, enabled: bool) -> Result<(), Self::Error>;
}
