//! Guest -> host: each TX chain ([virtio-net header | frame], any number of buffers) goes to the
//! backend in one writev straight from guest memory. EAGAIN puts the chain back and TX waits until
//! the backend is writable again; nothing is dropped silently. A pass sends at most [`BUDGET`]
//! chains, then yields. With coalescing on, a pass that sent frames leaves the guest's
//! notifications off and the device polls the queue again a moment later (the guest's next frames,
//! an ACK stream's, then cost it no VM exit); a poll that finds the queue empty turns them back on.

use std::sync::atomic::Ordering;

use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_NONE};
use tapir_net_backend::NetBackend;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::counters::NetCounters;
use super::device::{report_malformed, tx_index, Pass, BUDGET};
use super::iovec::{push_readable, recycle};
use super::pair::{PassContext, QueuePair, Scratch};
use super::{Malformed, HDR_LEN, MAX_GSO_FRAME};
use crate::virtio::queue::{descriptors, pop, put, DriverError};
use crate::warn_limited;

impl<B: NetBackend> QueuePair<B> {
    /// Sends what the guest queued until the queue is empty, the backend is full or the pass's
    /// budget is spent. Returns how the pass ended and whether it used any chain.
    pub(super) fn tx_pass(&mut self, ctx: &PassContext, scratch: &mut Scratch) -> (Pass, bool) {
        let Some(mut q) = self.queues.take() else {
            return (Pass::Done, false);
        };
        let ended = self.tx_pass_on(&mut q.tx, ctx, scratch);
        self.queues = Some(q);
        ended
    }

    /// [`Self::tx_pass`] over a TX queue kept elsewhere (the vhost-user backend's vrings).
    pub(super) fn tx_pass_on(
        &mut self,
        tx: &mut Queue,
        ctx: &PassContext,
        scratch: &mut Scratch,
    ) -> (Pass, bool) {
        if self.tx_blocked {
            return (Pass::Done, false);
        }
        let mem = ctx.mem;
        let index = tx_index(self.number);
        let counters = ctx.counters;
        let mut used_any = false;
        let mut budget = BUDGET;
        let pass = 'queue: loop {
            if tx.disable_notification(mem).is_err() {
                break Pass::Failed(DriverError::Rings { queue: index });
            }
            loop {
                if budget == 0 {
                    break 'queue Pass::Yield;
                }
                let chain = match pop(tx, mem, index) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => break 'queue Pass::Failed(e),
                };
                budget -= 1;
                let head = chain.head_index();
                let mut iov = recycle(std::mem::take(&mut scratch.tx_iov));
                let mut hdr = [0u8; HDR_LEN];
                let mut total = 0usize;
                let mut parsed = descriptors(chain, |d| {
                    total += push_readable(mem, d, &mut iov, total, &mut hdr)?;
                    if total > MAX_GSO_FRAME {
                        return Err(Malformed::TooLong);
                    }
                    Ok(())
                });
                if parsed.is_ok() && total < HDR_LEN {
                    parsed = Err(Malformed::TooShort);
                }
                let result = match parsed {
                    Ok(()) => Some(self.backend.write_frame(&iov)),
                    Err(why) => {
                        report_malformed(ctx.name, counters, why);
                        None
                    }
                };
                scratch.tx_iov = recycle(iov);
                match result {
                    Some(Ok(None)) => {
                        tx.go_to_previous_position();
                        self.tx_blocked = true;
                        NetCounters::add(&counters.tx_eagain, 1);
                        break 'queue Pass::Done;
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
                    Some(Err(e)) => {
                        counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                        warn_limited!("{}: the backend refused a frame: {e}", ctx.name);
                    }
                    None => {}
                }
                if let Err(e) = put(tx, mem, index, head, 0) {
                    break 'queue Pass::Failed(e);
                }
                used_any = true;
            }
            // Coalescing: a pass that sent frames leaves the guest's notifications off and has
            // the queue polled again after a while; only a poll that finds nothing turns them on.
            if ctx.tx_poll && used_any {
                self.tx_polling = true;
                break Pass::Done;
            }
            match tx.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break Pass::Done,
                Err(_) => break Pass::Failed(DriverError::Rings { queue: index }),
            }
        };
        (pass, used_any)
    }
}
