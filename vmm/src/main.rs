//! `tapir`: the command line over the embedding API. It parses arguments, sets up logging and the
//! stop signals, builds the VM, runs it, and turns the outcome into one line and an exit status.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Instant;

use clap::{ArgAction, Args, Parser, Subcommand};
use tapir::{
    Console, ExitReason, NicSpec, RunReport, Seccomp, VmBuilder, BOOT_TIMER_TARGET,
    DEFAULT_CMDLINE, DEFAULT_MEMORY_MIB,
};

const EXIT_ERROR: u8 = 1;
const EXIT_STATUS_HELP: &str = "Exit status: 0 when the guest reboots or powers off or Tapir is \
    stopped (SIGINT, SIGTERM, SIGHUP, or Ctrl-A x on the console); 1 when Tapir cannot set up or \
    run the VM; 2 for a bad command line; 3 when the guest fails (kernel panic, triple fault, a \
    vCPU exit Tapir cannot handle).";
const EXIT_GUEST_FAILED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "tapir",
    version,
    about = "A small KVM virtual machine monitor with a macvtap-backed virtio-net device",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// More log output: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a Linux kernel and run it until it reboots or powers off.
    ///
    /// SIGUSR1 logs every NIC's queue state (the device's positions next to the guest's rings,
    /// the RX stash, a pending interrupt, driver errors, counters), then the IOAPIC's pins and each
    /// vCPU's interrupt state (sleeping, interrupts on, local APIC IRR and ISR).
    ///
    /// Example: tapir run --kernel guest-images/out/bzImage --initrd guest-images/out/initramfs.cpio.gz --cpus 2
    #[command(after_help = EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Serve one NIC's macvtap to another VMM as a vhost-user-net backend.
    ///
    /// Listens on SOCKET and serves one frontend at a time (QEMU's `-netdev vhost-user`, Cloud
    /// Hypervisor, ...) with Tapir's own data plane: MRG_RXBUF, EVENT_IDX, the offloads the
    /// macvtap takes, and with `queues=N` in SPEC one macvtap queue per pair (the frontend needs
    /// `queues=N` too). The frontend's guest must use the macvtap's MAC, which is printed at start
    /// (give `mac=` in SPEC to choose it for `link=`). When a frontend goes away the next one is
    /// served. The frontend's guest memory must be shared (e.g. QEMU's `-object
    /// memory-backend-memfd,share=on`) and sealed against shrinking (memfd's default in QEMU).
    /// SIGINT, SIGTERM or SIGHUP end it: the socket and a macvtap it created are removed.
    /// SIGUSR1 logs each ring's state (the daemon's positions next to the guest's rings).
    ///
    /// Example: tapir vhost-user-net --socket /run/tapir-net0.sock --net link=eth1,mode=bridge
    #[command(name = "vhost-user-net", after_help = DAEMON_STATUS_HELP)]
    VhostUserNet(UserNetArgs),
}

const DAEMON_STATUS_HELP: &str = "Exit status: 0 when stopped by a signal; 1 when the NIC or the \
    socket cannot be set up or served; 2 for a bad command line.";

