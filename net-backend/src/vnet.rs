//! The virtio-net header (`virtio_net_hdr_v1`, 12 bytes) that precedes every frame on a macvtap or tap
//! opened with IFF_VNET_HDR. Always little-endian, whatever the host's byte order.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};

/// Size of `virtio_net_hdr_v1`: what Tapir sets with TUNSETVNETHDRSZ (macvtap opens with 10).
pub const VNET_HDR_LEN: usize = 12;

pub const FLAG_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub const FLAG_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// A decoded `virtio_net_hdr_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Decodes the first 12 bytes; None when there are fewer.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_little_endian() {
        let hdr = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 1,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(bytes, [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 1, 0]);
        assert_eq!(VnetHdr::from_bytes(&bytes), Some(hdr));
        assert_eq!(VnetHdr::from_bytes(&bytes[..11]), None);
    }
}
