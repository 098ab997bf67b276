//! Boots a guest from Rust with Tapir's embedding API: the console goes into memory, a watchdog
//! thread stops the VM if it runs too long, and the program prints why the guest stopped, when its
//! init started, and the console's last lines.
//!
//! ```text
//! cargo run --example boot -- KERNEL INITRD [TIMEOUT_SECONDS]
//! ```

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tapir::{Console, VmBuilder};

/// A console sink the program can read after the run.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, initrd, rest @ ..] = args.as_slice() else {
        return Err("usage: boot KERNEL INITRD [TIMEOUT_SECONDS]".into());
    };
    let timeout = rest
        .first()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(60u64);

    let console = Captured::default();
    let vm = VmBuilder::new(kernel)
        .initrd(initrd)
        .vcpus(2)
        .memory_mib(256)
        .console(Console::Writer(Box::new(console.clone())))
        .build()?;

    let stop = vm.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        stop.stop();
    });

    let report = vm.run()?;
    let text =
        String::from_utf8_lossy(&console.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    println!("--- last console lines ---");
    for line in &lines[lines.len().saturating_sub(5)..] {
        println!("{}", line.trim_end());
    }
    println!("stopped: {}", report.reason);
    match report.guest_init_after {
        Some(t) => println!("guest init after {:.1} ms", t.as_secs_f64() * 1000.0),
        None => println!("guest init never signalled"),
    }
    if report.reason.is_clean() {
        Ok(())
    } else {
        Err(format!("the guest failed: {}", report.reason).into())
    }
}
