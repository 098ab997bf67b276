//! Tapir as a vhost-user frontend: a NIC whose rings a backend in another process serves (Tapir's
//! own `tapir vhost-user-net`, Cloud Hypervisor's, a DPDK or OVS switch). [`UserLink`] is the
//! connection to it; each queue pair reaches its two rings through it ([`UserQueue`] for what the
//! device asks of a pair's host side, [`super::VhostPair::user`] for the rings themselves).
//!
//! What the backend is told, in this order: at connection, SET_OWNER, GET_FEATURES, and with
//! PROTOCOL_FEATURES the protocol features Tapir uses (MQ, CONFIG, REPLY_ACK: with it every request
//! is answered, so a refusal is seen where it happens), GET_QUEUE_NUM, and GET_CONFIG for the MAC
//! and MTU the backend's host side has. When the driver starts the device: per pair,
//! SET_FEATURES (what the driver acked that the backend offered, PROTOCOL_FEATURES added back),
//! SET_MEM_TABLE (guest RAM's memfds), then per ring SET_VRING_NUM, SET_VRING_BASE,
//! SET_VRING_ADDR, SET_VRING_CALL (the device's irqfd) and SET_VRING_KICK (its QueueNotify
//! ioeventfd), and SET_VRING_ENABLE for the pairs the driver uses. A reset reads every ring's base
//! back (GET_VRING_BASE, which stops it). Tapir keeps the control plane: the configuration space,
//! the control queue (MQ: which pairs are enabled), the link status.
//!
//! The backend is another process and may hang or die: every request has a reply deadline
//! ([`REPLY_TIMEOUT`]), so a vCPU that starts or resets the device waits that long at most; a
//! backend that went away leaves the NIC without frames (its requests fail and are logged) but
//! never Tapir stopped. Tapir does not reconnect; its event loop watches [`UserLink::socket`] and
//! turns the guest's link down when the backend closes the connection.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use super::vhost::{RingServer, VhostError};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU};

/// How long a request may wait for the backend's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol features Tapir uses when the backend has them.
const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

