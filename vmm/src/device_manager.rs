//! The virtio-mmio devices' place in the machine: each gets an MMIO window and an IRQ (its slot),
//! is announced to the guest on the kernel command line (`virtio_mmio.device=`) and in the ACPI
//! tables, and is wired to KVM: its QueueNotify register as ioeventfds (one per queue, matched on
//! the queue index), its interrupt as an irqfd, its transport on the MMIO bus, and the device
//! itself in the event loop. `VmBuilder::build` asks for the slots first (the command line and the
//! tables are written before KVM exists) and attaches the NICs once the VM is there.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use tapir_devices::virtio::mmio::MMIO_WINDOW;
use tapir_devices::virtio::net::{Net, UserLink, UserQueue, VhostPair};
use tapir_devices::virtio::{Interrupt, MmioTransport};
use tapir_devices::Bus;
use tapir_net_backend::nic::NicKind;
use tapir_net_backend::{offload, MacAddr, NetBackend, Nic, NicSpec, OpenOptions, VhostMode};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{BuildError, CmdlineError, MAX_NICS};
use crate::vm::NetInfo;
use crate::x86_64::{acpi, layout};

/// virtio-mmio devices get IRQs 5 and up (below 16, the ISA interrupts the MP table routes).
const FIRST_VIRTIO_IRQ: u32 = 5;
/// Offset of the QueueNotify register in a virtio-mmio window.
const NOTIFY_OFFSET: u64 = 0x50;

/// One device's MMIO window and IRQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub base: u64,
    pub irq: u32,
}

/// The NICs' slots, in guest order (eth0 first).
#[derive(Debug)]
pub(crate) struct DeviceManager {
    slots: Vec<Slot>,
}

/// What attaching the NICs gives the VM: the devices for the event loop and their handles.
pub(crate) struct Attached {
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub net_infos: Vec<NetInfo>,
}

impl DeviceManager {
    /// Slots for `nics` NICs, one window after the other from `MMIO_DEVICES_START`.
    pub fn new(nics: usize) -> Result<Self, BuildError> {
        if nics > MAX_NICS {
            return Err(BuildError::TooManyNics { count: nics });
        }
        let slots = (0..nics)
            .map(|i| Slot {
                base: layout::MMIO_DEVICES_START + i as u64 * MMIO_WINDOW,
                irq: FIRST_VIRTIO_IRQ + i as u32,
            })
            .collect();
        Ok(Self { slots })
    }

    /// Adds a `virtio_mmio.device=` entry per device to the kernel command line.
    pub fn announce_on_cmdline(&self, cmdline: &mut Cmdline) -> Result<(), CmdlineError> {
        for slot in &self.slots {
            cmdline
                .add_virtio_mmio_device(MMIO_WINDOW, GuestAddress(slot.base), slot.irq, None)
                .map_err(|e| {
                    CmdlineError::Invalid(format!("announcing a virtio-mmio device: {e}"))
                })?;
        }
        Ok(())
    }

    /// The devices as the ACPI tables describe them.
    pub fn acpi_devices(&self) -> Vec<acpi::MmioDevice> {
        self.slots
            .iter()
            .map(|slot| acpi::MmioDevice {
                base: slot.base,
                len: MMIO_WINDOW,
                irq: slot.irq,
            })
            .collect()
    }

