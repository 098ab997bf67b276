//! Offloads: which TUN_F_* flags the host may use towards the guest, decided from the virtio-net
//! features the guest acked. Pure functions, so the mapping is tested on its own.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

/// `TUN_F_*` from linux/if_tun.h: what TUNSETOFFLOAD takes.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// Every flag Tapir asks for when it probes what a device accepts.
pub const TUN_F_ALL: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;

const MAP: [(u32, u32); 5] = [
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
];

/// The TUN_F_* flags for the virtio-net features a guest acked. Segmentation offloads need checksum
/// offload (a guest that takes unchecksummed large frames must take unchecksummed small ones too), and
/// ECN only qualifies TSO, so those are dropped when what they depend on is missing.
pub fn tun_offloads_for(acked_features: u64) -> u32 {
    let mut flags = MAP
        .iter()
        .filter(|(bit, _)| acked_features & (1u64 << bit) != 0)
        .fold(0, |acc, (_, flag)| acc | flag);
    if flags & TUN_F_CSUM == 0 {
        return 0;
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) == 0 {
        flags &= !TUN_F_TSO_ECN;
    }
    flags
}

/// The guest offload features a device may offer when the host accepted `tun_flags`.
pub fn guest_features_for(tun_flags: u32) -> u64 {
    MAP.iter()
        .filter(|(_, flag)| tun_flags & flag != 0)
        .fold(0, |acc, (bit, _)| acc | (1u64 << bit))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;
    const TSO4: u64 = 1 << VIRTIO_NET_F_GUEST_TSO4;
    const TSO6: u64 = 1 << VIRTIO_NET_F_GUEST_TSO6;
    const ECN: u64 = 1 << VIRTIO_NET_F_GUEST_ECN;
    const UFO: u64 = 1 << VIRTIO_NET_F_GUEST_UFO;
    // Host-side and unrelated features must not leak into the mapping.
    const OTHER: u64 = (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_TSO4)
        | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF)
        | (1 << 32);

    #[test]
    fn maps_acked_features_to_tun_flags() {
        let cases: [(u64, u32); 9] = [
            (0, 0),
            (OTHER, 0),
            (CSUM, TUN_F_CSUM),
            (CSUM | TSO4, TUN_F_CSUM | TUN_F_TSO4),
            (
                CSUM | TSO4 | TSO6 | OTHER,
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
            ),
            (CSUM | TSO4 | TSO6 | ECN | UFO, TUN_F_ALL),
            // no checksum offload: nothing else is safe
            (TSO4 | TSO6 | UFO, 0),
            // ECN without TSO means nothing
            (CSUM | ECN, TUN_F_CSUM),
            (CSUM | UFO, TUN_F_CSUM | TUN_F_UFO),
        ];
        for (acked, want) in cases {
            assert_eq!(tun_offloads_for(acked), want, "acked {acked:#x}");
        }
    }

    #[test]
    fn offers_only_what_the_host_accepted() {
        assert_eq!(
            guest_features_for(TUN_F_ALL),
            CSUM | TSO4 | TSO6 | ECN | UFO
        );
        assert_eq!(
            guest_features_for(TUN_F_ALL & !TUN_F_UFO),
            CSUM | TSO4 | TSO6 | ECN
        );
        assert_eq!(guest_features_for(0), 0);
        for flags in [0, TUN_F_CSUM, TUN_F_ALL, TUN_F_ALL & !TUN_F_UFO] {
            assert_eq!(tun_offloads_for(guest_features_for(flags)), flags);
        }
    }
}