#[derive(Args, Debug)]
struct UserNetArgs {
    /// Where frontends connect (a Unix socket; a stale one there is replaced, any other file is
    /// not).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The socket's permissions, in octal.
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// The NIC to serve, as `tapir run --net` takes it (`vhost=` does not apply; `coalesce=US`
    /// does: interrupts due within US microseconds of a pair's last one share it, and TX is
    /// polled US later instead of the guest notifying each frame; default 100, 0 for none).
    #[arg(long = "net", value_name = "SPEC")]
    net: NicSpec,
    /// Print the NIC's counters when the daemon stops.
    #[arg(long)]
    stats: bool,
    /// Run the daemon's pair and serving threads under seccomp allow-lists of the system calls
    /// they need (`on`); a call outside them fails and stops the daemon with a message naming
    /// it. `off` is for debugging.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = ArgAction::Set)]
    seccomp: bool,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode from 0 to 777"))
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The guest kernel: an ELF vmlinux or a bzImage with a 64-bit entry point.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// The initramfs, loaded as high in memory below 3.25 GiB as the kernel allows.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// The whole kernel command line.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1 to 32, and no more than KVM allows).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB (at least 32); above 3328 MiB the rest is placed above 4 GiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Serial console: `stdio` (output to stdout, stdin to the guest, raw mode on a terminal;
    /// Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A), `none`, or `file=PATH` (output only).
    #[arg(long, value_name = "stdio|none|file=PATH", default_value = "stdio", value_parser = parse_console)]
    console: ConsoleArg,
    /// A virtio-net device on a host NIC, repeatable (eth0, eth1... in order): `macvtap=NAME`,
    /// `link=LOWER[,mode=bridge|vepa|private|passthru][,host=ADDR/PREFIX]` (a macvtap created with
    /// the guest's MAC and deleted on exit; `host=` adds a bridge-mode macvlan on LOWER holding ADDR,
    /// so the host reaches the guest, which it cannot through LOWER's own address), `tap=NAME` or
    /// `fd=N`; each with optional `,mac=MAC` (the guest's MAC always equals the macvtap's) and
    /// `,queues=N` (1-16 queue pairs, one macvtap queue each; the guest picks how many it uses
    /// through the control queue), `,vhost=on|off` (default off: Tapir moves the frames itself;
    /// `on`: the host kernel's vhost-net does, one /dev/vhost-net per queue pair) and
    /// `,coalesce=US` (Tapir's own data plane: interrupts due within US microseconds of the last
    /// one share it, and TX is polled US later instead of the guest notifying each frame; default
    /// 100, 0 for none). `vhost-user=PATH[,queues=N][,mac=MAC]`: the NIC's rings are served by a
    /// vhost-user-net backend listening on the Unix socket PATH (`tapir vhost-user-net`, Cloud
    /// Hypervisor's, a DPDK or OVS switch); guest RAM is then a sealed memfd the backend maps,
    /// the guest's MAC is the backend's (from its configuration space) unless `mac=` says.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<NicSpec>,
    /// Print each NIC's counters (frames, bytes, offloaded frames, notifications, interrupts...)
    /// when the VM stops.
    #[arg(long)]
    stats: bool,
    /// Log the time from Tapir's start to the guest init's boot marker (a write of 0x54 to I/O
    /// port 0x402, as the test guest's init does).
    #[arg(long)]
    boot_timer: bool,
    /// Run every Tapir thread under a seccomp allow-list of the system calls it needs, once the VM
    /// runs (`on`); a call outside it fails and stops Tapir with a message naming it. `off` is for
    /// debugging.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = ArgAction::Set)]
    seccomp: bool,
    /// Describe the machine with ACPI tables (`on`): a MADT with the vCPUs, a DSDT with every
    /// virtio-mmio NIC, COM1 and the i8042, and sleep and reset registers, so a stock distribution
    /// kernel finds its NICs and `poweroff`/`reboot` end Tapir at once. Kernels without ACPI keep
    /// using the MP table and the command line's `virtio_mmio.device=` entries, which Tapir always
    /// writes. `off` leaves the tables out.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = ArgAction::Set)]
    acpi: bool,
    /// Back guest RAM with transparent huge pages (`on`): 2 MiB-aligned and advised MADV_HUGEPAGE,
    /// so KVM maps the guest with 2 MiB pages and the guest takes far fewer nested page faults
    /// (the host's /sys/kernel/mm/transparent_hugepage setting still decides). `off` uses 4 KiB
    /// pages, as Tapir did before.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = ArgAction::Set)]
    huge_pages: bool,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ConsoleArg {
    Stdio,
    None,
    File(PathBuf),
}

fn parse_console(s: &str) -> Result<ConsoleArg, String> {
    match s {
        "stdio" => Ok(ConsoleArg::Stdio),
        "none" => Ok(ConsoleArg::None),
        _ => match s.strip_prefix("file=") {
            Some("") => Err("file= needs a path".into()),
            Some(path) => Ok(ConsoleArg::File(path.into())),
            None => Err(format!("{s:?} is not stdio, none or file=PATH")),
        },
    }
}

/// Where the signal handler writes: the VM's stop handle, and which signal came.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Where SIGUSR1's handler writes: the VM's dump handle.
static DUMP_FD: AtomicI32 = AtomicI32::new(-1);

/// Set by SIGUSR1's handler for `vhost-user-net`, whose main thread waits on one eventfd for
/// both signals.
static DUMP_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_dump_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    DUMP_ASKED.store(true, Ordering::Relaxed);
    let fd = DUMP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is valid for 8 bytes.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

extern "C" fn on_stop_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(signal, Ordering::Relaxed);
    let fd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is valid for 8 bytes.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

fn init_logging(verbose: u8, boot_timer: bool) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if boot_timer {
        builder.filter_module(BOOT_TIMER_TARGET, level.max(log::LevelFilter::Info));
    }
    builder.format_timestamp_millis();
    builder.parse_default_env();
    builder.init();
}

