//! rtnetlink requests the backend needs, in the calling thread's network namespace: look a link up by
//! name, create a macvtap (or a macvlan for the host) on a lower device, give a link an address, list
//! the addresses in use, delete a link.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVlan, InfoMacVtap, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    MacVlanMode, MacVtapMode,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::mac::MacAddr;

/// Errors of rtnetlink requests.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a NETLINK_ROUTE socket")]
    Socket(#[source] io::Error),
    #[error("rtnetlink request to {what}")]
    Request {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("rtnetlink answer to {what} could not be parsed: {detail}")]
    Parse { what: String, detail: String },
}

/// macvtap modes (IFLA_MACVLAN_MODE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MacvtapMode {
    #[default]
    Bridge,
    Vepa,
    Private,
    Passthru,
}

impl MacvtapMode {
    fn to_netlink(self) -> MacVtapMode {
        match self {
            MacvtapMode::Bridge => MacVtapMode::Bridge,
            MacvtapMode::Vepa => MacVtapMode::Vepa,
            MacvtapMode::Private => MacVtapMode::Private,
            MacvtapMode::Passthru => MacVtapMode::Passthrough,
        }
    }

    fn from_netlink(mode: MacVtapMode) -> Option<Self> {
        match mode {
            MacVtapMode::Bridge => Some(MacvtapMode::Bridge),
            MacVtapMode::Vepa => Some(MacvtapMode::Vepa),
            MacVtapMode::Private => Some(MacvtapMode::Private),
            MacVtapMode::Passthrough => Some(MacvtapMode::Passthru),
            _ => None,
        }
    }
}

impl std::fmt::Display for MacvtapMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MacvtapMode::Bridge => "bridge",
            MacvtapMode::Vepa => "vepa",
            MacvtapMode::Private => "private",
            MacvtapMode::Passthru => "passthru",
        })
    }
}

impl std::str::FromStr for MacvtapMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bridge" => Ok(MacvtapMode::Bridge),
            "vepa" => Ok(MacvtapMode::Vepa),
            "private" => Ok(MacvtapMode::Private),
            "passthru" => Ok(MacvtapMode::Passthru),
            _ => Err(format!(
                "unknown macvtap mode {s:?}: use bridge, vepa, private or passthru"
            )),
        }
    }
}

/// What rtnetlink says about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND: "macvtap", "veth", "tun" ...; None for plain devices.
    pub kind: Option<String>,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    /// IFF_UP and IFF_LOWER_UP both set.
    pub running: bool,
    /// IFLA_LINK: the lower device of a macvtap, macvlan or veth, by index.
    pub parent: Option<u32>,
    /// A macvtap's or macvlan's mode (`None` for "source" mode and every other kind of link).
    pub macvlan_mode: Option<MacvtapMode>,
}

/// One address on a link, as `ip addr` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkAddr {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A NETLINK_ROUTE socket bound in the calling thread's network namespace.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// The link called `name`, or None when there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        let what = format!("look up link {name}");
        match self.request(RouteNetlinkMessage::GetLink(msg), 0, &what) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(parse_link(&link)),
                _ => None,
            })),
            Err(NetlinkError::Request { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates macvtap `name` on `lower` (an interface index) with `mac` and `mode`, already up.
    pub fn create_macvtap(
        &mut self,
        name: &str,
        lower: u32,
        mac: MacAddr,
        mode: MacvtapMode,
    ) -> Result<(), NetlinkError> {
        let data = InfoData::MacVtap(vec![InfoMacVtap::Mode(mode.to_netlink())]);
        let what = format!("create macvtap {name} ({mode:?}, {mac}) on link #{lower}");
        self.create_port(name, lower, mac, InfoKind::MacVtap, data, &what)
    }

    /// Creates macvlan `name` in bridge mode on `lower` with `mac`, already up: the host's own port on
    /// the lower device, beside the guests' macvtaps.
    pub fn create_macvlan_bridge(
        &mut self,
        name: &str,
        lower: u32,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        let data = InfoData::MacVlan(vec![InfoMacVlan::Mode(MacVlanMode::Bridge)]);
        let what = format!("create macvlan {name} (bridge, {mac}) on link #{lower}");
        self.create_port(name, lower, mac, InfoKind::MacVlan, data, &what)
    }

    /// Creates link `name` of `kind` with `data` on the lower device `lower`, with `mac`, already up.
    fn create_port(
        &mut self,
        name: &str,
        lower: u32,
        mac: MacAddr,
        kind: InfoKind,
        data: InfoData,
        what: &str,
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::Link(lower));
        msg.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(kind),
            LinkInfo::Data(data),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            what,
        )
        .map(drop)
    }

    /// Gives link `index` the address `addr/prefix`.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        let what = format!("add address {addr}/{prefix} to link #{index}");
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &what,
        )
        .map(drop)
    }

    /// Every address on every link in this network namespace.
    pub fn addresses(&mut self) -> Result<Vec<LinkAddr>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            "list addresses",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    // IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on a
                    // point-to-point link, and the same as IFA_LOCAL elsewhere (IPv6 has only it).
                    let local = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let address = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    local.or(address).map(|addr| LinkAddr {
                        index: a.header.index,
                        addr,
                        prefix: a.header.prefix_len,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Every link in this network namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            "list links",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(parse_link(&link)),
                _ => None,
            })
            .collect())
    }

    /// Deletes the link called `name`.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        let what = format!("delete link {name}");
        self.request(RouteNetlinkMessage::DelLink(msg), 0, &what)
            .map(drop)
    }

    /// Deletes the link with index `index`.
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        let what = format!("delete link #{index}");
        self.request(RouteNetlinkMessage::DelLink(msg), 0, &what)
            .map(drop)
    }

    /// Sends one request with NLM_F_ACK and collects the answers up to the ACK.
    fn request(
        &mut self,
        payload: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut packet =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(payload));
        packet.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let req_err = |source| NetlinkError::Request {
            what: what.into(),
            source,
        };
        self.socket.send(&buf, 0).map_err(req_err)?;

        let mut answers = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let size = self.socket.recv(&mut &mut rx[..], 0).map_err(req_err)?;
            let mut offset = 0;
            while offset < size {
                let msg: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&rx[offset..size]).map_err(|e| {
                        NetlinkError::Parse {
                            what: what.into(),
                            detail: e.to_string(),
                        }
                    })?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq {
                    match msg.payload {
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(answers),
                                Some(code) => {
                                    Err(req_err(io::Error::from_raw_os_error(-code.get())))
                                }
                            };
                        }
                        NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::InnerMessage(m) => answers.push(m),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// What the kernel announced about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// RTM_NEWLINK: the link exists; whether it is up with carrier.
    Changed { index: u32, running: bool },
    /// RTM_DELLINK: the link is gone (with a macvtap, also when its lower device went).
    Deleted { index: u32 },
}

