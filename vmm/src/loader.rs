//! Puts the kernel and the initramfs into guest memory: an ELF vmlinux or a bzImage (both through
//! linux-loader), the initramfs as high in low memory as the kernel allows.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::x86_64::boot::{self, InitrdPlacementError};
use crate::x86_64::layout::{HIMEM_START, MMIO_GAP_START};

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
/// xloadflags bit: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

/// What can go wrong loading the kernel or initramfs; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("opening {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("loading the {format} {path} into {mem_mib} MiB of guest memory")]
    Kernel {
        format: &'static str,
        path: PathBuf,
        mem_mib: u64,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("{path} is a bzImage without a 64-bit entry point (32-bit kernel?)")]
    No64BitEntry { path: PathBuf },
    #[error("{path}: the bzImage's header asks for {init_size:#x} bytes at {pref_address:#x}, past the end of the address space")]
    BadLayout {
        path: PathBuf,
        pref_address: u64,
        init_size: u32,
    },
    #[error("placing the initramfs {path}")]
    InitrdTooLarge {
        path: PathBuf,
        #[source]
        source: InitrdPlacementError,
    },
    #[error("reading the initramfs {path} into guest memory")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Kernel formats Tapir boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells the format from the first bytes of the file.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// A kernel in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The bzImage's setup header, for the zero page.
    pub header: Option<setup_header>,
    /// First byte the kernel will not use while it starts (decompression included).
    pub end: u64,
    /// Longest command line the kernel takes, NUL included, when it says so.
    pub cmdline_max: Option<usize>,
}

fn open(what: &'static str, path: &Path) -> Result<File, LoadError> {
    File::open(path).map_err(|source| LoadError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The end of what a bzImage's decompressor works in, [pref_address, pref_address + init_size);
/// None when a bad header puts it past the end of the address space.
fn decompressed_end(header: &setup_header) -> Option<u64> {
    header.pref_address.checked_add(u64::from(header.init_size))
}

/// Loads the kernel at `path` into `mem` (of `mem_size` bytes).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
) -> Result<LoadedKernel, LoadError> {
    let mut file = open("kernel", path)?;
    let mut head = Vec::with_capacity(0x210);
    let read = (&mut file).take(0x210).read_to_end(&mut head);
    let format = read
        .ok()
        .and_then(|_| detect_format(&head))
        .ok_or_else(|| LoadError::NotAKernel {
            path: path.to_owned(),
        })?;
    let fail = |format, source| LoadError::Kernel {
        format,
        path: path.to_owned(),
        mem_mib: mem_size >> 20,
        source,
    };
    let _ = file.seek(SeekFrom::Start(0));
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(|e| fail("ELF kernel", e))?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0,
                header: None,
                end: r.kernel_end,
                cmdline_max: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(|e| fail("bzImage", e))?;
            let header = r.setup_header.unwrap_or_default();
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoadError::No64BitEntry {
                    path: path.to_owned(),
                });
            }
            let decompressed_end =
                decompressed_end(&header).ok_or_else(|| LoadError::BadLayout {
                    path: path.to_owned(),
                    pref_address: header.pref_address,
                    init_size: header.init_size,
                })?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY,
                header: Some(header),
                end: r.kernel_end.max(decompressed_end),
                cmdline_max: (header.cmdline_size > 0)
                    .then(|| usize::try_from(header.cmdline_size).ok())
                    .flatten()
                    .and_then(|n| n.checked_add(1)),
            })
        }
    }
}

/// Loads the initramfs at `path` as high as the kernel allows; returns its (address, size).
#[cfg(feature = "fuzzing")]
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<(u64, u64), LoadError> {
    place_initrd(path, kernel, mem_size)?.read_into(mem)
}

/// An initramfs whose place in guest memory is chosen and whose file is open, not read yet: the
/// boot parameters need only its place, so the reading can go on beside the rest of the set-up.
#[derive(Debug)]
pub struct PlacedInitrd {
    file: File,
    path: PathBuf,
    /// Guest-physical address of its first byte.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Opens the initramfs at `path` and places it as high in low memory as the kernel allows.
pub fn place_initrd(
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<PlacedInitrd, LoadError> {
    let file = open("initramfs", path)?;
    let size = file
        .metadata()
        .map_err(|source| LoadError::Open {
            what: "initramfs",
            path: path.to_owned(),
            source,
        })?
        .len();
    let mut top = mem_size.min(MMIO_GAP_START);
    if let Some(max) = kernel.header.map(|h| h.initrd_addr_max).filter(|m| *m != 0) {
        top = top.min(u64::from(max) + 1);
    }
    let addr = boot::initrd_address(size, kernel.end, top).map_err(|source| {
        LoadError::InitrdTooLarge {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(PlacedInitrd {
        file,
        path: path.to_owned(),
        addr,
        size,
    })
}

impl PlacedInitrd {
    /// Reads the whole file into guest memory at its place; returns (address, size). A file that
    /// shrank since it was placed is an error, not a short initramfs.
    pub fn read_into(mut self, mem: &GuestMemoryMmap) -> Result<(u64, u64), LoadError> {
        mem.read_exact_volatile_from(GuestAddress(self.addr), &mut self.file, self.size as usize)
            .map_err(|source| LoadError::InitrdRead {
                path: self.path,
                source,
            })?;
        Ok((self.addr, self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
        assert_eq!(
            detect_format(&bz[..0x204]),
            None,
            "truncated before the magic"
        );
    }

    #[test]
    fn a_placed_initrd_is_read_whole_and_one_that_shrank_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tapir-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mem_size = 16 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
        let kernel = LoadedKernel {
            entry: HIMEM_START,
            header: None,
            end: 2 << 20,
            cmdline_max: None,
        };

        let placed = place_initrd(&path, &kernel, mem_size as u64).unwrap();
        assert_eq!(placed.size, bytes.len() as u64);
        assert_eq!(
            placed.addr,
            mem_size as u64 - placed.size,
            "as high as it fits"
        );
        let (addr, size) = placed.read_into(&mem).unwrap();
        let mut back = vec![0u8; size as usize];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, bytes);

        let placed = place_initrd(&path, &kernel, mem_size as u64).unwrap();
        std::fs::write(&path, &bytes[..4096]).unwrap();
        let err = placed.read_into(&mem).unwrap_err();
        assert!(matches!(err, LoadError::InitrdRead { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bzimage_header_that_overflows_the_address_space_is_refused() {
        let ok = setup_header {
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        assert_eq!(decompressed_end(&ok), Some(0x300_0000));
        let bad = setup_header {
            pref_address: u64::MAX - 0x1000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        assert_eq!(decompressed_end(&bad), None);
    }
}
