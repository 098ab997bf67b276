//! The virtio-net device (virtio 1.2, 5.1): one RX/TX queue pair over a [`NetBackend`], with the
//! guest's checksum and segmentation offloads handed to the host kernel as they are.
//!
//! - `device.rs`: the control plane: features, configuration space, activation and reset;
//! - `pair.rs`: the data plane, one object per queue pair (its backend queue and virtqueues);
//! - `vhost.rs`: the other data plane, the kernel's vhost-net serving a pair's rings;
//! - `user.rs`: the same pairs and passes serving a vhost-user frontend's rings (a backend daemon);
//! - `user_link.rs`: the other way round, a vhost-user backend in another process serving a
//!   pair's rings (Tapir as the frontend);
//! - `rx.rs` / `tx.rs`: a pair's passes, `readv`/`writev` straight between the backend and guest
//!   buffers;
//! - `event_handler.rs`: the event-loop side (queue notifications, the backend's fd);
//! - `counters.rs`: per-device counters.
//!
//! The device never opens host files: it is handed a ready backend.

mod counters;
mod ctrl;
mod device;
mod event_handler;
mod iovec;
mod pair;
mod rx;
mod state;
mod tx;
mod user;
mod user_link;
mod vhost;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod user_link_tests;
#[cfg(test)]
mod user_tests;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use counters::{NetCounters, NetStats};
pub use device::{rx_index, tx_index, Net};
pub use state::{NetState, QueueState};
pub use user::{UserNet, UserNetHandler};
pub use user_link::{UserLink, UserQueue, REPLY_TIMEOUT};
pub use vhost::{VhostError, VhostPair, VHOST_DATA_FEATURES};

/// Most entries of every queue (the driver may choose fewer). 1024, as QEMU's virtio-mmio offers:
/// Linux fills the whole RX ring, and with 256 entries a TCP stream's GSO frames found it empty
/// often enough that the macvtap dropped frames behind it.
pub const QUEUE_SIZE: u16 = 1024;
/// The virtio-net header Tapir and the macvtap use (virtio 1.x: with num_buffers).
pub const HDR_LEN: usize = tapir_net_backend::VNET_HDR_LEN;
/// Largest frame with its header when the guest takes GSO frames, and without.
pub const MAX_GSO_FRAME: usize = HDR_LEN + 65550;
pub const ETH_OVERHEAD: usize = 14 + 4;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// What the device offers whatever the host accepts.
pub const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO);

/// The features to offer for backends that accept `tun_offloads` (TUN_F_*) toward the guest, with an
/// MTU to announce or not, and `pairs` queue pairs (more than one needs the control queue).
pub fn offered_features(tun_offloads: u32, has_mtu: bool, pairs: usize) -> u64 {
    let mut features = BASE_FEATURES | tapir_net_backend::offload::guest_features_for(tun_offloads);
    if has_mtu {
        features |= bit(VIRTIO_NET_F_MTU);
    }
    if pairs > 1 {
        features |= bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    }
    features
}

/// `n` backends as a number of queue pairs, 1 to [`device::MAX_PAIRS`] (queue indexes fit the
/// built-in device's 64-bit reschedule mask); `what` names the device in the error.
fn pair_count(n: usize, what: &str) -> std::io::Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|p| (1..=device::MAX_PAIRS).contains(p))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{what} needs 1 to {} queue pairs, not {n}",
                    device::MAX_PAIRS
                ),
            )
        })
}

/// Largest frame (with header) the guest may be handed, given what it acked.
pub fn rx_frame_max(acked: u64, mtu: u16) -> usize {
    let gso =
        bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_UFO);
    if acked & gso != 0 {
        MAX_GSO_FRAME
    } else {
        HDR_LEN + ETH_OVERHEAD + usize::from(mtu)
    }
}

/// The status field's VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;
/// Where the status field sits in the configuration space.
const STATUS_AT: usize = 6;

/// The configuration space: mac, status, max_virtqueue_pairs, mtu.
pub fn config_space(mac: [u8; 6], mtu: u16, pairs: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[..6].copy_from_slice(&mac);
    c[STATUS_AT..STATUS_AT + 2].copy_from_slice(&LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// Why a descriptor chain was refused (and returned to the guest with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Fewer bytes than a virtio-net header (TX), or no room at all (RX).
    TooShort,
    /// More bytes than any frame can have (TX).
    TooLong,
    /// A device-writable buffer in a TX chain, or a read-only one in an RX chain.
    WrongDirection,
    /// A buffer outside guest memory.
    OutsideMemory,
    /// The chain loops, points past the table, or cannot be read.
    Broken,
    /// More buffers than one readv/writev takes (`virtio::queue::MAX_CHAIN_BUFFERS`).
    TooManyBuffers,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapir_net_backend::offload::{TUN_F_ALL, TUN_F_CSUM, TUN_F_UFO};

    #[test]
    fn offers_only_the_guest_offloads_the_host_takes() {
        let all = offered_features(TUN_F_ALL, true, 1);
        for b in [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_MTU,
        ] {
            assert_ne!(all & bit(b), 0, "bit {b}");
        }
        let no_ufo = offered_features(TUN_F_ALL & !TUN_F_UFO, false, 1);
        assert_eq!(no_ufo & bit(VIRTIO_NET_F_GUEST_UFO), 0);
        assert_eq!(no_ufo & bit(VIRTIO_NET_F_MTU), 0);
        let csum_only = offered_features(TUN_F_CSUM, false, 1);
        assert_eq!(csum_only & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(offered_features(0, false, 1), BASE_FEATURES);
        let mq = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
        assert_eq!(
            offered_features(0, false, 2),
            BASE_FEATURES | mq,
            "several pairs need MQ and the control queue"
        );
        assert_ne!(BASE_FEATURES & bit(VIRTIO_F_VERSION_1), 0);
    }

    #[test]
    fn rx_frames_are_big_only_when_the_guest_takes_gso() {
        assert_eq!(rx_frame_max(bit(VIRTIO_NET_F_GUEST_TSO4), 1500), 65562);
        assert_eq!(
            rx_frame_max(bit(VIRTIO_NET_F_GUEST_CSUM), 1500),
            12 + 18 + 1500
        );
        assert_eq!(rx_frame_max(0, 9000), 12 + 18 + 9000);
    }

    #[test]
    fn config_space_layout() {
        assert_eq!(u32::from(LINK_UP), VIRTIO_NET_S_LINK_UP);
        let c = config_space([2, 0, 0, 0, 0, 1], 1500, 1);
        assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "one queue pair");
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        let c = config_space([2, 0, 0, 0, 0, 1], 1500, 4);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4, "four queue pairs");
    }
}