    /// Makes a virtio-net device of each NIC (`specs` in the same order), on the kernel's
    /// vhost-net where its spec asks or on its vhost-user backend, and wires it into `vm` and
    /// `mmio` at its slot.
    pub fn attach_nets(
        &self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        nics: &mut [HostNic],
        specs: &[NicSpec],
        mmio: &mut Bus,
    ) -> Result<Attached, BuildError> {
        let mut attached = Attached {
            subscribers: Vec::new(),
            net_infos: Vec::new(),
        };
        for (i, ((nic, spec), slot)) in nics.iter_mut().zip(specs).zip(&self.slots).enumerate() {
            let wiring = Wiring {
                vm,
                memory,
                slot: *slot,
            };
            match nic {
                HostNic::Tap(nic) => {
                    let name = format!("eth{i} ({})", nic.iface());
                    let net = make_net(&name, nic, spec, memory)?;
                    let ends = Ends {
                        mac: nic.mac().to_string(),
                        ifindex: nic.ifindex(),
                        backend: None,
                    };
                    wiring.attach(net, name, ends, mmio, &mut attached)?;
                }
                HostNic::VhostUser(link) => {
                    let name = format!("eth{i} (vhost-user {})", link.path().display());
                    let (net, mac) = make_user_net(&name, link, spec)?;
                    let ends = Ends {
                        mac: mac.to_string(),
                        ifindex: None,
                        backend: Some(link.clone()),
                    };
                    wiring.attach(net, name, ends, mmio, &mut attached)?;
                }
            }
        }
        Ok(attached)
    }
}

/// A NIC's host side: a macvtap (or a tap, or a ready fd) Tapir opened, or its connection to a
/// vhost-user backend. The VM holds it for its Drop: a macvtap created for `link=` is deleted, a
/// backend sees its frontend go.
#[derive(Debug)]
pub(crate) enum HostNic {
    Tap(Nic),
    VhostUser(Arc<UserLink>),
}

impl HostNic {
    /// Opens the host side `spec` names, or connects to its backend.
    pub fn open(spec: &NicSpec) -> Result<Self, BuildError> {
        if let NicKind::VhostUser(path) = &spec.kind {
            let link =
                UserLink::connect(path, spec.queues).map_err(|source| BuildError::VhostUser {
                    spec: spec.to_string(),
                    source,
                })?;
            log::info!(
                "NIC {spec}: backend offers {:#x}, mac {:?} mtu {:?}, {} queue pairs",
                link.offered_features(),
                link.mac().map(MacAddr),
                link.mtu(),
                link.pairs()
            );
            return Ok(Self::VhostUser(Arc::new(link)));
        }
        let nic = Nic::open(spec, &OpenOptions::default()).map_err(|source| BuildError::Nic {
            spec: spec.to_string(),
            source,
        })?;
        log::info!(
            "NIC {spec}: {} mac {} mtu {:?}, {} queue pairs",
            nic.iface(),
            nic.mac(),
            nic.mtu(),
            nic.queues().len()
        );
        Ok(Self::Tap(nic))
    }
}

/// What a NIC's device is attached to besides the guest: the MAC the guest sees, the host
/// interface's index (for its link news) or the connection to its vhost-user backend.
struct Ends {
    mac: String,
    ifindex: Option<u32>,
    backend: Option<Arc<UserLink>>,
}

/// Where one NIC's device goes: KVM, guest memory, its slot.
struct Wiring<'a> {
    vm: &'a VmFd,
    memory: &'a GuestMemoryMmap,
    slot: Slot,
}

impl Wiring<'_> {
    /// Wires `net` in: its QueueNotify ioeventfds and irqfd, its transport on `mmio`, its handles
    /// (with `ends`) in `attached`.
    fn attach<B: NetBackend + 'static>(
        &self,
        net: Net<B>,
        name: String,
        ends: Ends,
        mmio: &mut Bus,
        attached: &mut Attached,
    ) -> Result<(), BuildError> {
        let slot = self.slot;
        let notifiers = net.queue_evts().map_err(io("cloning queue eventfds"))?;
        for (queue, evt) in notifiers.iter().enumerate() {
            self.vm
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.base + NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(kvm("registering a queue notification ioeventfd"))?;
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(io("creating an irqfd"))?;
        self.vm
            .register_irqfd(&irqfd, slot.irq)
            .map_err(kvm("registering a virtio-mmio irqfd"))?;
        let counters = net.counters();
        let net = Arc::new(Mutex::new(net));
        let state_of = net.clone();
        let link_of = net.clone();
        attached.net_infos.push(NetInfo {
            name,
            mac: ends.mac,
            counters,
            state: Arc::new(move || tapir_devices::bus::lock(&state_of).state()),
            ifindex: ends.ifindex,
            backend: ends.backend,
            set_link: Arc::new(move |up| tapir_devices::bus::lock(&link_of).set_link(up)),
        });
        let transport = MmioTransport::new(
            net.clone(),
            self.memory.clone(),
            Arc::new(Interrupt::new(irqfd)),
            notifiers,
        );
        mmio.insert(Arc::new(Mutex::new(transport)), slot.base, MMIO_WINDOW)?;
        attached.subscribers.push(net);
        Ok(())
    }
}

