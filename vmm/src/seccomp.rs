//! The sandbox: once a Tapir thread has set itself up, it runs under a seccomp allow-list of the
//! system calls its work needs (the `seccompiler` crate builds the BPF programs), so that a guest
//! who found a way to run code in one of them could not open files, sockets or processes.
//!
//! The lists were taken from `strace -f` of full runs (boot, traffic on two NICs, driver resets,
//! console input, SIGTERM) and keep only what each kind of thread does after its set-up; ioctls are
//! limited to the requests each thread makes. A call outside its list is not carried out: the
//! SIGSYS handler makes it fail with EPERM, says which thread made which system call, and asks the
//! VM to stop, so Tapir exits through its usual clean-up (macvtaps deleted, terminal restored) with
//! an error that names the call.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vhost::vhost_kern::vhost_binding::{
    VHOST_GET_VRING_BASE, VHOST_NET_SET_BACKEND, VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE,
    VHOST_SET_VRING_ADDR, VHOST_SET_VRING_BASE, VHOST_SET_VRING_CALL, VHOST_SET_VRING_KICK,
    VHOST_SET_VRING_NUM,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// Which threads run sandboxed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// Tapir's own threads: vCPUs, devices, console (the embedding API's default: the thread that
    /// calls `run` is the embedding program's).
    #[default]
    Threads,
    /// Also the thread that calls `Vm::run`, from the moment the VM runs until the process ends
    /// (the CLI's default).
    All,
    /// None (for debugging: `--seccomp off`).
    Off,
}

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {0} thread's seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("compiling the {0} thread's seccomp filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("applying the {0} thread's seccomp filter")]
    Apply(&'static str, #[source] seccompiler::Error),
    #[error("installing the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Vcpu,
    Devices,
    ConsoleIn,
    ConsoleOut,
    Main,
    /// `tapir vhost-user-net`: a queue pair's thread (the frontend's rings and the macvtap).
    UserPair,
    /// `tapir vhost-user-net`: the thread that takes a frontend's connection and messages.
    UserServer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Vcpu => "vCPU",
            Kind::Devices => "devices",
            Kind::ConsoleIn => "console input",
            Kind::ConsoleOut => "console output",
            Kind::Main => "main",
            Kind::UserPair => "vhost-user pair",
            Kind::UserServer => "vhost-user server",
        }
    }
}

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, libc::c_int);

/// What every thread does: memory, locks, signals, time, logging to stderr, ending.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // limited to the requests of `ioctls`
    libc::SYS_ioctl,
];

/// What a thread that moves frames does, the devices thread and a vhost-user pair's alike: epoll,
/// eventfds (kicks, yields, exit), frames on the macvtap (readv/writev, and the poll that arms a
/// full queue's wakeup, `TapQueue::write_frame`), the coalescing timers.
const FRAMES: &[i64] = &[
    libc::SYS_timerfd_settime,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

fn calls(kind: Kind) -> &'static [i64] {
    match kind {
        // Nothing beyond the base: its ioctls are listed in `ioctls`.
        Kind::Vcpu => &[],
        // The data plane's calls, and epoll_ctl (the queues' fds join the event loop when the
        // driver starts the device and leave it at a reset).
        Kind::Devices => &[libc::SYS_epoll_ctl],
        Kind::ConsoleIn => &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll],
        Kind::ConsoleOut => &[],
        // The data plane's calls (the frontend's call eventfds take `write`).
        Kind::UserPair => &[],
        // A frontend's connection and its messages (with descriptors), the memory regions it
        // shares (their file's size and seals, mapped with `mmap`), the pairs' epoll sets.
        Kind::UserServer => &[
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_epoll_ctl,
        ],
        // The event loop, KVM's statistics, kicking and joining threads, the terminal, and the
        // netlink socket that deletes a macvtap Tapir created.
        Kind::Main => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_pread64,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
        ],
    }
}

