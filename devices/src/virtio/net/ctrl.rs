//! The control queue (with several queue pairs): the driver says how many pairs it uses
//! (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) and the device steers the host's flows to just those.
//! Every other command is answered VIRTIO_NET_ERR: no feature that needs one is offered.

use tapir_net_backend::NetBackend;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_MQ,
    VIRTIO_NET_OK,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::device::{report_malformed, Net};
use super::iovec::descriptors;
use super::Malformed;

/// Longest command read: class, command and a u16 argument, with room to spare.
const MAX_COMMAND: usize = 64;

impl<B: NetBackend> Net<B> {
    /// Answers every command the driver queued.
    pub(super) fn process_ctrl(&mut self) {
        let Some(index) = self.ctrl_index() else {
            return;
        };
        let mut used_any = false;
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = &active.mem;
            let Some(ctrl) = active.ctrl.as_mut() else {
                return;
            };
            let Some(chain) = ctrl.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut command = [0u8; MAX_COMMAND];
            let mut len = 0usize;
            let mut ack: Option<GuestAddress> = None;
            let parsed = descriptors(chain, |d| {
                if d.is_write_only() {
                    ack.get_or_insert(d.addr());
                } else if ack.is_some() {
                    return Err(Malformed::WrongDirection);
                } else {
                    let n = (d.len() as usize).min(MAX_COMMAND - len);
                    mem.read_slice(&mut command[len..len + n], d.addr())
                        .map_err(|_| Malformed::OutsideMemory)?;
                    len += n;
                }
                Ok(())
            });
            let request = match (parsed, ack) {
                (Ok(()), Some(ack)) if len >= 2 => Some((ack, command[..len].to_vec())),
                (Err(why), _) => {
                    report_malformed(&self.name, &self.counters, why);
                    None
                }
                _ => {
                    report_malformed(&self.name, &self.counters, Malformed::TooShort);
                    None
                }
            };
            let used = match request {
                Some((ack, command)) => {
                    let status = self.execute(&command);
                    let Some(active) = self.active.as_ref() else {
                        return;
                    };
                    match active.mem.write_obj(status, ack) {
                        Ok(()) => 1,
                        Err(_) => {
                            report_malformed(&self.name, &self.counters, Malformed::OutsideMemory);
                            0
                        }
                    }
                }
                None => 0,
            };
            if let Some(active) = self.active.as_mut() {
                if let Some(ctrl) = active.ctrl.as_mut() {
                    if let Err(e) = ctrl.add_used(&active.mem, head, used) {
                        log::error!("{}: returning a control chain: {e}", self.name);
                    }
                }
            }
            used_any = true;
        }
        if used_any {
            self.notify_guest(index);
        }
    }

    /// Carries out one command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
    fn execute(&mut self, command: &[u8]) -> u8 {
        let (class, cmd) = (u32::from(command[0]), u32::from(command[1]));
        let mq_acked = self.acked_features & (1 << VIRTIO_NET_F_MQ) != 0;
        if class != VIRTIO_NET_CTRL_MQ || cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || !mq_acked {
            log::debug!("{}: control command {class}/{cmd} refused", self.name);
            return VIRTIO_NET_ERR as u8;
        }
        let Some(pairs) = command
            .get(2..4)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        else {
            return VIRTIO_NET_ERR as u8;
        };
        if pairs == 0 || pairs > self.pairs.len() {
            log::warn!(
                "{}: the guest asked for {pairs} queue pairs of {}",
                self.name,
                self.pairs.len()
            );
            return VIRTIO_NET_ERR as u8;
        }
        match self.use_pairs(pairs) {
            Ok(()) => {
                log::info!("{}: the guest uses {pairs} queue pairs", self.name);
                for p in 0..pairs {
                    self.pairs[p].rx_pending = true;
                    self.process_rx(p);
                }
                VIRTIO_NET_OK as u8
            }
            Err(e) => {
                log::error!("{}: {e}", self.name);
                VIRTIO_NET_ERR as u8
            }
        }
    }
}
