//! Host -> guest: frames are read from the backend straight into the guest's RX buffers (one chain,
//! or as many as a frame needs with MRG_RXBUF), until the backend says EAGAIN, the guest runs out
//! of buffers or the pass's budget is spent; then the device waits for the guest to add some, or
//! yields to the rest of the event loop.
//!
//! The size of the next frame is unknown until it is read, so the device offers each read room for
//! the largest frame the guest accepts: with MRG_RXBUF and GSO that is 64 KiB, 16 to 43 of Linux's
//! buffers. Chains taken from the avail ring for that wait in the pair's [`RxStash`] until a frame
//! fills them: each chain is walked once, however many reads it is offered to. (Taking them anew for
//! each frame and putting back the unused ones cost a small frame some 40 chain walks.)
//!
//! A read is offered at most [`MAX_CHAIN_BUFFERS`] buffers (whole chains), and the stash tops up
//! only while it holds fewer, so it never holds more than twice that, whatever the guest posts: a
//! guest of tiny buffers behind huge indirect tables gets reads of at most that many buffers, each
//! chain is still walked once, and the host's memory for RX stays a few KiB per queue pair.
//!
//! A frame's chains go back to the guest together, after its num_buffers (`queue::put_all`): a
//! driver polling on another CPU must never see part of a frame. And once the driver has posted
//! room for the largest frame, a frame waits for room again rather than being cut short by the
//! read (the guest would drop it).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_NONE};
use tapir_net_backend::NetBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::counters::NetCounters;
use super::device::{report_malformed, rx_index, Pass, BUDGET};
use super::iovec::{push_writable, recycle, writable, write_at};
use super::pair::{PassContext, QueuePair, Scratch};
use super::{Malformed, HDR_LEN};
use crate::virtio::queue::{descriptors, pop, put, put_all, DriverError, MAX_CHAIN_BUFFERS};
use crate::warn_limited;

/// Offset of num_buffers in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// One chain in the stash.
#[derive(Debug, Clone, Copy)]
struct Stashed {
    head: u16,
    /// Writable bytes.
    len: u32,
    /// Number of buffers.
    bufs: usize,
}

/// RX chains taken from the avail ring and checked, not used yet, in the order the guest made
/// them available.
#[derive(Debug, Default)]
pub(super) struct RxStash {
    chains: VecDeque<Stashed>,
    /// The chains' buffers, one after the other; fewer than 2 * MAX_CHAIN_BUFFERS.
    bufs: VecDeque<(GuestAddress, u32)>,
    /// Writable bytes in all the chains.
    room: usize,
    /// The stash once held room for the largest frame: this driver keeps enough buffers posted
    /// (Linux fills its whole ring), so a frame waits for room rather than being cut short.
    room_seen: bool,
}

impl RxStash {
    /// Chains held.
    pub fn chains(&self) -> usize {
        self.chains.len()
    }

    /// Buffers held.
    pub fn buffers(&self) -> usize {
        self.bufs.len()
    }
}

impl<B: NetBackend> QueuePair<B> {
    /// Moves frames from the backend to the RX queue while both have some, for at most a budget
    /// of frames. Returns how the pass ended and whether it used any chain.
    pub(super) fn rx_pass(&mut self, ctx: &PassContext, scratch: &mut Scratch) -> (Pass, bool) {
        let Some(mut q) = self.queues.take() else {
            return (Pass::Done, false);
        };
        let ended = self.rx_pass_on(&mut q.rx, &mut q.rx_stash, ctx, scratch);
        self.queues = Some(q);
        ended
    }

