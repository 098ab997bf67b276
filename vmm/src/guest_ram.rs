//! Guest RAM: anonymous private mappings, one per guest-physical range, asked to be backed by
//! transparent huge pages (MADV_HUGEPAGE) and placed at 2 MiB-aligned host addresses. Where another
//! process must reach it (a vhost-user backend serves a NIC's rings), each range is a memfd mapped
//! shared instead, sealed against shrinking and growing (a backend maps it too, and a file that
//! shrank under it would turn its accesses into SIGBUS; Tapir's own backend refuses one that can).
//!
//! KVM maps a guest page with a 2 MiB nested-page-table entry only where the host backs it with a
//! huge page and the host address and the guest address are equal modulo 2 MiB. Without both, the
//! guest takes one nested page fault per 4 KiB page it touches first: in the KVM lab, 32742 of them
//! from start to init for Debian's kernel against QEMU's 1550 (QEMU advises huge pages and aligns its
//! RAM), about a second of the boot. With THP set to `never` the advice does nothing, and with
//! `always` it is not needed; the default on Debian is `madvise`.
//!
//! vm-memory maps each region itself and does not take an address hint, so alignment comes from
//! the kernel's top-down placement: map and unmap a probe of the region's size to learn where the
//! next mapping of that size goes, hold a spacer that shifts it down to the next 2 MiB boundary,
//! map the region, drop the spacer. If another thread maps memory in between, the region is merely
//! unaligned (still correct, only slower); [`Alignment`] says which happened.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::null_mut;
use std::sync::Arc;

use vm_memory::mmap::{FromRangesError, MmapRegion, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The huge page size KVM and THP use on x86_64.
pub const HUGE_PAGE: usize = 2 << 20;

/// Whether a region's host address ended up 2 MiB-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alignment {
    Aligned,
    /// Off by this many bytes from the boundary below.
    Off(usize),
}

/// Errors of allocating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("mapping {size} bytes of guest RAM at guest address {guest:#x}")]
    Map {
        size: usize,
        guest: u64,
        #[source]
        source: MmapRegionError,
    },
    #[error("arranging guest RAM")]
    Regions(#[source] FromRangesError),
    #[error("creating a {size}-byte memfd for guest RAM at guest address {guest:#x} (shared with a vhost-user backend)")]
    Memfd {
        size: usize,
        guest: u64,
        #[source]
        source: io::Error,
    },
}

/// Whether guest RAM can be shared with another process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sharing {
    /// Anonymous private memory (no other process needs it).
    #[default]
    Private,
    /// A sealed memfd per range, mapped shared: its descriptor goes to vhost-user backends.
    Memfd,
}

/// Maps `ranges` (guest address, size) as guest RAM, private or shared as `sharing` says. With
/// `huge_pages`, each region is placed at a 2 MiB-aligned host address where the kernel allows and
/// advised MADV_HUGEPAGE; the advice failing (a kernel without THP, or shmem THP off for a memfd) is
/// logged, not an error.
pub fn allocate(
    ranges: &[(GuestAddress, usize)],
    huge_pages: bool,
    sharing: Sharing,
) -> Result<(GuestMemoryMmap, Vec<Alignment>), RamError> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut alignments = Vec::with_capacity(ranges.len());
    for &(guest, size) in ranges {
        let map_err = |source| RamError::Map {
            size,
            guest: guest.0,
            source,
        };
        let file = match sharing {
            Sharing::Private => None,
            Sharing::Memfd => Some(sealed_memfd(size).map_err(|source| RamError::Memfd {
                size,
                guest: guest.0,
                source,
            })?),
        };
        let map = || match &file {
            None => MmapRegion::new(size),
            Some(file) => MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), size),
        };
        let region = if huge_pages {
            let spacer = Spacer::for_size(size);
            let region = map().map_err(map_err)?;
            drop(spacer);
            region
        } else {
            map().map_err(map_err)?
        };
        let off = region.as_ptr() as usize % HUGE_PAGE;
        alignments.push(if off == 0 {
            Alignment::Aligned
        } else {
            Alignment::Off(off)
        });
        if huge_pages && off != 0 {
            log::debug!(
                "guest RAM at {:#x}: host address {off:#x} off a 2 MiB boundary; KVM maps it with 4 KiB pages",
                guest.0
            );
        }
        if huge_pages {
            // SAFETY: the range is exactly the mapping just made; MADV_HUGEPAGE changes how the
            // kernel backs it, never its contents.
            let rc = unsafe { libc::madvise(region.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                log::debug!(
                    "madvise(MADV_HUGEPAGE) on guest RAM at {:#x}: {}",
                    guest.0,
                    io::Error::last_os_error()
                );
            }
        }
        let region = GuestRegionMmap::new(region, guest)
            .ok_or(RamError::Regions(FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
    }
    let memory = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| RamError::Regions(FromRangesError::Collection(e)))?;
    Ok((memory, alignments))
}

