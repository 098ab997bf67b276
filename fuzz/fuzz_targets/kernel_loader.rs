//! The kernel and initramfs loader on arbitrary files: whatever the bytes (a damaged ELF, a
//! bzImage header with wild fields), loading returns an error or a kernel that fits, never a
//! panic or an out-of-range write.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use tapir::fuzzing::{load_initrd, load_kernel};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("tapir-fuzz-kernel-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("temp file");
    f.write_all(data).expect("temp file");
    drop(f);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    if let Ok(kernel) = load_kernel(&mem, &path, MEM) {
        // The same bytes as an initramfs after it: placement must not overflow either.
        let _ = load_initrd(&mem, &path, &kernel, MEM);
    }
    let _ = std::fs::remove_file(&path);
});