/// The virtio-net device of a NIC whose vhost-user backend is at the other end of `link`, and the
/// MAC its guest gets: `mac=` in `spec`, else the one the backend's host side has (a macvtap's,
/// which the guest must use), else a random local one.
fn make_user_net(
    name: &str,
    link: &Arc<UserLink>,
    spec: &NicSpec,
) -> Result<(Net<UserQueue>, MacAddr), BuildError> {
    let theirs = link.mac().map(MacAddr);
    let mac = spec.mac.or(theirs).unwrap_or_else(MacAddr::random_local);
    if let (Some(asked), Some(theirs)) = (spec.mac, theirs) {
        if asked != theirs {
            log::warn!(
                "{name}: mac={asked} differs from the backend's host side ({theirs}): a macvtap there hands the guest no frames addressed to {asked}"
            );
        }
    }
    let offloads = offload::tun_offloads_for(link.offered_features());
    let net = Net::new(
        name,
        UserQueue::for_pairs(link),
        mac.0,
        link.mtu(),
        offloads,
    )
    .and_then(|net| net.with_vhost_user(link))
    .map_err(io(format!("creating the virtio-net device {name}")))?;
    log::info!(
        "{name}: served by the vhost-user backend at {}",
        link.path().display()
    );
    Ok((net, mac))
}

/// The virtio-net device of `nic`, with its queues on the data plane `spec` asks for.
fn make_net(
    name: &str,
    nic: &mut Nic,
    spec: &NicSpec,
    memory: &GuestMemoryMmap,
) -> Result<Net<tapir_net_backend::TapQueue>, BuildError> {
    let mtu = nic.mtu().and_then(|m| u16::try_from(m).ok());
    let queues = nic.take_queues();
    let vhost = match spec.vhost {
        VhostMode::Off => Vec::new(),
        VhostMode::On => queues
            .iter()
            .map(|_| VhostPair::open(memory))
            .collect::<Result<_, _>>()
            .map_err(|source| BuildError::Vhost {
                spec: spec.to_string(),
                source,
            })?,
    };
    let mut net = Net::new(name, queues, nic.mac().0, mtu, nic.supported_offloads())
        .map_err(io(format!("creating the virtio-net device {name}")))?;
    net.set_coalescing(std::time::Duration::from_micros(u64::from(
        spec.coalesce_us,
    )));
    if spec.vhost == VhostMode::Off {
        return Ok(net);
    }
    let net = net
        .with_vhost(vhost)
        .map_err(io(format!("putting {name} on vhost-net")))?;
    log::info!("{name}: served by the kernel's vhost-net");
    Ok(net)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_one_another_and_are_announced_both_ways() {
        let dm = DeviceManager::new(2).unwrap();
        assert_eq!(
            dm.slots,
            [
                Slot {
                    base: layout::MMIO_DEVICES_START,
                    irq: 5
                },
                Slot {
                    base: layout::MMIO_DEVICES_START + MMIO_WINDOW,
                    irq: 6
                }
            ]
        );
        let mut cmdline = Cmdline::new(4096).unwrap();
        dm.announce_on_cmdline(&mut cmdline).unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(text.matches("virtio_mmio.device=").count(), 2, "{text}");
        assert!(
            text.contains(&format!(
                "@0x{:x}:6",
                layout::MMIO_DEVICES_START + MMIO_WINDOW
            )),
            "{text}"
        );
        assert_eq!(dm.acpi_devices().len(), 2);
        assert_eq!(dm.acpi_devices()[1].irq, 6);
        assert!(matches!(
            DeviceManager::new(MAX_NICS + 1),
            Err(BuildError::TooManyNics { count }) if count == MAX_NICS + 1
        ));
    }
}