/// "what failed: why: why", skipping a cause that its parent's message already spells out (some
/// library errors print their source themselves).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// The NICs' counters side by side, one row per counter.
fn stats_table(report: &RunReport) -> String {
    let mut out = String::new();
    let Some((_, first)) = report.nets.first() else {
        return "no NICs\n".into();
    };
    out.push_str(&format!("{:>18}", "counter"));
    for (name, _) in &report.nets {
        out.push_str(&format!(" {name:>20}"));
    }
    out.push('\n');
    for (row, (counter, _)) in first.fields().iter().enumerate() {
        out.push_str(&format!("{counter:>18}"));
        for (_, stats) in &report.nets {
            out.push_str(&format!(" {:>20}", stats.fields()[row].1));
        }
        out.push('\n');
    }
    out
}

fn run(args: RunArgs, start: Instant) -> Result<ExitReason, Box<dyn std::error::Error>> {
    let stats = args.stats;
    let console = match args.console {
        ConsoleArg::Stdio => Console::Stdio,
        ConsoleArg::None => Console::None,
        ConsoleArg::File(path) => Console::File(path),
    };
    let mut builder = VmBuilder::new(&args.kernel)
        .cmdline(args.cmdline)
        .vcpus(args.cpus)
        .memory_mib(args.memory)
        .console(console)
        .acpi(args.acpi)
        .huge_pages(args.huge_pages)
        .seccomp(if args.seccomp {
            Seccomp::All
        } else {
            Seccomp::Off
        })
        .start_instant(start);
    if let Some(initrd) = args.initrd {
        builder = builder.initrd(initrd);
    }
    for spec in args.nets {
        builder = builder.net(spec);
    }
    // The stop signals are caught before any host state exists (a macvtap for link=, a device
    // node): a signal during set-up lets it finish and then stops the VM at once, so everything
    // is removed as on any other stop.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal)
            .map_err(|e| format!("installing the {} handler: {e}", signal_name(signal)))?;
    }
    vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_dump_signal)
        .map_err(|e| format!("installing the SIGUSR1 handler: {e}"))?;
    let vm = builder.build()?;
    DUMP_FD.store(vm.dump_handle().as_raw_fd(), Ordering::Relaxed);
    let stop = vm.stop_handle();
    STOP_FD.store(stop.as_raw_fd(), Ordering::Relaxed);
    if STOP_SIGNAL.load(Ordering::Relaxed) != 0 {
        stop.stop();
    }
    let report = vm.run()?;
    STOP_FD.store(-1, Ordering::Relaxed);
    DUMP_FD.store(-1, Ordering::Relaxed);
    if stats {
        use std::io::Write;
        let _ = write!(
            std::io::stderr(),
            "tapir: NIC counters\n{}",
            stats_table(&report)
        );
    }
    Ok(report.reason)
}