/// A memfd of `size` bytes that can neither shrink nor grow.
fn sealed_memfd(size: usize) -> io::Result<Arc<File>> {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is checked and owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"tapir-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl adding seals on a descriptor the file owns.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Arc::new(file))
}

/// An anonymous PROT_NONE mapping that pushes the next mapping of `size` bytes down to a 2 MiB
/// boundary; unmapped on drop. Empty when probing fails or no shift is needed.
struct Spacer {
    addr: *mut libc::c_void,
    len: usize,
}

impl Spacer {
    fn for_size(size: usize) -> Spacer {
        let none = Spacer {
            addr: null_mut(),
            len: 0,
        };
        let Some(probe) = map_none(size) else {
            return none;
        };
        let off = probe as usize % HUGE_PAGE;
        // SAFETY: `probe` is the mapping of `size` bytes just made here, used by nothing.
        unsafe { libc::munmap(probe, size) };
        if off == 0 {
            return none;
        }
        // The next mapping of `size` goes where the probe was; a spacer of `off` bytes at the
        // top of that hole moves it down by `off`, onto the boundary.
        match map_none(off) {
            Some(addr) => Spacer { addr, len: off },
            None => none,
        }
    }
}

impl Drop for Spacer {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: the spacer's own mapping, used by nothing.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }
}

fn map_none(len: usize) -> Option<*mut libc::c_void> {
    // SAFETY: a fresh anonymous mapping with no address hint; it overlaps nothing.
    let addr = unsafe {
        libc::mmap(
            null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (addr != libc::MAP_FAILED).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn regions_are_where_asked_and_usable() {
        let ranges = [
            (GuestAddress(0), 64 << 20),
            (GuestAddress(4 << 30), 8 << 20),
        ];
        let (mem, _) = allocate(&ranges, true, Sharing::Private).expect("allocate");
        assert_eq!(mem.num_regions(), 2);
        for (region, (base, size)) in mem.iter().zip(ranges) {
            assert_eq!(region.start_addr(), base);
            assert_eq!(region.len() as usize, size);
        }
        mem.write_obj(0xdead_beefu32, GuestAddress((4 << 30) + 4096))
            .expect("write");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((4 << 30) + 4096)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn huge_page_regions_land_on_2mib_boundaries() {
        // The test harness runs tests on threads that may map memory meanwhile, so allow one
        // miss in a few tries rather than assert every one.
        let mut aligned = 0;
        for _ in 0..4 {
            let (_mem, alignments) =
                allocate(&[(GuestAddress(0), 66 << 20)], true, Sharing::Private).expect("allocate");
            aligned += alignments
                .iter()
                .filter(|a| **a == Alignment::Aligned)
                .count();
        }
        assert!(aligned >= 3, "only {aligned} of 4 regions were aligned");
    }

    #[test]
    fn shared_ram_is_a_sealed_memfd_seen_through_its_descriptor() {
        let ranges = [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let (mem, _) = allocate(&ranges, true, Sharing::Memfd).expect("allocate");
        mem.write_obj(0x5eed_u32, GuestAddress(0x1000)).unwrap();
        let region = mem.iter().next().unwrap();
        let file = region.file_offset().expect("a file-backed region").file();
        // what another process mapping the descriptor would read
        let mut seen = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut seen, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(seen), 0x5eed);
        // SAFETY: fcntl reading the seals of a descriptor the region owns.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        assert!(file.set_len(1 << 20).is_err(), "it cannot shrink");
        assert_eq!(mem.iter().nth(1).unwrap().len(), 2 << 20);
    }
}
