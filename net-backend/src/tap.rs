//! One queue of a tap-like device (macvtap or tap) opened with IFF_VNET_HDR: the ioctls Tapir needs and
//! frame I/O with `readv`/`writev` straight on the caller's buffers. This file and `netlink.rs` are where
//! the backend's syscalls live.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use crate::offload::{TUN_F_ALL, TUN_F_UFO};
use crate::vnet::VNET_HDR_LEN;
use crate::{NetBackend, RecvBuf, SendBuf};

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, libc::c_uint);
ioctl_ior_nr!(TUNGETVNETHDRSZ, TUNTAP, 215, libc::c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);
ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, libc::c_int);

pub const IFF_TAP: u16 = 0x0002;
pub const IFF_MULTI_QUEUE: u16 = 0x0100;
pub const IFF_ATTACH_QUEUE: u16 = 0x0200;
pub const IFF_DETACH_QUEUE: u16 = 0x0400;
pub const IFF_NO_PI: u16 = 0x1000;
pub const IFF_VNET_HDR: u16 = 0x4000;

/// Errors of one tap queue's set-up and I/O.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening {path} ({what})")]
    Open {
        path: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETIFF {name} with flags {flags:#x} on /dev/net/tun")]
    SetIff {
        name: String,
        flags: u16,
        #[source]
        source: io::Error,
    },
    #[error("TUNGETIFF on fd {fd}: it is not a tap or macvtap file descriptor")]
    GetIff {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is {iface}, which was opened without IFF_TAP|IFF_VNET_HDR (flags {flags:#x}): Tapir needs a tap with vnet headers")]
    WrongFdFlags {
        fd: RawFd,
        iface: String,
        flags: u16,
    },
    #[error("setting O_NONBLOCK on {iface}")]
    NonBlock {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETVNETHDRSZ {len} on {iface}")]
    SetVnetHdrSize {
        iface: String,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETOFFLOAD {flags:#x} on {iface}")]
    SetOffload {
        iface: String,
        flags: u32,
        #[source]
        source: io::Error,
    },
    #[error("reading a frame from {iface}")]
    Read {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{} a queue of {iface} (TUNSETQUEUE)", if *attach { "attaching" } else { "detaching" })]
    SetQueue {
        iface: String,
        attach: bool,
        #[source]
        source: io::Error,
    },
    #[error("writing a frame to {iface}")]
    Write {
        iface: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: a name and the flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// One queue of a macvtap or tap: a non-blocking fd with 12-byte vnet headers.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
    iface: String,
    /// Whether the kernel steers frames to this queue (TUNSETQUEUE); a queue is attached when opened.
    attached: bool,
}

impl TapQueue {
    /// Opens a device node (`/dev/tapN` of a macvtap) for one queue.
    pub fn open_node(path: &Path, iface: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| TapError::Open {
                path: path.display().to_string(),
                what: format!("a queue of macvtap {iface}"),
                source,
            })?;
        Self::configure(file, iface)
    }

    /// Attaches one queue to the tap NAME through /dev/net/tun (creating the tap if there is none).
    pub fn open_tun(name: &str, multi_queue: bool) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                path: "/dev/net/tun".into(),
                what: format!("for tap {name}"),
                source,
            })?;
        let mut req = IfReq::default();
        let bytes = name.as_bytes();
        let len = bytes.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&bytes[..len]);
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        // SAFETY: TUNSETIFF reads a `struct ifreq`, which IfReq lays out (name, flags, padding to 40 bytes).
        let ret = unsafe { ioctl_with_ref(&file, TUNSETIFF(), &req) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                flags: req.flags,
                source: io::Error::last_os_error(),
            });
        }
        Self::configure(file, name)
    }

    /// Takes a ready fd (as libvirt or Cloud Hypervisor pass one): checks with TUNGETIFF that it is a
    /// tap with vnet headers and makes it non-blocking. Returns the queue and the interface's name.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let (iface, flags) =
            get_iff(&file).map_err(|source| TapError::GetIff { fd: raw, source })?;
        if flags & (IFF_TAP | IFF_VNET_HDR) != IFF_TAP | IFF_VNET_HDR {
            return Err(TapError::WrongFdFlags {
                fd: raw,
                iface,
                flags,
            });
        }
        set_nonblocking(&file).map_err(|source| TapError::NonBlock {
            iface: iface.clone(),
            source,
        })?;
        Self::configure(file, &iface)
    }

    fn configure(file: File, iface: &str) -> Result<Self, TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points to `len`.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize {
                iface: iface.into(),
                len: VNET_HDR_LEN,
                source: io::Error::last_os_error(),
            });
        }
        Ok(TapQueue {
            file,
            iface: iface.into(),
            attached: true,
        })
    }

    /// The interface this queue belongs to.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The vnet header size the kernel uses on this queue (TUNGETVNETHDRSZ).
    pub fn kernel_vnet_hdr_len(&self) -> io::Result<usize> {
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer, which points to `len`.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNGETVNETHDRSZ(), &mut len) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len as usize)
    }

    /// The interface flags (TUNGETIFF): IFF_TAP, IFF_VNET_HDR, IFF_MULTI_QUEUE ...
    pub fn iff_flags(&self) -> io::Result<u16> {
        get_iff(&self.file).map(|(_, flags)| flags)
    }

    /// Which of TUN_F_ALL the device accepts: tries them all, then without UFO (kernels since 6.2 and
    /// some macvtaps refuse it), and leaves the device with no offloads on.
    pub fn probe_offloads(&self) -> Result<u32, TapError> {
        let accepted = self.apply_offloads(TUN_F_ALL)?;
        self.apply_offloads(0)?;
        Ok(accepted)
    }

    /// TUNSETOFFLOAD with `flags`, retried without UFO when the kernel says EINVAL. Returns what was set.
    pub fn apply_offloads(&self, flags: u32) -> Result<u32, TapError> {
        match self.set_offload(flags) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & TUN_F_UFO != 0 => {
                log::debug!(
                    "{}: TUNSETOFFLOAD refused UFO, retrying without",
                    self.iface
                );
                let without = flags & !TUN_F_UFO;
                self.set_offload(without)
                    .map(|()| without)
                    .map_err(|source| self.offload_error(without, source))
            }
            Err(source) => Err(self.offload_error(flags, source)),
            Ok(()) => Ok(flags),
        }
    }

    fn offload_error(&self, flags: u32, source: io::Error) -> TapError {
        TapError::SetOffload {
            iface: self.iface.clone(),
            flags,
            source,
        }
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(&self.file, TUNSETOFFLOAD(), flags.into())
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn get_iff(file: &File) -> io::Result<(String, u16)> {
    let mut req = IfReq::default();
    // SAFETY: TUNGETIFF writes a `struct ifreq` (name and flags) into the 40 bytes of `req`.
    let ret = unsafe { ioctl_with_mut_ref(file, TUNGETIFF(), &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    Ok((
        String::from_utf8_lossy(&req.name[..end]).into_owned(),
        req.flags,
    ))
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL on a valid fd has no memory arguments.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a valid fd has no memory arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl NetBackend for TapQueue {
    type Error = TapError;

    fn read_frame(&mut self, bufs: &[RecvBuf<'_>]) -> Result<Option<usize>, TapError> {
        crate::iov::readv(&self.file, bufs).map_err(|source| TapError::Read {
            iface: self.iface.clone(),
            source,
        })
    }

    fn write_frame(&mut self, bufs: &[SendBuf<'_>]) -> Result<Option<usize>, TapError> {
        let fail = |source| TapError::Write {
            iface: self.iface.clone(),
            source,
        };
        // On EAGAIN, arm the EPOLLOUT wakeup the caller will wait for (see iov::poll_writable). A poll
        // that finds room arms nothing and the wakeup may already be gone: write again then. Room
        // (less than half the send buffer in use) lets the next write through, so this ends at once;
        // the bound only guards against a kernel that says otherwise.
        for _ in 0..8 {
            let written = crate::iov::writev(&self.file, bufs).map_err(fail)?;
            if written.is_some() || !crate::iov::poll_writable(&self.file).map_err(fail)? {
                return Ok(written);
            }
        }
        Ok(None)
    }

    fn set_offloads(&mut self, tun_flags: u32) -> Result<u32, TapError> {
        self.apply_offloads(tun_flags)
    }

    fn set_queue_enabled(&mut self, enabled: bool) -> Result<(), TapError> {
        // The kernel refuses to attach an attached queue or detach a detached one.
        if enabled == self.attached {
            return Ok(());
        }
        let mut req = IfReq {
            flags: if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            ..Default::default()
        };
        // SAFETY: TUNSETQUEUE reads a `struct ifreq` (only its flags), which IfReq lays out.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNSETQUEUE(), &mut req) };
        if ret < 0 {
            return Err(TapError::SetQueue {
                iface: self.iface.clone(),
                attach: enabled,
                source: io::Error::last_os_error(),
            });
        }
        self.attached = enabled;
        Ok(())
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Takes ownership of fd N given on the command line (`fd=N`).
///
/// # Safety
/// `fd` must be an open file descriptor that nothing else in this process owns or will close.
pub unsafe fn owned_fd_from_raw(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller promises the fd is open and owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