/// The ioctl requests a kind of thread may make.
fn ioctls(kind: Kind) -> Vec<u64> {
    match kind {
        // The device's activation and reset run on the vCPU that wrote the status register:
        // offloads and queue attachment on the macvtap.
        Kind::Vcpu => vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            // the registers logged when the guest stops on a triple fault or an entry failure
            KVM_GET_SREGS(),
            KVM_GET_MP_STATE(),
            // the interrupt state a queue-state dump logs
            KVM_GET_LAPIC(),
            KVM_GET_VCPU_EVENTS(),
            TUNSETOFFLOAD(),
            TUNSETQUEUE(),
            // vhost=on: the rings handed to the kernel's vhost-net on activation, stopped on reset
            VHOST_SET_FEATURES(),
            VHOST_SET_MEM_TABLE(),
            VHOST_SET_VRING_NUM(),
            VHOST_SET_VRING_ADDR(),
            VHOST_SET_VRING_BASE(),
            VHOST_GET_VRING_BASE(),
            VHOST_SET_VRING_CALL(),
            VHOST_SET_VRING_KICK(),
            VHOST_NET_SET_BACKEND(),
        ],
        Kind::Devices => vec![TUNSETOFFLOAD(), TUNSETQUEUE()],
        // a pair's macvtap queue attached when the driver first uses it
        Kind::UserPair => vec![TUNSETQUEUE()],
        // offloads from the features a frontend acked; queues detached when it goes
        Kind::UserServer => vec![TUNSETOFFLOAD(), TUNSETQUEUE()],
        // TCSETS restores the terminal; KVM_GET_IRQCHIP reads the IOAPIC for a queue-state dump
        Kind::Main => vec![libc::TCSETS, KVM_GET_IRQCHIP()],
        Kind::ConsoleIn | Kind::ConsoleOut => Vec::new(),
    }
    .into_iter()
    // Any thread may log, and the logger asks whether stderr is a terminal.
    .chain([libc::TCGETS])
    .collect()
}

/// What a vCPU thread (the driver starts or resets a NIC) and the devices thread (its control
/// queue enables pairs) send and read on a vhost-user backend's socket: only in a VM that has one.
const VHOST_USER_CALLS: &[i64] = &[libc::SYS_sendmsg, libc::SYS_recvmsg];

fn filter(kind: Kind, vhost_user: bool) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind.name(), e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let socket = match (kind, vhost_user) {
        (Kind::Vcpu | Kind::Devices, true) => VHOST_USER_CALLS,
        _ => &[],
    };
    let frames = match kind {
        Kind::Devices | Kind::UserPair => FRAMES,
        _ => &[],
    };
    for &call in BASE.iter().chain(calls(kind)).chain(frames).chain(socket) {
        rules.insert(call, Vec::new());
    }
    // fcntl(fd, F_GETFD) only: debug builds of std check that a descriptor is open before they
    // close it. The vhost-user server also reads a shared memory file's seals (F_GET_SEALS).
    let fcntl = |command: i32| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, command as u64)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(build)
    };
    let mut fcntls = vec![fcntl(libc::F_GETFD)?];
    if kind == Kind::UserServer {
        fcntls.push(fcntl(libc::F_GET_SEALS)?);
    }
    rules.insert(libc::SYS_fcntl, fcntls);
    if let Some(ioctl_rules) = rules.get_mut(&libc::SYS_ioctl) {
        *ioctl_rules = ioctls(kind)
            .into_iter()
            .map(|request| {
                let cond =
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
                SeccompRule::new(vec![cond])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(build)?;
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(kind.name(), e))
}

/// The compiled filters of every kind of thread, built once before any thread starts (building
/// allocates; applying does not).
pub(crate) struct Filters {
    level: Seccomp,
    vcpu: BpfProgram,
    devices: BpfProgram,
    console_in: BpfProgram,
    console_out: BpfProgram,
    main: BpfProgram,
    /// The vhost-user daemon's pair and server threads', where built ([`Filters::daemon`]).
    user: Option<[BpfProgram; 2]>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filters")
            .field("level", &self.level)
            .field("daemon", &self.user.is_some())
            .finish_non_exhaustive()
    }
}