/// Runs the vhost-user-net daemon until a stop signal (returned) or an error serving.
fn serve_vhost_user(args: UserNetArgs) -> Result<i32, Box<dyn std::error::Error>> {
    use vmm_sys_util::eventfd::EventFd;
    let woken = EventFd::new(0).map_err(|e| format!("creating an eventfd: {e}"))?;
    STOP_FD.store(woken.as_raw_fd(), Ordering::Relaxed);
    // Caught before any host state exists, as for `run`: set-up finishes, then everything goes.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal)
            .map_err(|e| format!("installing the {} handler: {e}", signal_name(signal)))?;
    }
    // SAFETY: umask only changes this process's file creation mask; the socket is the only file
    // the daemon creates.
    unsafe { libc::umask(!args.socket_mode & 0o777) };
    let seccomp = if args.seccomp {
        tapir::Seccomp::Threads
    } else {
        tapir::Seccomp::Off
    };
    let daemon = tapir::UserNetDaemon::new(&args.socket, &args.net, seccomp)?;
    say(&format!(
        "vhost-user-net: serving {} on {}",
        daemon.description(),
        args.socket.display()
    ));
    let wake = woken
        .try_clone()
        .map_err(|e| format!("cloning an eventfd: {e}"))?;
    let (serving, _denials) = daemon.serve_on_thread(wake, woken.as_raw_fd())?;
    let ended = || serving.lock().map_or(true, |slot| slot.is_some());
    // SIGUSR1 logs the rings' state (the same eventfd wakes this thread; the flag says why).
    DUMP_FD.store(woken.as_raw_fd(), Ordering::Relaxed);
    DUMP_ASKED.store(false, Ordering::Relaxed);
    vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_dump_signal)
        .map_err(|e| format!("installing the SIGUSR1 handler: {e}"))?;
    while STOP_SIGNAL.load(Ordering::Relaxed) == 0
        && !ended()
        && tapir::UserNetDaemon::denied_syscall().is_none()
    {
        let _ = woken.read();
        if DUMP_ASKED.swap(false, Ordering::Relaxed) {
            log::warn!("vhost-user-net: state on SIGUSR1:\n{}", daemon.state());
        }
    }
    STOP_FD.store(-1, Ordering::Relaxed);
    DUMP_FD.store(-1, Ordering::Relaxed);
    if args.stats {
        use std::io::Write;
        let _ = write!(
            std::io::stderr(),
            "tapir: NIC counters\n{}",
            daemon.counters().snapshot()
        );
    }
    // The socket, the pairs' threads and a macvtap created for link= go with the daemon; a
    // frontend still connected sees its socket close when the process ends.
    drop(daemon);
    if let Some(call) = tapir::UserNetDaemon::denied_syscall() {
        return Err(tapir::UserNetError::Denied(call).into());
    }
    let signal = STOP_SIGNAL.load(Ordering::Relaxed);
    if signal == 0 {
        // woken by the serving thread: it can only have failed
        let failed = serving.lock().ok().and_then(|mut slot| slot.take());
        return Err(failed.map_or_else(|| "the serving thread ended".into(), Into::into));
    }
    Ok(signal)
}

