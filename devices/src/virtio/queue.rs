//! The device side of a split virtqueue, on top of virtio-queue's `Queue`, with every rule a driver
//! can break turned into a [`DriverError`] instead of a silent stop, an endless "more work", a
//! write to guest address 0 or a log line per call (virtio-queue's convenience methods do all
//! of these: `pop_descriptor_chain` hides an avail index that ran ahead, `is_valid` and
//! `add_used` log at error level for each bad call).

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
