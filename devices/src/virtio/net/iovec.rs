//! Guest buffers as iovecs for readv/writev, straight into guest memory, and the checks that keep a
//! guest's bad descriptor chain from reaching the host: direction and bounds (loops and length:
//! `virtio::queue::descriptors`).

use tapir_net_backend::{RecvBuf, SendBuf};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::Malformed;

/// Empties a vector and reuses its allocation for another element type of the same layout (here:
/// iovecs of another lifetime), so the data path allocates nothing per frame.
pub fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

fn host_ptr(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
) -> Result<(*mut u8, usize), Malformed> {
    let len = usize::try_from(len).map_err(|_| Malformed::OutsideMemory)?;
    let slice =
        GuestMemoryBackend::get_slice(mem, addr, len).map_err(|_| Malformed::OutsideMemory)?;
    Ok((slice.ptr_guard_mut().as_ptr(), len))
}

/// Checks that a descriptor is a device-writable buffer inside guest memory; returns it as
/// (address, length).
pub fn writable(
    mem: &GuestMemoryMmap,
    desc: &Descriptor,
) -> Result<(GuestAddress, u32), Malformed> {
    if !desc.is_write_only() {
        return Err(Malformed::WrongDirection);
    }
    host_ptr(mem, desc.addr(), desc.len())?;
    Ok((desc.addr(), desc.len()))
}

/// Appends the guest buffer (`addr`, `len`) to `out` as a device-writable iovec.
pub fn push_writable<'m>(
    mem: &'m GuestMemoryMmap,
    (addr, len): (GuestAddress, u32),
    out: &mut Vec<RecvBuf<'m>>,
) -> Result<(), Malformed> {
    let (ptr, len) = host_ptr(mem, addr, len)?;
    // SAFETY: `get_slice` checked that [ptr, ptr + len) lies inside one mapped region of `mem`,
    // which outlives 'm. Guest memory is reached only through raw pointers and vm-memory's
    // volatile accessors, never a Rust reference, so the guest changing it concurrently or
    // handing the same bytes twice breaks no aliasing rule.
    out.push(unsafe { RecvBuf::from_raw(ptr, len) });
    Ok(())
}

/// Appends a device-readable buffer to `out`, and copies what falls in the first `hdr.len()` bytes
/// of the chain (at `offset` into it) to `hdr`.
pub fn push_readable<'m>(
    mem: &'m GuestMemoryMmap,
    desc: &Descriptor,
    out: &mut Vec<SendBuf<'m>>,
    offset: usize,
    hdr: &mut [u8],
) -> Result<usize, Malformed> {
    if desc.is_write_only() {
        return Err(Malformed::WrongDirection);
    }
    let (ptr, len) = host_ptr(mem, desc.addr(), desc.len())?;
    if offset < hdr.len() {
        let n = (hdr.len() - offset).min(len);
        mem.read_slice(&mut hdr[offset..offset + n], desc.addr())
            .map_err(|_| Malformed::OutsideMemory)?;
    }
    // SAFETY: as in push_writable; this buffer is only handed to writev.
    out.push(unsafe { SendBuf::from_raw(ptr, len) });
    Ok(len)
}

/// Writes `bytes` at byte `offset` of the buffers `bufs` (guest addresses and lengths).
pub fn write_at(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, u32)],
    mut offset: usize,
    bytes: &[u8],
) -> bool {
    let mut rest = bytes;
    for (addr, len) in bufs {
        let len = *len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = rest.len().min(len - offset);
        if mem
            .write_slice(&rest[..n], addr.unchecked_add(offset as u64))
            .is_err()
        {
            return false;
        }
        rest = &rest[n..];
        offset = 0;
        if rest.is_empty() {
            return true;
        }
    }
    rest.is_empty()
}
