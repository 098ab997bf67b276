//! Host -> guest: frames are read from the backend straight into the guest's RX buffers (one chain,
//! or as many as a frame needs with MRG_RXBUF), until the backend says EAGAIN or the guest runs out
//! of buffers; then the device waits for the guest to add some.
//!
//! The size of the next frame is unknown until it is read, so the device offers each read room for
//! the largest frame the guest accepts: with MRG_RXBUF and GSO that is 64 KiB, 16 to 43 of Linux's
//! buffers. Chains taken from the avail ring for that wait in the pair's [`RxStash`] until a frame
//! fills them: each chain is walked once, however many reads it is offered to. (Taking them anew for
//! each frame and putting back the unused ones cost a small frame some 40 chain walks.)

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_NONE};
use tapir_net_backend::NetBackend;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::counters::NetCounters;
use super::device::{report_malformed, rx_index, Net};
use super::iovec::{descriptors, push_writable, recycle, writable, write_at};
use super::{Malformed, HDR_LEN};

/// Offset of num_buffers in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// RX chains taken from the avail ring and checked, not used yet, in the order the guest made
/// them available.
#[derive(Default)]
pub(super) struct RxStash {
    /// (head index, writable bytes, number of buffers) per chain.
    chains: VecDeque<(u16, u32, usize)>,
    /// The chains' buffers, one after the other.
    bufs: VecDeque<(GuestAddress, u32)>,
    /// Writable bytes in all the chains.
    room: usize,
}

#[cfg(test)]
impl RxStash {
    /// Chains held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }
}

impl<B: NetBackend> Net<B> {
    /// Moves frames from pair `pair`'s backend to its RX queue while both have some.
    pub(super) fn process_rx(&mut self, pair: usize) {
        let (Some(active), Some(slot)) = (self.active.as_mut(), self.pairs.get_mut(pair)) else {
            return;
        };
        let mem = &active.mem;
        let Some(ap) = active.pairs.get_mut(pair) else {
            return;
        };
        let (rx, stash) = (&mut ap.rx, &mut ap.rx_stash);
        let counters = &self.counters;
        // Without MRG_RXBUF a frame goes into exactly one chain.
        let max_chains = if active.mrg_rxbuf { usize::MAX } else { 1 };
        let mut used_any = false;
        while slot.rx_pending {
            // Top the stash up to room for the largest frame.
            while stash.room < active.rx_frame_max && stash.chains.len() < max_chains {
                let Some(chain) = rx.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let before = stash.bufs.len();
                let mut len = 0u32;
                let bufs = &mut stash.bufs;
                let mut parsed = descriptors(chain, |d| {
                    let buf = writable(mem, d)?;
                    len = len.checked_add(buf.1).ok_or(Malformed::TooLong)?;
                    bufs.push_back(buf);
                    Ok(())
                });
                // Every buffer must hold at least a header (virtio 1.2, 5.1.6.3.1).
                if parsed.is_ok() && (len as usize) < HDR_LEN {
                    parsed = Err(Malformed::TooShort);
                }
                if let Err(why) = parsed {
                    stash.bufs.truncate(before);
                    if let Err(e) = rx.add_used(mem, head, 0) {
                        log::error!("{}: returning a malformed RX chain: {e}", self.name);
                    }
                    used_any = true;
                    report_malformed(&self.name, counters, why);
                    continue;
                }
                stash
                    .chains
                    .push_back((head, len, stash.bufs.len() - before));
                stash.room += len as usize;
            }
            if stash.chains.is_empty() {
                // Out of buffers: have the guest notify when it adds some, unless it just did.
                match rx.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => log::error!("{}: enabling RX notifications: {e}", self.name),
                }
                NetCounters::add(&counters.rx_no_buffers, 1);
                break;
            }

            let mut iov = recycle(std::mem::take(&mut self.rx_iov));
            let mut outside = false;
            for buf in &stash.bufs {
                outside |= push_writable(mem, *buf, &mut iov).is_err();
            }
            if outside {
                // Checked when stashed, and guest memory does not change while the device runs;
                // should it anyway, the chains go back empty rather than anywhere near the host.
                self.rx_iov = recycle(iov);
                for (head, ..) in stash.chains.drain(..) {
                    if let Err(e) = rx.add_used(mem, head, 0) {
                        log::error!("{}: returning an RX chain: {e}", self.name);
                    }
                    report_malformed(&self.name, counters, Malformed::OutsideMemory);
                }
                stash.bufs.clear();
                stash.room = 0;
                used_any = true;
                continue;
            }
            let result = slot.backend.read_frame(&mut iov);
            self.rx_iov = recycle(iov);
            match result {
                Ok(Some(n)) => {
                    // The first chain's buffers hold the header, where num_buffers goes.
                    self.rx_hdr_bufs.clear();
                    let first_bufs = stash.chains.front().map_or(0, |c| c.2);
                    self.rx_hdr_bufs
                        .extend(stash.bufs.iter().take(first_bufs).copied());
                    let mut remaining = n;
                    let mut used_chains = 0u16;
                    while let Some(&(head, len, nbufs)) = stash.chains.front() {
                        if remaining == 0 && used_chains > 0 {
                            break;
                        }
                        let used = remaining.min(len as usize);
                        if let Err(e) = rx.add_used(mem, head, used as u32) {
                            log::error!("{}: returning an RX chain: {e}", self.name);
                        }
                        remaining -= used;
                        used_chains += 1;
                        stash.chains.pop_front();
                        stash.bufs.drain(..nbufs);
                        stash.room -= len as usize;
                    }
                    write_at(
                        mem,
                        &self.rx_hdr_bufs,
                        NUM_BUFFERS_OFFSET,
                        &used_chains.to_le_bytes(),
                    );
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
                Ok(None) => slot.rx_pending = false,
                Err(e) => {
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
