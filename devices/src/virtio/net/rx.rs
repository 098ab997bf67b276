//! Host -> guest: frames are read from the backend straight into the guest's RX buffers (one chain,
//! or as many as a frame needs with MRG_RXBUF), until the backend says EAGAIN or the guest runs out
//! of buffers; then the device waits for the guest to add some.

use std::sync::atomic::Ordering;

use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_NONE};
use tapir_net_backend::NetBackend;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::counters::NetCounters;
use super::device::{report_malformed, rx_index, Net};
use super::iovec::{descriptors, push_writable, recycle, write_at};
use super::{Malformed, HDR_LEN};

/// Offset of num_buffers in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

impl<B: NetBackend> Net<B> {
    /// Moves frames from pair `pair`'s backend to its RX queue while both have some.
    pub(super) fn process_rx(&mut self, pair: usize) {
        let (Some(active), Some(slot)) = (self.active.as_mut(), self.pairs.get_mut(pair)) else {
            return;
        };
        let mem = &active.mem;
        let Some(rx) = active.pairs.get_mut(pair).map(|p| &mut p.rx) else {
            return;
        };
        let counters = &self.counters;
        let mut used_any = false;
        while slot.rx_pending {
            let mut iov = recycle(std::mem::take(&mut self.rx_iov));
            self.rx_chains.clear();
            self.rx_hdr_bufs.clear();
            let mut capacity = 0usize;
            while capacity < active.rx_frame_max {
                let Some(chain) = rx.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let first = self.rx_chains.is_empty();
                let before = iov.len();
                let mut len = 0u32;
                let hdr_bufs = &mut self.rx_hdr_bufs;
                let mut parsed = descriptors(chain, |d| {
                    len = len
                        .checked_add(push_writable(mem, d, &mut iov)?)
                        .ok_or(Malformed::TooLong)?;
                    if first {
                        hdr_bufs.push((d.addr(), d.len()));
                    }
                    Ok(())
                });
                if parsed.is_ok() && first && (len as usize) < HDR_LEN {
                    parsed = Err(Malformed::TooShort);
                }
                if let Err(why) = parsed {
                    iov.truncate(before);
                    if first {
                        self.rx_hdr_bufs.clear();
                        if let Err(e) = rx.add_used(mem, head, 0) {
                            log::error!("{}: returning a malformed RX chain: {e}", self.name);
                        }
                        used_any = true;
                        report_malformed(&self.name, counters, why);
                        continue;
                    }
                    // Chains gathered before it may be given back below: leave this one for the
                    // next frame, where it is the first and is returned on its own.
                    rx.go_to_previous_position();
                    break;
                }
                self.rx_chains.push((head, len));
                capacity += len as usize;
                if !active.mrg_rxbuf {
                    break;
                }
            }
            if self.rx_chains.is_empty() {
                self.rx_iov = recycle(iov);
                // Out of buffers: have the guest notify when it adds some, unless it just did.
                match rx.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => log::error!("{}: enabling RX notifications: {e}", self.name),
                }
                NetCounters::add(&counters.rx_no_buffers, 1);
                break;
            }
            let result = slot.backend.read_frame(&mut iov);
            self.rx_iov = recycle(iov);
            match result {
                Ok(Some(n)) => {
                    let mut remaining = n;
                    let mut used_chains = 0usize;
                    for (i, (head, len)) in self.rx_chains.iter().enumerate() {
                        if remaining == 0 && i > 0 {
                            break;
                        }
                        let used = remaining.min(*len as usize);
                        if let Err(e) = rx.add_used(mem, *head, used as u32) {
                            log::error!("{}: returning an RX chain: {e}", self.name);
                        }
                        remaining -= used;
                        used_chains += 1;
                    }
                    for _ in used_chains..self.rx_chains.len() {
                        rx.go_to_previous_position();
                    }
                    let num_buffers = (used_chains as u16).to_le_bytes();
                    write_at(mem, &self.rx_hdr_bufs, NUM_BUFFERS_OFFSET, &num_buffers);
                    let mut hdr = [0u8; 2];
                    if let Some((addr, _)) = self.rx_hdr_bufs.first() {
                        let _ = mem.read_slice(&mut hdr, *addr);
                    }
                    NetCounters::add(&counters.rx_frames, 1);
                    NetCounters::add(&counters.rx_bytes, n.saturating_sub(HDR_LEN) as u64);
                    if hdr[0] & FLAG_NEEDS_CSUM != 0 {
                        NetCounters::add(&counters.rx_csum_frames, 1);
                    }
                    if hdr[1] & 0x7f != GSO_NONE {
                        NetCounters::add(&counters.rx_gso_frames, 1);
                    }
                    used_any = true;
                }
                Ok(None) => {
                    for _ in 0..self.rx_chains.len() {
                        rx.go_to_previous_position();
                    }
                    slot.rx_pending = false;
                }
                Err(e) => {
                    for _ in 0..self.rx_chains.len() {
                        rx.go_to_previous_position();
                    }
                    if counters.rx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        log::warn!("{}: reading a frame from the backend: {e}", self.name);
                    }
                    slot.rx_pending = false;
                }
            }
        }
        if used_any {
            self.notify_guest(rx_index(pair));
        }
    }
}
