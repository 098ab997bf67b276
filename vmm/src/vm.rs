//! A built VM and its run loop: vCPU threads, the device thread, the console input feeder, and
//! the main thread's event loop that waits for a stop reason, watches for a powered-off guest,
//! and then stops and joins every thread before returning (none of them for longer than a bound).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{VcpuFd, VmFd};
use tapir_devices::legacy::SerialPort;
use tapir_devices::virtio::net::{NetCounters, NetState, UserLink};
use tapir_devices::Bus;
use tapir_net_backend::netlink::{LinkEvent, LinkWatch};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::BOOT_TIMER_TARGET;
use crate::console::{InputPump, OutputQueue, RawTerminal};
use crate::device_loop::DeviceLoop;
use crate::device_manager::HostNic;
use crate::exit::{ExitReason, RunReport};
use crate::kvm_stats::{Stat, VcpuStats};
use crate::seccomp::{self, Filters, Kind, SeccompError};
use crate::vcpu::{self, Shared, Vcpu};
use crate::x86_64;

/// How often the main loop kicks the vCPUs to see whether the guest has powered off.
const HALT_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Consecutive checks that must find every vCPU asleep for good (the first after they fall asleep
/// sees the flags of no kick yet).
const HALT_CHECKS: u32 = 2;
/// How long stopping may take before Tapir gives up on a vCPU thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest's last console output may take to reach its sink once the VM stopped.
const CONSOLE_DRAIN: Duration = Duration::from_millis(500);

/// What can fail while the VM runs (not the guest: its failures are [`ExitReason`]s).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's event loop")]
    Events(#[from] event_manager::Error),
    #[error("putting the main thread in the sandbox")]
    Seccomp(#[from] SeccompError),
    #[error("a Tapir thread made system call {0}, which its seccomp allow-list lacks (run with --seccomp off to see whether it is the sandbox's fault)")]
    SyscallDenied(i64),
}

/// When the guest signalled that its init runs.
pub(crate) struct BootClock {
    pub start: Instant,
    pub marked: OnceLock<Duration>,
}

impl BootClock {
    pub fn mark(&self) {
        let elapsed = self.start.elapsed();
        if self.marked.set(elapsed).is_ok() {
            log::info!(
                target: BOOT_TIMER_TARGET,
                "guest init started {:.1} ms after tapir started",
                elapsed.as_secs_f64() * 1000.0
            );
        }
    }
}

/// Stops a running VM from another thread or a signal handler.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// Asks the VM to stop; `run` then returns [`ExitReason::Stopped`].
    pub fn stop(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("requesting a stop: {e}");
        }
    }
}

/// Writing an 8-byte 1 to this descriptor is `stop()`; a signal handler may do that (write(2) is
/// async-signal-safe, `stop()` itself may log).
impl AsRawFd for StopHandle {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Asks a running VM to log every NIC's queue state (the CLI's SIGUSR1).
#[derive(Clone, Debug)]
pub struct DumpHandle(Arc<EventFd>);

impl DumpHandle {
    /// Logs each NIC's [`NetState`] (warn level, target [`QUEUE_STATE_TARGET`]) from the VM's
    /// main loop.
    pub fn dump(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("requesting a queue-state dump: {e}");
        }
    }
}

/// Writing an 8-byte 1 to this descriptor is `dump()`, from a signal handler too.
impl AsRawFd for DumpHandle {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Log target of the queue-state dump.
pub const QUEUE_STATE_TARGET: &str = "tapir::queue_state";

/// One virtio-net device, as the embedding program sees it.
#[derive(Clone)]
pub struct NetInfo {
    /// `ethN (host interface)`.
    pub name: String,
    /// The MAC the guest sees (the macvtap's).
    pub mac: String,
    pub counters: Arc<NetCounters>,
    pub(crate) state: Arc<dyn Fn() -> NetState + Send + Sync>,
    /// The host interface's index, for its link news.
    pub(crate) ifindex: Option<u32>,
    /// The connection to the NIC's vhost-user backend, watched for the backend closing it.
    pub(crate) backend: Option<Arc<UserLink>>,
    /// Tells the device whether the host interface is up; true when that changed its status.
    pub(crate) set_link: Arc<dyn Fn(bool) -> bool + Send + Sync>,
}

impl NetInfo {
    /// The device's queues now: the device's positions next to the guest's rings, the RX stash,
    /// pending interrupt, driver errors (for a guest that went deaf).
    pub fn state(&self) -> NetState {
        (self.state)()
    }
}

impl std::fmt::Debug for NetInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetInfo")
            .field("name", &self.name)
            .field("mac", &self.mac)
            .finish()
    }
}

