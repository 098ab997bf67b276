//! Guest -> host: each TX chain ([virtio-net header | frame], any number of buffers) goes to the
//! backend in one writev straight from guest memory. EAGAIN puts the chain back and TX waits until
//! the backend is writable again; nothing is dropped silently.

use std::sync::atomic::Ordering;

use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_NONE};
use tapir_net_backend::NetBackend;
use virtio_queue::{QueueOwnedT, QueueT};

use super::counters::NetCounters;
use super::device::{report_malformed, tx_index, Net};
use super::iovec::{descriptors, push_readable, recycle};
use super::{Malformed, HDR_LEN, MAX_GSO_FRAME};

impl<B: NetBackend> Net<B> {
    /// Sends what the guest queued on pair `pair` until the queue is empty or the backend is full.
    pub(super) fn process_tx(&mut self, pair: usize) {
        let (Some(active), Some(slot)) = (self.active.as_mut(), self.pairs.get_mut(pair)) else {
            return;
        };
        if slot.tx_blocked {
            return;
        }
        let mem = &active.mem;
        let Some(tx) = active.pairs.get_mut(pair).map(|p| &mut p.tx) else {
            return;
        };
        let counters = &self.counters;
        let mut used_any = false;
        'queue: loop {
            if let Err(e) = tx.disable_notification(mem) {
                log::error!("{}: disabling TX notifications: {e}", self.name);
            }
            while let Some(chain) = tx.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut iov = recycle(std::mem::take(&mut self.tx_iov));
                let mut hdr = [0u8; HDR_LEN];
                let mut total = 0usize;
                let mut parsed = descriptors(chain, |d| {
                    total += push_readable(mem, d, &mut iov, total, &mut hdr)? as usize;
                    if total > MAX_GSO_FRAME {
                        return Err(Malformed::TooLong);
                    }
                    Ok(())
                });
                if parsed.is_ok() && total < HDR_LEN {
                    parsed = Err(Malformed::TooShort);
                }
                let result = match parsed {
                    Ok(()) => Some(slot.backend.write_frame(&iov)),
                    Err(why) => {
                        report_malformed(&self.name, counters, why);
                        None
                    }
                };
                self.tx_iov = recycle(iov);
                match result {
                    Some(Ok(None)) => {
                        tx.go_to_previous_position();
                        slot.tx_blocked = true;
                        NetCounters::add(&counters.tx_eagain, 1);
                        break 'queue;
                    }
                    Some(Ok(Some(_))) => {
                        NetCounters::add(&counters.tx_frames, 1);
                        NetCounters::add(&counters.tx_bytes, (total - HDR_LEN) as u64);
                        if hdr[0] & FLAG_NEEDS_CSUM != 0 {
                            NetCounters::add(&counters.tx_csum_frames, 1);
                        }
                        if hdr[1] & 0x7f != GSO_NONE {
                            NetCounters::add(&counters.tx_gso_frames, 1);
                        }
                    }
                    Some(Err(e)) if counters.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 => {
                        log::warn!("{}: the backend refused a frame: {e}", self.name);
                    }
                    Some(Err(_)) => {}
                    None => {}
                }
                if let Err(e) = tx.add_used(mem, head, 0) {
                    log::error!("{}: returning a TX chain: {e}", self.name);
                }
                used_any = true;
            }
            match tx.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::error!("{}: enabling TX notifications: {e}", self.name);
                    break;
                }
            }
        }
        if used_any {
            self.notify_guest(tx_index(pair));
        }
    }
}