impl Filters {
    #[cfg(test)]
    pub fn new(level: Seccomp) -> Result<Arc<Self>, SeccompError> {
        Self::with(level, false)
    }

    /// The filters of a VM that has a NIC on a vhost-user backend (`vhost_user`) or not.
    pub fn with(level: Seccomp, vhost_user: bool) -> Result<Arc<Self>, SeccompError> {
        Self::build(level, vhost_user, false).map(Arc::new)
    }

    /// The filters of `tapir vhost-user-net`'s threads (its main thread runs unfiltered: it
    /// handles no frontend's data).
    pub fn daemon(level: Seccomp) -> Result<Arc<Self>, SeccompError> {
        Self::build(level, false, true).map(Arc::new)
    }

    fn build(level: Seccomp, vhost_user: bool, daemon: bool) -> Result<Self, SeccompError> {
        Ok(Self {
            level,
            vcpu: filter(Kind::Vcpu, vhost_user)?,
            devices: filter(Kind::Devices, vhost_user)?,
            console_in: filter(Kind::ConsoleIn, false)?,
            console_out: filter(Kind::ConsoleOut, false)?,
            main: filter(Kind::Main, false)?,
            user: if daemon {
                Some([
                    filter(Kind::UserPair, false)?,
                    filter(Kind::UserServer, false)?,
                ])
            } else {
                None
            },
        })
    }

    fn program(&self, kind: Kind) -> Option<&BpfProgram> {
        let on = match kind {
            Kind::Main => self.level == Seccomp::All,
            _ => self.level != Seccomp::Off,
        };
        if !on {
            return None;
        }
        match kind {
            Kind::Vcpu => Some(&self.vcpu),
            Kind::Devices => Some(&self.devices),
            Kind::ConsoleIn => Some(&self.console_in),
            Kind::ConsoleOut => Some(&self.console_out),
            Kind::Main => Some(&self.main),
            Kind::UserPair => self.user.as_ref().map(|u| &u[0]),
            Kind::UserServer => self.user.as_ref().map(|u| &u[1]),
        }
    }

    /// Puts the calling thread under the allow-list of `kind` (nothing when the level says so).
    pub fn apply(&self, kind: Kind) -> Result<(), SeccompError> {
        let Some(program) = self.program(kind) else {
            return Ok(());
        };
        install_sigsys_handler()?;
        THREAD_KIND.with(|k| k.set(kind.name()));
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Apply(kind.name(), e))
    }
}

/// Stack of every thread Tapir spawns. Smaller than a huge page on purpose: a 2 MiB stack (Rust's
/// default) that the kernel happens to place 2 MiB-aligned is backed by one transparent huge page
/// at its first touch under THP `always`, 2 MiB of RSS for a thread that uses a few KiB (seen in
/// the lab: 6.0 MiB outside guest RAM, 2 of them one stack). The deepest path, a vCPU thread
/// activating a device and logging, uses far less than this.
pub(crate) const THREAD_STACK: usize = 512 << 10;

/// Spawns a thread named `name` that puts itself under the allow-list of `kind` and then runs
/// `body`; returns once the filter is in place, or with the error that kept it from being applied.
pub(crate) fn spawn<F>(
    name: String,
    filters: &Arc<Filters>,
    kind: Kind,
    body: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let filters = filters.clone();
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let applied = filters.apply(kind);
            let ok = applied.is_ok();
            let _ = tx.send(applied);
            if ok {
                body();
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(std::io::Error::other(e))
        }
        Err(_) => {
            let _ = thread.join();
            Err(std::io::Error::other(
                "a new thread ended before it applied its seccomp filter",
            ))
        }
    }
}

thread_local! {
    /// The thread's kind, for the SIGSYS message (const-initialized: safe to read in a handler).
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("") };
}

