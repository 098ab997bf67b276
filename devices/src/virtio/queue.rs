//! The device side of a split virtqueue, on top of virtio-queue's `Queue`, with every rule a driver
//! can break turned into a [`DriverError`] instead of a silent stop, an endless "more work", a
//! write to guest address 0 or a log line per call (virtio-queue's convenience methods do all
//! of these: `pop_descriptor_chain` hides an avail index that ran ahead, `is_valid` and
//! `add_used` log at error level for each bad call).

use std::sync::atomic::{fence, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::net::Malformed;

/// Most buffers in one descriptor chain, and in one readv/writev (the kernel's UIO_MAXIOV): a
/// longer chain is refused whole rather than cut by the kernel.
pub const MAX_CHAIN_BUFFERS: usize = 1024;

/// What the driver did that the virtio rules forbid; the device stops until the driver resets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    #[error("queue {queue}: avail index {avail} is more than the queue size {size} ahead of the device's {next}")]
    AvailAhead {
        queue: usize,
        avail: u16,
        next: u16,
        size: u16,
    },
    #[error("queue {queue}: descriptor chain head {head} is outside the queue of {size}")]
    BadHead { queue: usize, head: u16, size: u16 },
    #[error("queue {queue}: its rings cannot be read or written")]
    Rings { queue: usize },
}

/// Whether a queue is ready and its three parts lie in guest memory (virtio-queue's `is_valid`
/// without its log line per call).
pub fn usable(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(q.size());
    let parts = [
        (q.desc_table(), 16 * size),
        (q.avail_ring(), 6 + 2 * size),
        (q.used_ring(), 6 + 8 * size),
    ];
    q.ready()
        && size > 0
        && parts.iter().all(|&(addr, len)| {
            usize::try_from(len)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(addr), len))
        })
}

/// The next chain the driver made available, if any; `queue` names it in errors.
pub fn pop<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
    queue: usize,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DriverError> {
    let size = q.size();
    let next = q.next_avail();
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| DriverError::Rings { queue })?
        .0;
    if avail.wrapping_sub(next) > size {
        return Err(DriverError::AvailAhead {
            queue,
            avail,
            next,
            size,
        });
    }
    let mut iter = q.iter(mem).map_err(|_| DriverError::Rings { queue })?;
    let Some(chain) = iter.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    if head >= size {
        return Err(DriverError::BadHead { queue, head, size });
    }
    Ok(Some(chain))
}

/// Returns chain `head` to the driver with `len` bytes written.
pub fn put(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    queue: usize,
    head: u16,
    len: u32,
) -> Result<(), DriverError> {
    q.add_used(mem, head, len)
        .map_err(|_| DriverError::Rings { queue })
}

/// Returns the chains of `used` (head, bytes written) to the driver together: their used elements
/// first, then one store of the used index (release ordering, after everything written into the
/// buffers), so the driver never sees part of them. A frame spread over several RX chains must
/// arrive whole: virtio-queue's `add_used` publishes each chain on its own, and a driver polling
/// meanwhile takes the first chains for a frame that lacks its tail and drops it.
///
/// The interrupt decision for a queue served this way goes through [`needs_interrupt`]:
/// virtio-queue's `needs_notification` counts only the chains `add_used` returned.
pub fn put_all(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    queue: usize,
    used: &[(u16, u32)],
) -> Result<(), DriverError> {
    let size = q.size();
    let ring = q.used_ring();
    let mut next = q.next_used();
    for &(head, len) in used {
        if head >= size {
            return Err(DriverError::BadHead { queue, head, size });
        }
        // struct virtq_used_elem { le32 id; le32 len; } after the 4-byte flags and idx
        let elem = GuestAddress(ring + 4 + 8 * u64::from(next % size));
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        bytes[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&bytes, elem)
            .map_err(|_| DriverError::Rings { queue })?;
        next = next.wrapping_add(1);
    }
    mem.store(next.to_le(), GuestAddress(ring + 2), Ordering::Release)
        .map_err(|_| DriverError::Rings { queue })?;
    q.set_next_used(next);
    Ok(())
}

/// Whether the driver wants an interrupt for the chains used since the device's used index was
/// `since` (its value at the last decision): with EVENT_IDX, when its used_event lies in
/// [since, next_used); without, always (as virtio-queue: the NO_INTERRUPT flag is a hint).
pub fn needs_interrupt(
    q: &Queue,
    mem: &GuestMemoryMmap,
    queue: usize,
    since: u16,
) -> Result<bool, DriverError> {
    // the used index stored before the driver's used_event is read
    fence(Ordering::SeqCst);
    if !q.event_idx_enabled() {
        return Ok(true);
    }
    let at = GuestAddress(q.avail_ring() + 4 + 2 * u64::from(q.size()));
    let used_event = u16::from_le(
        mem.load::<u16>(at, Ordering::Acquire)
            .map_err(|_| DriverError::Rings { queue })?,
    );
    let now = q.next_used();
    Ok(now.wrapping_sub(used_event).wrapping_sub(1) < now.wrapping_sub(since))
}

/// Walks a chain's descriptors, at most [`MAX_CHAIN_BUFFERS`] of them (virtio-queue's iterator
/// stops silently on loops and bad indexes: a last descriptor that still says "next" tells that
/// it was cut).
pub fn descriptors(
    chain: impl Iterator<Item = Descriptor>,
    mut each: impl FnMut(&Descriptor) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    let mut last_has_next = false;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_BUFFERS {
            return Err(Malformed::TooManyBuffers);
        }
        last_has_next = desc.has_next();
        each(&desc)?;
    }
    if last_has_next || count == 0 {
        return Err(Malformed::Broken);
    }
    Ok(())
}