/// A NETLINK_ROUTE socket subscribed to the link group (RTMGRP_LINK), non-blocking: the kernel's
/// announcements of links coming, going, and changing state, for an event loop to read when its fd
/// is readable.
pub struct LinkWatch {
    socket: Socket,
    buf: Vec<u8>,
}

/// RTMGRP_LINK, the multicast group of link announcements.
const RTMGRP_LINK: u32 = 1;

impl LinkWatch {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket
            .bind(&SocketAddr::new(0, RTMGRP_LINK))
            .map_err(NetlinkError::Socket)?;
        socket
            .set_non_blocking(true)
            .map_err(NetlinkError::Socket)?;
        Ok(LinkWatch {
            socket,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// The announcements waiting on the socket (none when it would block). A message that cannot
    /// be parsed is skipped; a socket that overflowed (ENOBUFS: announcements were lost) is an
    /// error, after which the caller should ask for the links it cares about afresh.
    pub fn events(&mut self) -> Result<Vec<LinkEvent>, NetlinkError> {
        let mut events = Vec::new();
        loop {
            let size = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(size) => size,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(events),
                Err(source) => {
                    return Err(NetlinkError::Request {
                        what: "read link announcements".into(),
                        source,
                    })
                }
            };
            let mut offset = 0;
            while offset < size {
                let Ok(msg) =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..size])
                else {
                    break;
                };
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                        let l = parse_link(&link);
                        events.push(LinkEvent::Changed {
                            index: l.index,
                            running: l.running,
                        });
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                        events.push(LinkEvent::Deleted {
                            index: link.header.index,
                        });
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

impl std::os::fd::AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

fn parse_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: None,
        running: msg.header.flags.contains(LinkFlags::Up)
            && msg.header.flags.contains(LinkFlags::LowerUp),
        parent: None,
        macvlan_mode: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = Some(*m),
            LinkAttribute::Link(parent) => link.parent = Some(*parent),
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut b = [0u8; 6];
                b.copy_from_slice(a);
                link.mac = Some(MacAddr(b));
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        LinkInfo::Data(InfoData::MacVtap(data)) => {
                            for d in data {
                                if let InfoMacVtap::Mode(m) = d {
                                    link.macvlan_mode = MacvtapMode::from_netlink(*m);
                                }
                            }
                        }
                        LinkInfo::Data(InfoData::MacVlan(data)) => {
                            for d in data {
                                if let InfoMacVlan::Mode(m) = d {
                                    link.macvlan_mode = MacvtapMode::from_netlink(*m);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        for (text, mode) in [
            ("bridge", MacvtapMode::Bridge),
            ("vepa", MacvtapMode::Vepa),
            ("private", MacvtapMode::Private),
            ("passthru", MacvtapMode::Passthru),
        ] {
            assert_eq!(text.parse::<MacvtapMode>(), Ok(mode));
        }
        assert!("Bridge".parse::<MacvtapMode>().is_err());
        assert!("source".parse::<MacvtapMode>().is_err());
    }
}