/// Where the SIGSYS handler asks for a stop (the running VM's stop eventfd), and what it saw.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static DENIED: AtomicI64 = AtomicI64::new(-1);

/// While it lives, a system call refused by a filter stops the VM (or the vhost-user daemon)
/// through the eventfd `fd`.
#[derive(Debug)]
pub struct StopOnDenial(());

impl StopOnDenial {
    pub fn new(fd: i32) -> Self {
        STOP_FD.store(fd, Ordering::SeqCst);
        Self(())
    }
}

impl Drop for StopOnDenial {
    fn drop(&mut self) {
        STOP_FD.store(-1, Ordering::SeqCst);
    }
}

/// The system call a filter refused since the process started, if any.
pub(crate) fn denied_syscall() -> Option<i64> {
    let n = DENIED.load(Ordering::SeqCst);
    (n >= 0).then_some(n)
}

/// Offset of `si_syscall` in a SIGSYS siginfo_t on x86_64 (si_signo, si_errno, si_code, padding,
/// then `_sigsys { void *_call_addr; int _syscall; ... }`).
const SI_SYSCALL_OFFSET: usize = 0x18;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler a valid siginfo_t whose _sigsys member holds the
    // refused call's number at this offset.
    let call = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    DENIED.store(i64::from(call), Ordering::SeqCst);
    // SAFETY: `context` is this thread's ucontext_t; RSI holds the call's second argument (an
    // ioctl's request), and setting RAX sets the refused call's result.
    let arg1 = unsafe {
        let uc = context.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
        (*uc).uc_mcontext.gregs[libc::REG_RSI as usize]
    };
    let mut msg = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"tapir: seccomp: the ");
    put(THREAD_KIND.with(Cell::get).as_bytes());
    put(b" thread made system call ");
    let mut digits = [0u8; 20];
    put(format_u64(i64::from(call).unsigned_abs(), 10, &mut digits));
    if i64::from(call) == libc::SYS_ioctl || i64::from(call) == libc::SYS_fcntl {
        put(b" (argument 2: 0x");
        put(format_u64(arg1 as u64, 16, &mut digits));
        put(b")");
    }
    put(b", which its allow-list lacks; it failed with EPERM and Tapir stops\n");
    let one = 1u64.to_ne_bytes();
    // SAFETY: write(2) is async-signal-safe; both buffers are valid for their lengths.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len);
        let fd = STOP_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            libc::write(fd, one.as_ptr().cast(), one.len());
        }
    }
}