    /// [`Self::rx_pass`] over an RX queue and stash kept elsewhere (the vhost-user backend's
    /// rings live in its vrings).
    pub(super) fn rx_pass_on(
        &mut self,
        rx: &mut Queue,
        stash: &mut RxStash,
        ctx: &PassContext,
        scratch: &mut Scratch,
    ) -> (Pass, bool) {
        let mem = ctx.mem;
        let index = rx_index(self.number);
        let counters = ctx.counters;
        // Without MRG_RXBUF a frame goes into exactly one chain.
        let max_chains = if ctx.mrg_rxbuf { usize::MAX } else { 1 };
        let mut used_any = false;
        let mut budget = BUDGET;
        let pass = 'frames: loop {
            if !self.rx_pending {
                break Pass::Done;
            }
            if budget == 0 {
                break Pass::Yield;
            }
            budget -= 1;
            // Top the stash up to room for the largest frame.
            let mut ring_empty = false;
            while stash.room < ctx.rx_frame_max
                && stash.chains.len() < max_chains
                && stash.bufs.len() < MAX_CHAIN_BUFFERS
                && budget > 0
            {
                let chain = match pop(rx, mem, index) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => {
                        ring_empty = true;
                        break;
                    }
                    Err(e) => break 'frames Pass::Failed(e),
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
                    // A refused chain costs a turn of the budget, as a frame does.
                    budget -= 1;
                    stash.bufs.truncate(before);
                    if let Err(e) = put(rx, mem, index, head, 0) {
                        break 'frames Pass::Failed(e);
                    }
                    used_any = true;
                    report_malformed(ctx.name, counters, why);
                    continue;
                }
                let nbufs = stash.bufs.len() - before;
                stash.chains.push_back(Stashed {
                    head,
                    len,
                    bufs: nbufs,
                });
                stash.room += len as usize;
            }
            // With MRG_RXBUF a frame may need many chains, and one that finds too little room is
            // cut short by the read and dropped by the guest. A driver that has posted room for
            // the largest frame before will again: wait for it to add buffers while the stash is
            // below its caps, as for an empty ring. (A driver that never posts that much gets
            // what fits, rather than nothing.)
            stash.room_seen |= stash.room >= ctx.rx_frame_max;
            let short = max_chains > 1
                && stash.room_seen
                && stash.room < ctx.rx_frame_max
                && stash.bufs.len() < MAX_CHAIN_BUFFERS
                && stash.chains.len() < usize::from(rx.size());
            if stash.chains.is_empty() || (short && (ring_empty || budget == 0)) {
                if budget == 0 {
                    break Pass::Yield;
                }
                // Out of buffers: have the guest notify when it adds some, unless it just did.
                match rx.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(_) => break Pass::Failed(DriverError::Rings { queue: index }),
                }
                NetCounters::add(&counters.rx_no_buffers, 1);
                break Pass::Done;
            }

            // The chains whose buffers fit one readv; a chain past that waits for the next read.
            let mut offered = 0;
            for chain in &stash.chains {
                if offered > 0 && offered + chain.bufs > MAX_CHAIN_BUFFERS {
                    break;
                }
                offered += chain.bufs;
            }
            let mut iov = recycle(std::mem::take(&mut scratch.rx_iov));
            let mut outside = false;
            for buf in stash.bufs.iter().take(offered) {
                outside |= push_writable(mem, *buf, &mut iov).is_err();
            }
            if outside {
                // Checked when stashed, and guest memory does not change while the device runs;
                // should it anyway, the chains go back empty rather than anywhere near the host.
                scratch.rx_iov = recycle(iov);
                for chain in stash.chains.drain(..) {
                    if let Err(e) = put(rx, mem, index, chain.head, 0) {
                        break 'frames Pass::Failed(e);
                    }
                    report_malformed(ctx.name, counters, Malformed::OutsideMemory);
                }
                stash.bufs.clear();
                stash.room = 0;
                used_any = true;
                continue;
            }
            let result = self.backend.read_frame(&iov);
            scratch.rx_iov = recycle(iov);
            match result {
                Ok(Some(n)) => {
                    // The first chain's buffers hold the header, where num_buffers goes.
                    scratch.rx_hdr_bufs.clear();
                    let first_bufs = stash.chains.front().map_or(0, |c| c.bufs);
                    scratch
                        .rx_hdr_bufs
                        .extend(stash.bufs.iter().take(first_bufs).copied());
                    // The chains the frame filled, its num_buffers, then the chains returned
                    // together: the driver must never see part of a frame.
                    scratch.rx_used.clear();
                    let mut remaining = n;
                    for chain in &stash.chains {
                        if remaining == 0 && !scratch.rx_used.is_empty() {
                            break;
                        }
                        let used = u32::try_from(remaining).map_or(chain.len, |r| r.min(chain.len));
                        scratch.rx_used.push((chain.head, used));
                        remaining -= used as usize;
                    }
                    // at most MAX_CHAIN_BUFFERS chains
                    let used_chains = u16::try_from(scratch.rx_used.len()).unwrap_or(u16::MAX);
                    write_at(
                        mem,
                        &scratch.rx_hdr_bufs,
                        NUM_BUFFERS_OFFSET,
                        &used_chains.to_le_bytes(),
                    );
                    if let Err(e) = put_all(rx, mem, index, &scratch.rx_used) {
                        break 'frames Pass::Failed(e);
                    }
                    for _ in 0..scratch.rx_used.len() {
                        if let Some(chain) = stash.chains.pop_front() {
                            stash.bufs.drain(..chain.bufs);
                            stash.room -= chain.len as usize;
                        }
                    }
                    let mut hdr = [0u8; 2];
                    if let Some((addr, _)) = scratch.rx_hdr_bufs.first() {
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
                Ok(None) => self.rx_pending = false,
                Err(e) => {
                    counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                    warn_limited!("{}: reading a frame from the backend: {e}", ctx.name);
                    self.rx_pending = false;
                }
            }
        };
        (pass, used_any)
    }
}