/// One line on stderr. A closed stderr (a reader that went away) must not turn into a panic, as
/// `eprintln!` would.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "tapir: {line}");
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::VhostUserNet(args) => {
            init_logging(cli.verbose, false);
            return match serve_vhost_user(args) {
                Ok(signal) => {
                    say(&format!(
                        "vhost-user-net: stopped by {}",
                        signal_name(signal)
                    ));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say(&format!("error: {}", error_chain(e.as_ref())));
                    ExitCode::from(EXIT_ERROR)
                }
            };
        }
    };
    init_logging(cli.verbose, args.boot_timer);
    match run(args, start) {
        Ok(reason) => {
            let signal = STOP_SIGNAL.load(Ordering::Relaxed);
            if reason == ExitReason::Stopped && signal != 0 {
                say(&format!("stopped by {}", signal_name(signal)));
            } else {
                say(&reason.to_string());
            }
            if reason.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_GUEST_FAILED)
            }
        }
        Err(e) => {
            say(&format!("error: {}", error_chain(e.as_ref())));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tapir").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_every_option_and_has_defaults() {
        let cli = parse(&[
            "run",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--cmdline",
            "console=ttyS0",
            "--cpus",
            "4",
            "--memory",
            "512",
            "--console",
            "file=/tmp/c",
            "--boot-timer",
            "-vv",
            "--net",
            "macvtap=mvt0",
            "--net",
            "link=lower0,mode=vepa,mac=52:54:00:00:00:09",
            "--stats",
        ])
        .unwrap();
        assert_eq!(cli.verbose, 2);
        let a = run_args(cli);
        assert_eq!(
            (a.kernel, a.initrd),
            (PathBuf::from("k"), Some(PathBuf::from("i")))
        );
        assert_eq!((a.cpus, a.memory, a.boot_timer), (4, 512, true));
        assert_eq!(a.console, ConsoleArg::File("/tmp/c".into()));
        assert_eq!(a.nets.len(), 2);
        assert_eq!(
            a.nets[1].to_string(),
            "link=lower0,mode=vepa,mac=52:54:00:00:00:09"
        );
        assert!(a.stats);
        assert!(a.seccomp, "the sandbox is on by default");
        let a = run_args(parse(&["run", "--kernel", "k", "--seccomp", "off"]).unwrap());
        assert!(!a.seccomp);
        let a = run_args(parse(&["run", "--kernel", "k"]).unwrap());
        assert!(a.acpi, "ACPI tables by default");
        let a = run_args(parse(&["run", "--kernel", "k", "--acpi", "off"]).unwrap());
        assert!(!a.acpi);
        let a = run_args(parse(&["run", "--kernel", "k"]).unwrap());
        assert!(a.huge_pages, "huge pages by default");
        let a = run_args(parse(&["run", "--kernel", "k", "--huge-pages", "off"]).unwrap());
        assert!(!a.huge_pages);
        assert!(parse(&["run", "--kernel", "k", "--acpi", "yes"]).is_err());
        assert!(parse(&["run", "--kernel", "k", "--seccomp", "maybe"]).is_err());

        let a = run_args(parse(&["run", "--kernel", "k"]).unwrap());
        assert_eq!(
            (a.cpus, a.memory, a.console),
            (1, DEFAULT_MEMORY_MIB, ConsoleArg::Stdio)
        );
        assert_eq!(a.cmdline, DEFAULT_CMDLINE);
    }

    fn run_args(cli: Cli) -> RunArgs {
        match cli.command {
            Command::Run(a) => a,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn vhost_user_net_takes_a_socket_a_mode_and_one_nic() {
        let cli = parse(&["vhost-user-net", "--socket", "/s", "--net", "link=lower0"]).unwrap();
        let Command::VhostUserNet(a) = cli.command else {
            panic!("not vhost-user-net: {:?}", cli.command);
        };
        assert_eq!(a.socket, PathBuf::from("/s"));
        assert_eq!(a.socket_mode, 0o600, "owner only by default");
        assert_eq!(a.net.to_string(), "link=lower0,mode=bridge");
        assert!(!a.stats);
        assert!(a.seccomp, "sandboxed by default");
        let cli = parse(&[
            "vhost-user-net",
            "--socket",
            "/s",
            "--net",
            "macvtap=mvt0,queues=2",
            "--socket-mode",
            "660",
            "--seccomp",
            "off",
        ])
        .unwrap();
        let Command::VhostUserNet(a) = cli.command else {
            panic!("not vhost-user-net");
        };
        assert_eq!(a.socket_mode, 0o660);
        assert!(!a.seccomp);
        for bad in ["8", "1000", "rw", ""] {
            let err = parse(&[
                "vhost-user-net",
                "--socket",
                "/s",
                "--net",
                "fd=3",
                "--socket-mode",
                bad,
            ])
            .unwrap_err();
            assert!(err.to_string().contains("octal mode"), "{bad}: {err}");
        }
        assert!(
            parse(&["vhost-user-net", "--net", "fd=3"]).is_err(),
            "the socket is required"
        );
    }

    #[test]
    fn bad_arguments_are_usage_errors_that_name_the_problem() {
        use clap::error::ErrorKind;
        let cases: [(&[&str], ErrorKind, &str); 8] = [
            (
                &["run", "--kernel", "k", "--net", "eth0"],
                ErrorKind::ValueValidation,
                "eth0",
            ),
            (
                &["run", "--kernel", "k", "--net", "macvtap=m,mac=zz"],
                ErrorKind::ValueValidation,
                "zz",
            ),
            (&["run"], ErrorKind::MissingRequiredArgument, "--kernel"),
            (
                &["run", "--kernel", "k", "--cpus", "two"],
                ErrorKind::ValueValidation,
                "two",
            ),
            (
                &["run", "--kernel", "k", "--memory", "-1"],
                ErrorKind::UnknownArgument,
                "-1",
            ),
            (
                &["run", "--kernel", "k", "--console", "tty"],
                ErrorKind::ValueValidation,
                "stdio, none or file=PATH",
            ),
            (
                &["run", "--kernel", "k", "--console", "file="],
                ErrorKind::ValueValidation,
                "needs a path",
            ),
            (&["boot"], ErrorKind::InvalidSubcommand, "boot"),
        ];
        for (args, kind, text) in cases {
            let err = parse(args).unwrap_err();
            assert_eq!(err.kind(), kind, "{args:?}");
            assert!(err.to_string().contains(text), "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn console_specs() {
        assert_eq!(parse_console("stdio"), Ok(ConsoleArg::Stdio));
        assert_eq!(parse_console("none"), Ok(ConsoleArg::None));
        assert_eq!(
            parse_console("file=a b"),
            Ok(ConsoleArg::File("a b".into()))
        );
        assert!(parse_console("").is_err());
    }

    #[test]
    fn error_chain_names_every_cause() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = tapir::LoadError::Open {
            what: "kernel",
            path: "/x".into(),
            source: inner,
        };
        assert_eq!(error_chain(&err), "opening kernel /x: No such file");

        #[derive(Debug, thiserror::Error)]
        #[error("loading: {0}")]
        struct Repeats(#[source] std::io::Error);
        let err = Repeats(std::io::Error::other("bad entry"));
        assert_eq!(
            error_chain(&err),
            "loading: bad entry",
            "a repeated cause is said once"
        );
    }
}
