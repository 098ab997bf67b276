//! The control queue (with several queue pairs): the driver says how many pairs it uses
//! (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) and the device steers the host's flows to just those.
//! Every other command is answered VIRTIO_NET_ERR: no feature that needs one is offered.

use tapir_net_backend::NetBackend;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_F_MQ,
};
use vm_memory::{Bytes, GuestAddress};

use super::device::{report_malformed, Net, Pass, BUDGET};
use super::Malformed;
use crate::virtio::queue::{descriptors, pop, put};
use crate::{error_limited, info_limited, warn_limited};

/// Longest command read: class, command and a u16 argument, with room to spare.
const MAX_COMMAND: usize = 64;
/// The answers, as the one status byte the driver reads (VIRTIO_NET_OK and VIRTIO_NET_ERR).
const OK: u8 = 0;
const ERR: u8 = 1;

/// One command taken from a chain: its bytes and where its status byte goes.
struct Request {
    command: [u8; MAX_COMMAND],
    len: usize,
    status: GuestAddress,
}

impl<B: NetBackend> Net<B> {
    /// Answers the commands the driver queued, at most a budget of them per pass.
    pub(super) fn process_ctrl(&mut self) {
        let Some(index) = self.ctrl_index() else {
            return;
        };
        if self.broken.is_some() {
            return;
        }
        let mut used_any = false;
        // Unless a chain ends it sooner, the pass spends its budget and yields.
        let mut pass = Pass::Yield;
        for _ in 0..BUDGET {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = &active.mem;
            let Some(ctrl) = active.ctrl.as_mut() else {
                return;
            };
            let chain = match pop(ctrl, mem, index) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    pass = Pass::Done;
                    break;
                }
                Err(e) => {
                    pass = Pass::Failed(e);
                    break;
                }
            };
            let head = chain.head_index();
            let request = read_request(mem, chain);
            let used = match request {
                Ok(request) => {
                    let status = self.execute(&request.command[..request.len]);
                    let Some(active) = self.active.as_ref() else {
                        return;
                    };
                    match active.mem.write_obj(status, request.status) {
                        Ok(()) => 1,
                        Err(_) => {
                            report_malformed(&self.name, &self.counters, Malformed::OutsideMemory);
                            0
                        }
                    }
                }
                Err(why) => {
                    report_malformed(&self.name, &self.counters, why);
                    0
                }
            };
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let Some(ctrl) = active.ctrl.as_mut() else {
                return;
            };
            if let Err(e) = put(ctrl, &active.mem, index, head, used) {
                pass = Pass::Failed(e);
                break;
            }
            used_any = true;
        }
        self.end_pass(index, pass, used_any);
    }

    /// Carries out one command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
    fn execute(&mut self, command: &[u8]) -> u8 {
        let (class, cmd) = (u32::from(command[0]), u32::from(command[1]));
        let mq_acked = self.acked_features & (1 << VIRTIO_NET_F_MQ) != 0;
        if class != VIRTIO_NET_CTRL_MQ || cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || !mq_acked {
            log::debug!("{}: control command {class}/{cmd} refused", self.name);
            return ERR;
        }
        let Some(pairs) = command
            .get(2..4)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        else {
            return ERR;
        };
        let set_up = self.active.is_some()
            && (0..pairs).all(|p| self.pairs.get(p).is_some_and(|p| p.usable()));
        if pairs == 0 || pairs > self.pairs.len() || !set_up {
            warn_limited!(
                "{}: the guest asked for {pairs} queue pairs of {} (all of them set up: {set_up})",
                self.name,
                self.pairs.len()
            );
            return ERR;
        }
        match self.use_pairs(pairs) {
            Ok(()) => {
                info_limited!("{}: the guest uses {pairs} queue pairs", self.name);
                for p in 0..pairs {
                    self.pairs[p].rx_pending = true;
                    self.process_rx(p);
                }
                OK
            }
            Err(e) => {
                error_limited!("{}: {e}", self.name);
                ERR
            }
        }
    }
}

/// Reads a command chain: device-readable buffers with the command, then a device-writable one of
/// at least one byte for the status.
fn read_request(
    mem: &vm_memory::GuestMemoryMmap,
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
) -> Result<Request, Malformed> {
    let mut command = [0u8; MAX_COMMAND];
    let mut len = 0usize;
    let mut status: Option<GuestAddress> = None;
    descriptors(chain, |d| {
        if d.is_write_only() {
            if d.len() == 0 {
                return Err(Malformed::TooShort);
            }
            status.get_or_insert(d.addr());
        } else if status.is_some() {
            return Err(Malformed::WrongDirection);
        } else {
            let n = usize::try_from(d.len())
                .unwrap_or(usize::MAX)
                .min(MAX_COMMAND - len);
            mem.read_slice(&mut command[len..len + n], d.addr())
                .map_err(|_| Malformed::OutsideMemory)?;
            len += n;
        }
        Ok(())
    })?;
    match status {
        Some(status) if len >= 2 => Ok(Request {
            command,
            len,
            status,
        }),
        _ => Err(Malformed::TooShort),
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_net::{VIRTIO_NET_ERR, VIRTIO_NET_OK};

    #[test]
    fn status_bytes_are_the_specs() {
        assert_eq!(u32::from(super::OK), VIRTIO_NET_OK);
        assert_eq!(u32::from(super::ERR), VIRTIO_NET_ERR);
    }
}
