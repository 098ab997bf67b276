//! Per-device counters: how performance work is steered. Atomics, so the embedding program can read
//! them while the device runs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Live counters of one virtio-net device.
        #[derive(Debug, Default)]
        pub struct NetCounters {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        /// A snapshot of [`NetCounters`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct NetStats {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl NetCounters {
            pub fn snapshot(&self) -> NetStats {
                NetStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl NetStats {
            /// (name, value) pairs in a fixed order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    rx_frames: "Frames handed to the guest.",
    rx_bytes: "Their bytes, headers excluded.",
    rx_gso_frames: "Of those, GSO frames (segmentation left to the guest).",
    rx_csum_frames: "Of those, frames whose checksum the guest completes (NEEDS_CSUM).",
    rx_no_buffers: "Times reading stopped because the guest had no RX buffers.",
    rx_errors: "Failed reads from the backend.",
    tx_frames: "Frames the guest sent.",
    tx_bytes: "Their bytes, headers excluded.",
    tx_gso_frames: "Of those, GSO frames (TSO/UFO done by the host).",
    tx_csum_frames: "Of those, frames whose checksum the host completes (NEEDS_CSUM).",
    tx_eagain: "Times the backend was full and TX waited for it.",
    tx_errors: "Frames the backend refused (dropped, returned to the guest).",
    malformed_chains: "Descriptor chains refused (too short or long, looping, wrong direction, outside memory).",
    driver_errors: "Times the driver broke the virtio rules and the device stopped until a reset (DEVICE_NEEDS_RESET).",
    yields: "Queue passes that used their budget and yielded to the rest of the event loop.",
    rx_notifications: "Guest notifications on the RX queue.",
    tx_notifications: "Guest notifications on the TX queue.",
    interrupts: "Interrupts sent to the guest.",
    interrupts_merged: "Interrupts due within the moderation window after the last one, merged into one raised at its end.",
    interrupts_resent: "Interrupts raised again because the guest left one unacknowledged for 0.5 s (lost on its way).",
    link_changes: "Times the host interface went down (or away) or came back, told to the guest as its link status.",
}

impl NetCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.fields() {
            writeln!(f, "{name:>18} {value}")?;
        }
        Ok(())
    }
}