pub(crate) struct Parts {
    pub vm: VmFd,
    pub memory: GuestMemoryMmap,
    pub vcpus: Vec<VcpuFd>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub nics: Vec<HostNic>,
    pub net_infos: Vec<NetInfo>,
    pub serial: Arc<Mutex<SerialPort>>,
    pub serial_room: EventFd,
    pub console_input: bool,
    pub console_out: Option<Arc<OutputQueue>>,
    pub filters: Arc<Filters>,
    pub shared: Arc<Shared>,
    pub clock: Arc<BootClock>,
}

/// A VM ready to run. Made by [`crate::VmBuilder::build`].
pub struct Vm {
    // Field order is drop order: the VM file descriptor goes before the memory it maps.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    _memory: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    net_infos: Vec<NetInfo>,
    serial: Arc<Mutex<SerialPort>>,
    serial_room: EventFd,
    console_input: bool,
    console_out: Option<Arc<OutputQueue>>,
    filters: Arc<Filters>,
    shared: Arc<Shared>,
    clock: Arc<BootClock>,
    stop: StopHandle,
    dump: DumpHandle,
    // Last: a macvtap created for the VM goes when everything using it has gone.
    _nics: Vec<HostNic>,
}

/// Follows the NICs' host interfaces through rtnetlink's link news: one going down or away (a
/// macvtap goes with its lower device) clears the guest's LINK_UP, and coming back sets it again,
/// so the guest sees its carrier instead of sending into nothing.
struct LinkMonitor {
    watch: LinkWatch,
    nets: Vec<NetInfo>,
}

impl LinkMonitor {
    /// None when there is no interface to follow or no socket for the news (logged).
    fn new(nets: &[NetInfo]) -> Option<Self> {
        if nets.iter().all(|n| n.ifindex.is_none()) {
            return None;
        }
        match LinkWatch::open() {
            Ok(watch) => Some(LinkMonitor {
                watch,
                nets: nets.to_vec(),
            }),
            Err(e) => {
                log::warn!("the NICs' link status will not follow their host interfaces: {e}");
                None
            }
        }
    }
}

impl MutEventSubscriber for LinkMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.watch, EventSet::IN)) {
            log::error!("watching the link news socket: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let events = match self.watch.events() {
            Ok(events) => events,
            Err(e) => {
                tapir_devices::warn_limited!("reading link news: {e}");
                return;
            }
        };
        for event in events {
            let (index, up, what) = match event {
                LinkEvent::Changed { index, running } => (
                    index,
                    running,
                    if running { "is up again" } else { "went down" },
                ),
                LinkEvent::Deleted { index } => (
                    index,
                    false,
                    "was deleted (a macvtap goes with its lower device)",
                ),
            };
            for net in self.nets.iter().filter(|n| n.ifindex == Some(index)) {
                if (net.set_link)(up) {
                    tapir_devices::warn_limited!(
                        "{}: the host interface {what}; the guest's link is {}",
                        net.name,
                        if up { "up" } else { "down" }
                    );
                }
            }
        }
    }
}

/// Watches the vhost-user NICs' connections: a backend that closes its connection (it stopped or
/// crashed) takes the guest's link down with it, once, with a message naming its socket; Tapir does
/// not reconnect. Only hang-ups are watched: the messages on the socket belong to the requests.
struct BackendWatch {
    nets: Vec<NetInfo>,
}