/// `n` in `base` (10 or 16) into the end of `buf`, without allocating (for the signal handler).
fn format_u64(mut n: u64, base: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        let digit = (n % base) as u8;
        buf[i] = if digit < 10 {
            b'0' + digit
        } else {
            b'a' + digit - 10
        };
        n /= base;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(SeccompError::Handler);
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn numbers_are_formatted_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(format_u64(0, 10, &mut buf), b"0");
        assert_eq!(format_u64(41, 10, &mut buf), b"41");
        assert_eq!(format_u64(0xae80, 16, &mut buf), b"ae80");
        assert_eq!(format_u64(u64::MAX, 10, &mut buf), b"18446744073709551615");
    }

    #[test]
    fn every_filter_builds() {
        for level in [Seccomp::Threads, Seccomp::All, Seccomp::Off] {
            let f = Filters::new(level).unwrap();
            assert_eq!(f.program(Kind::Main).is_some(), level == Seccomp::All);
            assert_eq!(f.program(Kind::Vcpu).is_some(), level != Seccomp::Off);
        }
    }

    /// In a thread of its own: the vCPU filter lets KVM_RUN's ioctl number through (it fails on
    /// a bad fd, not by the filter), refuses socket(2) and a foreign ioctl with EPERM through the
    /// SIGSYS handler, and records the refused call.
    #[test]
    fn a_call_outside_the_list_is_refused_and_reported() {
        let filters = Filters::new(Seccomp::Threads).unwrap();
        let t = spawn("seccomp-test".into(), &filters, Kind::Vcpu, || {
            // SAFETY: plain system calls with invalid arguments; nothing is touched.
            let (run, sock, tty) = unsafe {
                let run = libc::ioctl(-1, KVM_RUN() as _, 0);
                let run_errno = *libc::__errno_location();
                let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                let sock_errno = *libc::__errno_location();
                let tty = libc::ioctl(-1, libc::TCSETS as _, 0);
                let tty_errno = *libc::__errno_location();
                ((run, run_errno), (sock, sock_errno), (tty, tty_errno))
            };
            assert_eq!(run, (-1, libc::EBADF), "KVM_RUN reaches the kernel");
            assert_eq!(sock, (-1, libc::EPERM), "socket(2) is refused");
            assert_eq!(tty, (-1, libc::EPERM), "an ioctl the list lacks is refused");
        })
        .unwrap();
        t.join().expect("the sandboxed thread's checks");
        assert!(matches!(
            denied_syscall(),
            Some(n) if n == libc::SYS_socket || n == libc::SYS_ioctl
        ));
    }

    /// The threads that move frames (the devices thread, a vhost-user pair's) may make the calls
    /// `TapQueue::write_frame` makes on a full queue: writev fails with EAGAIN, then poll(2) arms
    /// the wakeup. (The daemon's pair threads lacked poll: the first full macvtap queue under a
    /// UDP flood stopped the daemon.)
    #[test]
    fn the_frame_moving_threads_may_wait_for_a_full_queue() {
        let filters = Filters::with(Seccomp::Threads, false).unwrap();
        for kind in [Kind::Devices, Kind::UserPair] {
            let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let t = spawn("seccomp-full".into(), &filters, kind, move || {
                let frame = [0x5au8; 1500];
                let iov = libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                };
                let mut sent = 0;
                let errno = loop {
                    // SAFETY: one iovec over a live buffer, on a socket this closure owns.
                    let rc = unsafe { libc::writev(ours.as_raw_fd(), &iov, 1) };
                    if rc < 0 {
                        // SAFETY: reading this thread's errno.
                        break unsafe { *libc::__errno_location() };
                    }
                    sent += 1;
                    assert!(sent < 1_000_000, "the socket never filled");
                };
                assert_eq!(
                    errno,
                    libc::EAGAIN,
                    "{kind:?}: writev until the queue is full"
                );
                let mut pfd = libc::pollfd {
                    fd: ours.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let polled = unsafe { libc::poll(&mut pfd, 1, 0) };
                assert_eq!(polled, 0, "{kind:?}: poll on the full queue (-1: refused)");
            })
            .unwrap();
            t.join().expect("the sandboxed thread's checks");
            drop(theirs);
        }
    }

    /// sendmsg(2) reaches the kernel from a vCPU or the devices thread only in a VM with a
    /// vhost-user NIC.
    #[test]
    fn vcpus_talk_to_a_vhost_user_backend_only_where_there_is_one() {
        for (vhost_user, kind) in [true, false]
            .into_iter()
            .flat_map(|v| [(v, Kind::Vcpu), (v, Kind::Devices)])
        {
            let filters = Filters::with(Seccomp::Threads, vhost_user).unwrap();
            let t = spawn("seccomp-vu".into(), &filters, kind, move || {
                // SAFETY: sendmsg on an invalid descriptor with an empty message; nothing is sent.
                let sent = unsafe {
                    let msg: libc::msghdr = std::mem::zeroed();
                    let rc = libc::sendmsg(-1, &msg, 0);
                    (rc, *libc::__errno_location())
                };
                let expected = if vhost_user { libc::EBADF } else { libc::EPERM };
                assert_eq!(sent, (-1, expected), "vhost_user {vhost_user} {kind:?}");
            })
            .unwrap();
            t.join().expect("the sandboxed thread's checks");
        }
    }
}
