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
use tapir_devices::virtio::net::{Net, VhostPair};
use tapir_devices::virtio::{Interrupt, MmioTransport};
use tapir_devices::Bus;
use tapir_net_backend::{Nic, NicSpec, VhostMode};
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
    /// vhost-net where its spec asks, and wires it into `vm` and `mmio` at its slot.
    pub fn attach_nets(
        &self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        nics: &mut [Nic],
        specs: &[NicSpec],
        mmio: &mut Bus,
    ) -> Result<Attached, BuildError> {
        let mut attached = Attached {
            subscribers: Vec::new(),
            net_infos: Vec::new(),
        };
        for (i, ((nic, spec), slot)) in nics.iter_mut().zip(specs).zip(&self.slots).enumerate() {
            let name = format!("eth{i} ({})", nic.iface());
            let net = make_net(&name, nic, spec, memory)?;
            let notifiers = net.queue_evts().map_err(io("cloning queue eventfds"))?;
            for (queue, evt) in notifiers.iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.base + NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(kvm("registering a queue notification ioeventfd"))?;
            }
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(io("creating an irqfd"))?;
            vm.register_irqfd(&irqfd, slot.irq)
                .map_err(kvm("registering a virtio-mmio irqfd"))?;
            let counters = net.counters();
            let net = Arc::new(Mutex::new(net));
            let state_of = net.clone();
            let link_of = net.clone();
            attached.net_infos.push(NetInfo {
                name,
                mac: nic.mac().to_string(),
                counters,
                state: Arc::new(move || tapir_devices::bus::lock(&state_of).state()),
                ifindex: nic.ifindex(),
                set_link: Arc::new(move |up| tapir_devices::bus::lock(&link_of).set_link(up)),
            });
            let transport = MmioTransport::new(
                net.clone(),
                memory.clone(),
                Arc::new(Interrupt::new(irqfd)),
                notifiers,
            );
            mmio.insert(Arc::new(Mutex::new(transport)), slot.base, MMIO_WINDOW)?;
            attached.subscribers.push(net);
        }
        Ok(attached)
    }
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