impl MutEventSubscriber for BackendWatch {
    fn init(&mut self, ops: &mut EventOps) {
        for net in &self.nets {
            if let Some(link) = &net.backend {
                let watched = Events::new_raw(link.socket(), EventSet::READ_HANG_UP);
                if let Err(e) = ops.add(watched) {
                    log::error!("{}: watching its vhost-user connection: {e:?}", net.name);
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // (level-triggered: a hang-up is reported until the socket leaves the loop)
        let _ = ops.remove(events);
        let Some(net) = self.nets.iter().find(|n| {
            n.backend
                .as_ref()
                .is_some_and(|link| link.socket() == events.fd())
        }) else {
            return;
        };
        (net.set_link)(false);
        log::error!(
            "{}: the vhost-user backend closed the connection (it stopped or crashed); the NIC \
             carries no more frames and the guest's link is down (Tapir does not reconnect)",
            net.name
        );
    }
}

/// Wakes the main loop for the exit latch and turns a stop request into a stop reason.
struct Control {
    wake: EventFd,
    stop: Arc<EventFd>,
    dump: Arc<EventFd>,
    nets: Vec<NetInfo>,
    /// The exit latch and the dump flags.
    shared: Arc<Shared>,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.wake, self.stop.as_ref(), self.dump.as_ref()] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("watching a control eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.stop.as_raw_fd() {
            let _ = self.stop.read();
            self.shared.latch.request(ExitReason::Stopped);
        } else if events.fd() == self.dump.as_raw_fd() {
            let _ = self.dump.read();
            for net in &self.nets {
                let counters: Vec<String> = net
                    .counters
                    .snapshot()
                    .fields()
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                log::warn!(
                    target: QUEUE_STATE_TARGET,
                    "queue state of {}\n{}    counters: {}",
                    net.name,
                    net.state(),
                    counters.join(" ")
                );
            }
            // The interrupt controllers' side follows from the main loop, which can kick the vCPUs.
            self.shared.dump_requested.store(true, Ordering::Release);
        } else {
            let _ = self.wake.read();
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Vm {
    pub(crate) fn new(p: Parts) -> std::io::Result<Self> {
        Ok(Self {
            vcpus: p.vcpus,
            vm: p.vm,
            _memory: p.memory,
            pio: p.pio,
            mmio: p.mmio,
            subscribers: p.subscribers,
            net_infos: p.net_infos,
            _nics: p.nics,
            serial: p.serial,
            serial_room: p.serial_room,
            console_input: p.console_input,
            console_out: p.console_out,
            filters: p.filters,
            shared: p.shared,
            clock: p.clock,
            stop: StopHandle(Arc::new(EventFd::new(libc::EFD_NONBLOCK)?)),
            dump: DumpHandle(Arc::new(EventFd::new(libc::EFD_NONBLOCK)?)),
        })
    }

    /// The virtio-net devices, with live counters.
    pub fn nets(&self) -> &[NetInfo] {
        &self.net_infos
    }

    /// A handle that stops the VM once it runs; get it before calling `run`.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// A handle that has the running VM log every NIC's queue state; get it before `run`.
    pub fn dump_handle(&self) -> DumpHandle {
        self.dump.clone()
    }

    /// Runs the guest until it stops, and returns why. Everything the run started (vCPU threads,
    /// the console feeder, raw terminal mode) is over when it returns.
    pub fn run(mut self) -> Result<RunReport, RunError> {
        let io = |what| move |source| RunError::Io { what, source };
        vcpu::install_kick_handler().map_err(io("installing the vCPU kick signal handler"))?;
        let latch = self.shared.latch.clone();

        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
        events.add_subscriber(Arc::new(Mutex::new(Control {
            wake: latch
                .wake_fd()
                .try_clone()
                .map_err(io("cloning the exit eventfd"))?,
            stop: self.stop.0.clone(),
            dump: self.dump.0.clone(),
            nets: self.net_infos.clone(),
            shared: self.shared.clone(),
        })));
        if let Some(monitor) = LinkMonitor::new(&self.net_infos) {
            events.add_subscriber(Arc::new(Mutex::new(monitor)));
        }
        if self.net_infos.iter().any(|n| n.backend.is_some()) {
            events.add_subscriber(Arc::new(Mutex::new(BackendWatch {
                nets: self.net_infos.clone(),
            })));
        }
        // A system call a filter refuses stops the VM through the stop eventfd.
        let _denial = seccomp::StopOnDenial::new(self.stop.0.as_raw_fd());
        let devices = DeviceLoop::start(std::mem::take(&mut self.subscribers), &self.filters)
            .map_err(io("starting the device thread"))?;

        // Raw mode only once the VM runs, and restored by drop on every way out of this function.
        let (_raw, _pump) = if self.console_input {
            let raw = RawTerminal::enter(libc::STDIN_FILENO)
                .map_err(io("putting the terminal in raw mode"))?;
            let room = self
                .serial_room
                .try_clone()
                .map_err(io("cloning an eventfd"))?;
            let pump = InputPump::start(
                libc::STDIN_FILENO,
                self.serial.clone(),
                room,
                raw.is_some(),
                latch.clone(),
                &self.filters,
            )
            .map_err(io("starting the console input thread"))?;
            (raw, Some(pump))
        } else {
            (None, None)
        };

        let sleep = SleepProbe::new(&self.vcpus);
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let vcpu = Vcpu {
                index: index as u8,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                shared: self.shared.clone(),
            };
            match vcpu.spawn(&self.filters) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_vcpus(&self.shared, threads);
                    return Err(RunError::Io {
                        what: "starting a vCPU thread",
                        source: e,
                    });
                }
            }
        }

        // The calling thread last: the threads above are started, and it only waits from here on.
        let result = match self.filters.apply(Kind::Main) {
            Ok(()) => self.wait_for_stop(&mut events, &threads, &sleep, &devices),
            Err(e) => Err(e.into()),
        };
        stop_vcpus(&self.shared, threads);
        devices.stop();
        if let Some(out) = &self.console_out {
            if !out.drain(CONSOLE_DRAIN) {
                log::warn!("the console's sink did not take the guest's last output in time");
            }
            if out.dropped() > 0 {
                log::warn!(
                    "{} bytes of guest console output were dropped: the sink did not keep up",
                    out.dropped()
                );
            }
        }
        result?;
        if let Some(call) = seccomp::denied_syscall() {
            return Err(RunError::SyscallDenied(call));
        }
        let reason = latch.reason().unwrap_or(ExitReason::Stopped);
        Ok(RunReport {
            reason,
            guest_init_after: self.clock.marked.get().copied(),
            nets: self
                .net_infos
                .iter()
                .map(|n| (n.name.clone(), n.counters.snapshot()))
                .collect(),
        })
    }

    fn wait_for_stop(
        &self,
        events: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        threads: &[JoinHandle<()>],
        sleep: &SleepProbe,
        devices: &DeviceLoop,
    ) -> Result<(), RunError> {
        let latch = &self.shared.latch;
        let halted = &self.shared.halted;
        let mut next_check = Instant::now() + HALT_CHECK_INTERVAL;
        let mut halted_checks = 0;
        while latch.reason().is_none() {
            let wait = next_check.saturating_duration_since(Instant::now());
            events.run_with_timeout(wait.as_millis() as i32)?;
            if self.shared.dump_requested.swap(false, Ordering::AcqRel) {
                log::warn!(
                    target: QUEUE_STATE_TARGET,
                    "{}",
                    x86_64::describe_ioapic(&self.vm)
                );
                self.shared
                    .dump
                    .iter()
                    .for_each(|d| d.store(true, Ordering::Release));
                threads.iter().for_each(vcpu::kick);
            }
            if Instant::now() < next_check {
                continue;
            }
            next_check += HALT_CHECK_INTERVAL;
            // A kick that reached a vCPU thread outside KVM_RUN is lost: kick again until every
            // vCPU has logged its part of a dump.
            for (thread, dump) in threads.iter().zip(&self.shared.dump) {
                if dump.load(Ordering::Acquire) {
                    vcpu::kick(thread);
                }
            }
            if devices.is_finished() {
                latch.request(ExitReason::DevicesFailed);
                continue;
            }
            // A vCPU thread reports why it stops before it ends; one that ended silently panicked.
            if let Some(vcpu) = threads.iter().position(|t| t.is_finished()) {
                latch.request(ExitReason::VcpuFailed {
                    vcpu: vcpu as u8,
                    exit: "its thread ended without a reason (it panicked)".into(),
                });
                continue;
            }
            // A running vCPU is never kicked: only when all of them sleep in KVM is it worth asking
            // whether they sleep for good. The flags were set when the previous check kicked them.
            if !sleep.all_asleep() {
                halted_checks = 0;
                halted
                    .iter()
                    .for_each(|h| h.store(false, Ordering::Release));
                continue;
            }
            if halted.iter().all(|h| h.load(Ordering::Acquire)) {
                halted_checks += 1;
                if halted_checks >= HALT_CHECKS {
                    latch.request(ExitReason::Halted);
                }
            } else {
                halted_checks = 0;
            }
            threads.iter().for_each(vcpu::kick);
        }
        Ok(())
    }
}

/// Tells whether every vCPU sleeps in KVM (HLT or waiting for INIT/SIPI), from KVM's `blocking`
/// statistic, without interrupting them. Interrupting a running vCPU is not free, and a nested
/// hypervisor (QEMU's TCG SVM in the KVM lab) occasionally breaks the guest when KVM_RUN is
/// interrupted mid-flight; kicking a vCPU that sleeps in KVM never enters the guest.
struct SleepProbe {
    /// None on kernels without binary stats: then every check counts as asleep and kicks.
    stats: Option<Vec<(VcpuStats, Stat)>>,
}

impl SleepProbe {
    fn new(vcpus: &[VcpuFd]) -> Self {
        let stats = vcpus
            .iter()
            .map(|fd| {
                let stats = VcpuStats::open(fd).ok()?;
                let blocking = stats.find("blocking")?;
                Some((stats, blocking))
            })
            .collect::<Option<Vec<_>>>();
        if stats.is_none() {
            log::debug!("no KVM 'blocking' statistic: the poweroff check kicks the vCPUs");
        }
        Self { stats }
    }

    fn all_asleep(&self) -> bool {
        match &self.stats {
            Some(stats) => stats
                .iter()
                .all(|(s, blocking)| s.read(*blocking).is_ok_and(|v| v != 0)),
            None => true,
        }
    }
}

/// Tells every vCPU thread to stop, kicks until they have, and joins them.
fn stop_vcpus(shared: &Shared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    let deadline = Instant::now() + STOP_TIMEOUT;
    // A kick that lands just before a thread enters KVM_RUN is lost, so kick until all are out.
    while threads.iter().any(|t| !t.is_finished()) {
        if Instant::now() > deadline {
            log::error!("vCPU threads did not stop within {STOP_TIMEOUT:?}; leaving them");
            return;
        }
        threads.iter().for_each(vcpu::kick);
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}