/// One connection to a vhost-user-net backend.
pub struct UserLink {
    path: PathBuf,
    frontend: Mutex<Frontend>,
    /// The connection's socket (the frontend owns it), for watching it close.
    socket: RawFd,
    /// GET_FEATURES's answer.
    offered: u64,
    /// The protocol features both sides use.
    protocol: VhostUserProtocolFeatures,
    pairs: usize,
    /// The backend's configuration space (mac, status, max pairs, mtu), when it gave it.
    config: Option<[u8; 12]>,
    /// Per pair: the driver uses it (the device's choice), and its rings run (they were started).
    /// SET_VRING_ENABLE needs the features set, so a pair enabled before it started is enabled
    /// when it starts.
    pair_state: Mutex<Vec<PairState>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct PairState {
    wanted: bool,
    running: bool,
}

impl std::fmt::Debug for UserLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserLink")
            .field("path", &self.path)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("protocol", &self.protocol)
            .field("pairs", &self.pairs)
            .finish_non_exhaustive()
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(vhost::Error) -> VhostError {
    let what = what.into();
    move |source| VhostError::new(what, source)
}

impl UserLink {
    /// Connects to the backend listening on `path` for a NIC of `pairs` queue pairs and agrees
    /// with it on what the connection uses (see the module's documentation). The errors name the
    /// socket and the step.
    pub fn connect(path: &Path, pairs: usize) -> Result<Self, VhostError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            VhostError::new(
                format!("connecting to the vhost-user backend at {}", path.display()),
                vhost::Error::IOError(e),
            )
        })?;
        Self::over(stream, path, pairs)
    }

    /// [`Self::connect`] over a connected stream (`path` names it in messages).
    pub fn over(stream: UnixStream, path: &Path, pairs: usize) -> Result<Self, VhostError> {
        let at = path.display();
        for deadline in [
            stream.set_read_timeout(Some(REPLY_TIMEOUT)),
            stream.set_write_timeout(Some(REPLY_TIMEOUT)),
        ] {
            deadline.map_err(|e| {
                VhostError::new(format!("{at}: a reply deadline"), vhost::Error::IOError(e))
            })?;
        }
        let rings = 2 * pairs as u64;
        let mut frontend = Frontend::from_stream(stream, rings);
        frontend
            .set_owner()
            .map_err(step(format!("{at}: SET_OWNER")))?;
        let offered = frontend
            .get_features()
            .map_err(step(format!("{at}: GET_FEATURES")))?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostError::new(
                format!("{at}: the backend lacks VIRTIO_F_VERSION_1 (offers {offered:#x}), which a virtio-mmio version 2 device needs"),
                vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::FeatureMismatch),
            ));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let theirs = frontend
                .get_protocol_features()
                .map_err(step(format!("{at}: GET_PROTOCOL_FEATURES")))?;
            protocol = theirs & WANTED_PROTOCOL;
            frontend
                .set_protocol_features(protocol)
                .map_err(step(format!("{at}: SET_PROTOCOL_FEATURES")))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if pairs > 1 {
            let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
                frontend
                    .get_queue_num()
                    .map_err(step(format!("{at}: GET_QUEUE_NUM")))?
            } else {
                2
            };
            if queues < rings {
                return Err(VhostError::new(
                    format!("{at}: queues={pairs} needs {rings} rings; the backend serves {queues} (give it queues={pairs} too)"),
                    vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidParam),
                ));
            }
        }
        let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, payload) = frontend
                .get_config(0, 12, VhostUserConfigFlags::empty(), &[0; 12])
                .map_err(step(format!("{at}: GET_CONFIG")))?;
            payload.get(..12).and_then(|c| <[u8; 12]>::try_from(c).ok())
        } else {
            None
        };
        Ok(Self {
            path: path.to_owned(),
            socket: frontend.as_raw_fd(),
            frontend: Mutex::new(frontend),
            offered,
            protocol,
            pairs,
            config,
            pair_state: Mutex::new(vec![PairState::default(); pairs]),
        })
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection's socket, for an event loop to watch for the backend closing it (only
    /// for that: its messages belong to the requests).
    pub fn socket(&self) -> RawFd {
        self.socket
    }

    /// The virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Queue pairs the NIC has.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// The MAC the backend's host side has (a macvtap's: the guest must use it), if it said.
    pub fn mac(&self) -> Option<[u8; 6]> {
        let config = self.config?;
        (self.offered & (1 << VIRTIO_NET_F_MAC) != 0)
            .then(|| config[..6].try_into().ok())
            .flatten()
    }

    /// The MTU the backend's host side has, if it said.
    pub fn mtu(&self) -> Option<u16> {
        let config = self.config?;
        (self.offered & (1 << VIRTIO_NET_F_MTU) != 0)
            .then(|| u16::from_le_bytes([config[10], config[11]]))
    }

    /// Whether rings are enabled one by one (SET_VRING_ENABLE); without PROTOCOL_FEATURES the
    /// backend enables every ring when it starts.
    pub fn enables_rings(&self) -> bool {
        self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// What goes to SET_FEATURES for a driver that acked `acked`: what the backend offered of
    /// it, and PROTOCOL_FEATURES where the backend offered that.
    pub fn features_for(&self, acked: u64) -> u64 {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        (acked & self.offered & !protocol) | (self.offered & protocol)
    }

    /// The connection, for one request or a sequence of them.
    pub(super) fn frontend(&self) -> MutexGuard<'_, Frontend> {
        // (a request that panicked left no state of the connection's half-changed that matters)
        self.frontend.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device uses pair `pair` (`on`) or not: its rings are enabled or disabled now if they
    /// run, or when they start.
    pub fn use_pair(&self, pair: usize, on: bool) -> Result<(), VhostError> {
        self.update_pair(pair, |s| {
            s.wanted = on;
            s.running
        })
    }

    /// Pair `pair`'s rings started (`true`, and are enabled as the device wants) or stopped.
    pub(super) fn pair_running(&self, pair: usize, running: bool) -> Result<(), VhostError> {
        self.update_pair(pair, |s| {
            s.running = running;
            running
        })
    }

    /// Changes pair `pair`'s state with `change`, then, where it says so (the rings run), sends
    /// the pair's rings the enable state the device wants.
    fn update_pair(
        &self,
        pair: usize,
        change: impl FnOnce(&mut PairState) -> bool,
    ) -> Result<(), VhostError> {
        let wanted = {
            let mut state = self.pair_state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(s) = state.get_mut(pair) else {
                return Ok(());
            };
            if !change(s) {
                return Ok(());
            }
            s.wanted
        };
        self.enable_pair(pair, wanted)
    }

    fn enable_pair(&self, pair: usize, on: bool) -> Result<(), VhostError> {
        if !self.enables_rings() {
            return Ok(());
        }
        let mut frontend = self.frontend();
        for ring in [2 * pair, 2 * pair + 1] {
            frontend.set_vring_enable(ring, on).map_err(step(format!(
                "{}: SET_VRING_ENABLE {ring} {on}",
                self.path.display()
            )))?;
        }
        Ok(())
    }

    /// Runs `f` on the connection as the generic vhost interface.
    pub(super) fn with_backend<R>(&self, f: impl FnOnce(&dyn RingServer) -> R) -> R {
        let frontend = self.frontend();
        f(&*frontend)
    }
}

/// What the device asks of one pair's host side when a vhost-user backend serves it: whether the
/// driver uses the pair (SET_VRING_ENABLE), and the offloads (the backend applies what the driver
/// acked from SET_FEATURES itself). Frames never pass through it: the backend moves them, and
/// the device never registers it with its event loop.
#[derive(Debug, Clone)]
pub struct UserQueue {
    link: Arc<UserLink>,
    pair: usize,
}

impl UserQueue {
    /// One per pair of `link`, in pair order.
    pub fn for_pairs(link: &Arc<UserLink>) -> Vec<UserQueue> {
        (0..link.pairs)
            .map(|pair| UserQueue {
                link: link.clone(),
                pair,
            })
            .collect()
    }

    /// The connection.
    pub fn link(&self) -> &Arc<UserLink> {
        &self.link
    }
}

/// The connection's socket (never read or written through this: the device only needs an fd to
/// name).
impl AsRawFd for UserQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.link.frontend().as_raw_fd()
    }
}

impl tapir_net_backend::NetBackend for UserQueue {
    type Error = VhostError;

    fn read_frame(
        &mut self,
        _bufs: &[tapir_net_backend::RecvBuf<'_>],
    ) -> Result<Option<usize>, VhostError> {
        Err(not_here())
    }

    fn write_frame(
        &mut self,
        _bufs: &[tapir_net_backend::SendBuf<'_>],
    ) -> Result<Option<usize>, VhostError> {
        Err(not_here())
    }

    fn set_offloads(&mut self, tun_flags: u32) -> Result<u32, VhostError> {
        Ok(tun_flags)
    }

    fn set_queue_enabled(&mut self, enabled: bool) -> Result<(), VhostError> {
        self.link.use_pair(self.pair, enabled)
    }
}

fn not_here() -> VhostError {
    VhostError::new(
        "frames of a vhost-user NIC move in its backend, not in Tapir",
        vhost::Error::InvalidOperation,
    )
}
