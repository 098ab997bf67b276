//! One NIC's host side: what `--net SPEC` names (an existing macvtap, a macvtap to create on a lower
//! device, a tap, a ready fd), opened as one [`TapQueue`] per queue pair, with the guest MAC it implies.
//! A macvtap Tapir created is deleted when the [`Nic`] is dropped; a `/dev/tapN` node Tapir had to make
//! (no udev) lives in a private directory only while the queues are being opened.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::mac::{MacAddr, MacError};
use crate::netlink::{Link, MacvtapMode, NetlinkError, Rtnl};
use crate::tap::{TapError, TapQueue};

/// What a NIC's host side is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NicKind {
    /// `macvtap=NAME`: an existing macvtap.
    Macvtap(String),
    /// `link=LOWER[,mode=M][,host=ADDR/PREFIX]`: a macvtap Tapir creates on LOWER and deletes on
    /// exit; with `host`, also a bridge-mode macvlan on LOWER holding ADDR, so that the host reaches
    /// its guests (which it cannot through LOWER itself).
    Link {
        lower: String,
        mode: MacvtapMode,
        host: Option<HostAddr>,
    },
    /// `tap=NAME`: a tap through /dev/net/tun.
    Tap(String),
    /// `fd=N`: a ready tap or macvtap fd handed over by the caller.
    Fd(RawFd),
    /// `vhost-user=PATH`: no host interface of Tapir's: a vhost-user-net backend listening on the
    /// Unix socket PATH serves the NIC's rings (the VMM connects it; [`Nic::open`] does not).
    VhostUser(PathBuf),
}

/// The host's address on a lower device, `ADDR/PREFIX` (IPv4 or IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostAddr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for HostAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("host={s}: give ADDR/PREFIX, e.g. host=10.0.0.1/24"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("host={s}: {addr:?} is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("host={s}: the prefix must be a number from 0 to {max}"))?;
        if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
            return Err(format!(
                "host={s}: {addr} cannot be an interface's own address"
            ));
        }
        if let IpAddr::V4(v4) = addr {
            if v4.is_broadcast() {
                return Err(format!(
                    "host={s}: {addr} cannot be an interface's own address"
                ));
            }
        }
        Ok(HostAddr { addr, prefix })
    }
}

impl std::fmt::Display for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A parsed `--net` spec:
/// `KIND=VALUE[,mac=MAC][,queues=N][,mode=MODE][,host=ADDR/PREFIX][,vhost=on|off][,coalesce=US]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSpec {
    pub kind: NicKind,
    pub mac: Option<MacAddr>,
    pub queues: usize,
    pub vhost: VhostMode,
    /// The userspace data plane's coalescing window in microseconds (0: none): see
    /// `Net::set_coalescing` in tapir-devices.
    pub coalesce_us: u32,
}

/// The coalescing window a spec gets unless it says otherwise, in microseconds.
pub const DEFAULT_COALESCE_US: u32 = 100;
/// The longest coalescing window a spec may ask for (10 ms).
pub const MAX_COALESCE_US: u32 = 10_000;

/// Which data plane serves a NIC's queues: Tapir's own (`off`, the default) or the host kernel's
/// vhost-net (`on`), one `/dev/vhost-net` instance per queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VhostMode {
    #[default]
    Off,
    On,
}

impl FromStr for VhostMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("vhost={s}: give on or off")),
        }
    }
}

/// The spec as it would be written on the command line.
impl std::fmt::Display for NicSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            NicKind::Macvtap(name) => write!(f, "macvtap={name}")?,
            NicKind::Link { lower, mode, host } => {
                write!(f, "link={lower},mode={mode}")?;
                if let Some(host) = host {
                    write!(f, ",host={host}")?;
                }
            }
            NicKind::Tap(name) => write!(f, "tap={name}")?,
            NicKind::Fd(fd) => write!(f, "fd={fd}")?,
            NicKind::VhostUser(path) => write!(f, "vhost-user={}", path.display())?,
        }
        if let Some(mac) = self.mac {
            write!(f, ",mac={mac}")?;
        }
        if self.queues != 1 {
            write!(f, ",queues={}", self.queues)?;
        }
        if self.vhost == VhostMode::On {
            write!(f, ",vhost=on")?;
        }
        if self.coalesce_us != DEFAULT_COALESCE_US {
            write!(f, ",coalesce={}", self.coalesce_us)?;
        }
        Ok(())
    }
}

/// Most queue pairs a NIC may ask for (the kernel's MAX_TAP_QUEUES is 256).
pub const MAX_QUEUES: usize = 16;

/// Errors of parsing a spec and of opening a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("--net {spec:?}: {why}")]
    Spec { spec: String, why: String },
    #[error("--net {spec:?}")]
    Mac {
        spec: String,
        #[source]
        source: MacError,
    },
    #[error("talking to rtnetlink about {iface}")]
    Netlink {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("there is no network interface called {0} (in this network namespace)")]
    NoSuchLink(String),
    #[error("{name} is a {kind} interface, not a macvtap")]
    NotMacvtap { name: String, kind: String },
    #[error("reading {path} (the char device of macvtap {iface}); is /sys mounted for this network namespace?")]
    Sysfs {
        iface: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists but is {found}, not the char device {major}:{minor} of macvtap {iface} (a regular file is what a `3<>{path}` redirection leaves when the node was missing: remove it)")]
    WrongNode {
        iface: String,
        path: String,
        found: String,
        major: u32,
        minor: u32,
    },
    #[error("making the device node {path} for macvtap {iface}")]
    MakeNode {
        iface: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("permission denied opening {path} for {iface}: run as root or give this user read-write access to it")]
    Permission { iface: String, path: String },
    #[error("{iface}: {why}")]
    Queues { iface: String, why: String },
    #[error("host={addr}: that address is already on {iface} in this network namespace; give the host's port on the lower device an address of its own")]
    AddressInUse { addr: HostAddr, iface: String },
    #[error("MAC {mac} is already taken on {lower} by {holder}: each guest on one lower device needs its own mac=")]
    MacInUse {
        mac: MacAddr,
        lower: String,
        holder: String,
    },
    #[error("{lower}: {why}")]
    LowerTaken { lower: String, why: String },
    #[error("mode=passthru: the macvtap takes {lower}'s own MAC, {actual}, so mac={asked} cannot be given (drop mac= or change {lower}'s)")]
    PassthruMac {
        lower: String,
        actual: MacAddr,
        asked: MacAddr,
    },
    #[error("the guest MAC must equal macvtap {iface}'s, which is {actual}; mac={asked} was given (change the macvtap's with `ip link set {iface} address {asked}` or drop mac=)")]
    MacMismatch {
        iface: String,
        actual: MacAddr,
        asked: MacAddr,
    },
    #[error("macvtap {0} has no MAC address")]
    NoMac(String),
    #[error("fd={0} is not an open file descriptor of this process (open it for Tapir, e.g. `3<>/dev/tapN`)")]
    FdNotOpen(RawFd),
    #[error(transparent)]
    Tap(#[from] TapError),
}

impl FromStr for NicSpec {
    type Err = NicError;

    fn from_str(spec: &str) -> Result<Self, NicError> {
        let bad = |why: String| NicError::Spec {
            spec: spec.into(),
            why,
        };
        let mut parts = spec.split(',');
        let first = parts.next().unwrap_or_default();
        let (key, value) = first.split_once('=').ok_or_else(|| {
            bad("expected macvtap=NAME, link=LOWER, tap=NAME, fd=N or vhost-user=PATH first".into())
        })?;
        if value.is_empty() {
            return Err(bad(format!("{key}= needs a value")));
        }
        let mut mac = None;
        let mut queues = 1;
        let mut mode = None;
        let mut host = None;
        let mut vhost = VhostMode::Off;
        let mut coalesce_us = DEFAULT_COALESCE_US;
        let mut data_plane_options = Vec::new();
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| bad(format!("option {opt:?} is not KEY=VALUE")))?;
            match k {
                "mac" => {
                    mac = Some(MacAddr::parse_unicast(v).map_err(|source| NicError::Mac {
                        spec: spec.into(),
                        source,
                    })?)
                }
                "queues" => {
                    queues = v
                        .parse::<usize>()
                        .ok()
                        .filter(|q| (1..=MAX_QUEUES).contains(q))
                        .ok_or_else(|| {
                            bad(format!("queues={v}: give a number from 1 to {MAX_QUEUES}"))
                        })?
                }
                "mode" => mode = Some(v.parse::<MacvtapMode>().map_err(bad)?),
                "host" => host = Some(v.parse::<HostAddr>().map_err(bad)?),
                "vhost" => {
                    vhost = v.parse::<VhostMode>().map_err(bad)?;
                    data_plane_options.push(k);
                }
                "coalesce" => {
                    data_plane_options.push(k);
                    coalesce_us = v
                        .parse::<u32>()
                        .ok()
                        .filter(|us| *us <= MAX_COALESCE_US)
                        .ok_or_else(|| {
                            bad(format!(
                                "coalesce={v}: give microseconds from 0 (none) to {MAX_COALESCE_US}"
                            ))
                        })?
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option {k:?} (mac=, queues=, mode=, host=, vhost=, coalesce=)"
                    )))
                }
            }
        }
        if mode.is_some() && key != "link" {
            return Err(bad("mode= only goes with link=".into()));
        }
        if host.is_some() && key != "link" {
            return Err(bad(
                "host= only goes with link= (Tapir adds the host's port beside a macvtap it creates)"
                    .into(),
            ));
        }
        match (host, mode) {
            (Some(_), Some(MacvtapMode::Private)) => {
                return Err(bad("host= cannot work with mode=private: a private macvtap exchanges no frames with any other port on its lower device, the host's included (use mode=bridge)".into()))
            }
            (Some(_), Some(MacvtapMode::Passthru)) => {
                return Err(bad("host= cannot work with mode=passthru: a passthru macvtap owns its lower device alone, so no port for the host can sit beside it (use mode=bridge)".into()))
            }
            _ => {}
        }
        if key == "vhost-user" {
            if let Some(option) = data_plane_options.first() {
                return Err(bad(format!(
                    "{option}= does not go with vhost-user= (the backend at the socket moves the frames)"
                )));
            }
            // sockaddr_un's sun_path: 108 bytes with the terminating NUL
            if value.len() >= 108 {
                return Err(bad(format!(
                    "the socket path {value:?} is longer than a Unix socket's 107 bytes"
                )));
            }
        } else if !matches!(key, "fd") && value.len() >= libc::IFNAMSIZ {
            return Err(bad(format!(
                "interface name {value:?} is longer than 15 bytes"
            )));
        }
        let kind = match key {
            "macvtap" => NicKind::Macvtap(value.into()),
            "link" => NicKind::Link {
                lower: value.into(),
                mode: mode.unwrap_or_default(),
                host,
            },
            "tap" => NicKind::Tap(value.into()),
            "fd" => NicKind::Fd(
                value
                    .parse::<RawFd>()
                    .ok()
                    .filter(|fd| *fd > 2)
                    .ok_or_else(|| {
                        bad(format!(
                            "fd={value}: give a descriptor number of 3 or more (0-2 are Tapir's own stdio)"
                        ))
                    })?,
            ),
            "vhost-user" => NicKind::VhostUser(value.into()),
            _ => {
                return Err(bad(format!(
                    "unknown kind {key:?}: use macvtap=, link=, tap=, fd= or vhost-user="
                )))
            }
        };
        if matches!(kind, NicKind::Fd(_)) && queues != 1 {
            return Err(bad(format!(
                "fd= hands over one queue but queues={queues} was asked"
            )));
        }
        Ok(NicSpec {
            kind,
            mac,
            queues,
            vhost,
            coalesce_us,
        })
    }
}

/// Where device nodes are looked for and made.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Where udev puts `tapN` nodes (default `/dev`).
    pub dev_dir: PathBuf,
    /// Where Tapir makes a private directory for a node it has to create (default
    /// `$XDG_RUNTIME_DIR/tapir`, else `/run/tapir`).
    pub runtime_dir: PathBuf,
    /// Name for a macvtap created with `link=` (default: `tpr<pid>n<counter>`).
    pub link_name: Option<String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("tapir"))
            .unwrap_or_else(|| PathBuf::from("/run/tapir"));
        OpenOptions {
            dev_dir: PathBuf::from("/dev"),
            runtime_dir,
            link_name: None,
        }
    }
}

/// A link Tapir created (a guest's macvtap or the host's macvlan); deleted on drop (by index once
/// known, by name before).
#[derive(Debug)]
struct CreatedLink {
    index: Option<u32>,
    name: String,
    kind: &'static str,
}

impl Drop for CreatedLink {
    fn drop(&mut self) {
        let result = Rtnl::open().and_then(|mut rtnl| match self.index {
            Some(index) => rtnl.delete_link(index),
            None => rtnl.delete_link_by_name(&self.name),
        });
        match result {
            Ok(()) => log::debug!("deleted {} {}", self.kind, self.name),
            Err(NetlinkError::Request { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                log::info!(
                    "{} {} was already gone (deleted with its lower device)",
                    self.kind,
                    self.name
                )
            }
            Err(e) => log::error!("deleting {} {}: {e}", self.kind, self.name),
        }
    }
}

/// Prefix of the links Tapir creates: `tpr<pid>n<counter>` for a guest's macvtap and
/// `tpr<pid>h<counter>` for the host's macvlan beside it, so that a later Tapir can tell those of a
/// process that is gone (killed with SIGKILL, say) and remove them.
const LINK_PREFIX: &str = "tpr";

/// The process that created link `name`, if Tapir named it.
pub fn link_owner(name: &str) -> Option<u32> {
    let (pid, counter) = name.strip_prefix(LINK_PREFIX)?.split_once(['n', 'h'])?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the macvtaps and macvlans in this network namespace that a Tapir process created and did
/// not get to delete (it was killed); those of running processes stay. Returns the names removed.
pub fn sweep_stale_links() -> Result<Vec<String>, NicError> {
    let netlink_err = |source| NicError::Netlink {
        iface: "the macvtaps of earlier runs".into(),
        source,
    };
    let mut rtnl = Rtnl::open().map_err(netlink_err)?;
    let mut removed = Vec::new();
    for link in rtnl.links().map_err(netlink_err)? {
        let Some(pid) = link_owner(&link.name) else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !matches!(link.kind.as_deref(), Some("macvtap" | "macvlan")) || alive {
            continue;
        }
        match rtnl.delete_link(link.index) {
            Ok(()) => removed.push(link.name),
            Err(e) => log::warn!("removing {}, left by process {pid}: {e}", link.name),
        }
    }
    Ok(removed)
}

/// A device node Tapir made in a private directory; removed (with the directory) on drop.
struct PrivateNode {
    dir: PathBuf,
    path: PathBuf,
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// One NIC's host side, open.
#[derive(Debug)]
pub struct Nic {
    iface: String,
    /// The host interface's index, where rtnetlink knows it.
    index: Option<u32>,
    mac: MacAddr,
    mtu: Option<u32>,
    queues: Vec<TapQueue>,
    offloads: u32,
    // Dropped last: the queues' fds go first.
    created: Option<CreatedLink>,
    host_port: Option<CreatedLink>,
}

impl Nic {
    /// Opens what `spec` names, in the calling thread's network namespace.
    pub fn open(spec: &NicSpec, opts: &OpenOptions) -> Result<Nic, NicError> {
        match &spec.kind {
            NicKind::Macvtap(name) => {
                let link = lookup(name)?;
                let mut nic = open_macvtap(&link, spec.queues, opts)?;
                if let Some(asked) = spec.mac {
                    if asked != nic.mac {
                        return Err(NicError::MacMismatch {
                            iface: name.clone(),
                            actual: nic.mac,
                            asked,
                        });
                    }
                }
                nic.offloads = nic.queues[0].probe_offloads()?;
                Ok(nic)
            }
            NicKind::Link { lower, mode, host } => {
                match sweep_stale_links() {
                    Ok(removed) if !removed.is_empty() => log::warn!(
                        "removed macvtaps left by Tapir processes that are gone: {}",
                        removed.join(" ")
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!("looking for macvtaps left by earlier runs: {e}"),
                }
                let lower_link = lookup(lower)?;
                if let Some(host) = host {
                    check_address_free(host)?;
                    if *mode == MacvtapMode::Vepa {
                        log::warn!("host={host} with mode=vepa: the host's port is in bridge mode and reaches the guest only through a switch that reflects frames back to {lower}");
                    }
                }
                let mac = spec.mac.unwrap_or_else(MacAddr::random_local);
                let name = opts
                    .link_name
                    .clone()
                    .unwrap_or_else(|| generated_name('n'));
                let netlink_err = |source| NicError::Netlink {
                    iface: name.clone(),
                    source,
                };
                let mut rtnl = Rtnl::open().map_err(netlink_err)?;
                if let Err(e) = rtnl.create_macvtap(&name, lower_link.index, mac, *mode) {
                    return Err(explain_create_error(&mut rtnl, &lower_link, *mode, mac)
                        .unwrap_or_else(|| netlink_err(e)));
                }
                // From here on the guard deletes the macvtap, also when looking it up or opening
                // it fails.
                let mut created = CreatedLink {
                    index: None,
                    name: name.clone(),
                    kind: "macvtap",
                };
                #[cfg(test)]
                if tests::LOOKUP_FAILS.with(std::cell::Cell::get) {
                    return Err(NicError::NoSuchLink(name.clone()));
                }
                let link = rtnl
                    .link_by_name(&name)
                    .map_err(netlink_err)?
                    .ok_or_else(|| NicError::NoSuchLink(name.clone()))?;
                created.index = Some(link.index);
                log::info!(
                    "created macvtap {name} ({}, {mode:?}) on {lower}",
                    link.mac.unwrap_or(mac)
                );
                if let (MacvtapMode::Passthru, Some(asked), Some(actual)) =
                    (mode, spec.mac, link.mac)
                {
                    // The kernel gives a passthru macvtap its lower device's MAC, whatever was asked.
                    if asked != actual {
                        return Err(NicError::PassthruMac {
                            lower: lower.clone(),
                            actual,
                            asked,
                        });
                    }
                }
                let mut nic = open_macvtap(&link, spec.queues, opts)?;
                nic.created = Some(created);
                nic.offloads = nic.queues[0].probe_offloads()?;
                if let Some(host) = host {
                    nic.host_port = Some(add_host_port(&mut rtnl, lower_link.index, lower, host)?);
                }
                Ok(nic)
            }
            NicKind::Tap(name) => {
                let multi = spec.queues > 1;
                let mut queues = Vec::with_capacity(spec.queues);
                for _ in 0..spec.queues {
                    queues.push(
                        TapQueue::open_tun(name, multi)
                            .map_err(|e| tap_open_error(name, spec.queues, e))?,
                    );
                }
                let link = lookup(name).ok();
                let offloads = queues[0].probe_offloads()?;
                Ok(Nic {
                    iface: name.clone(),
                    index: link.as_ref().map(|l| l.index),
                    mac: spec.mac.unwrap_or_else(MacAddr::random_local),
                    mtu: link.and_then(|l| l.mtu),
                    queues,
                    offloads,
                    created: None,
                    host_port: None,
                })
            }
            NicKind::VhostUser(_) => Err(NicError::Spec {
                spec: spec.to_string(),
                why: "a vhost-user backend is no host interface to open (the VMM connects to it)"
                    .into(),
            }),
            NicKind::Fd(fd) => {
                // Taking ownership of a descriptor that is not open would close whatever gets
                // that number later (and abort debug builds).
                // SAFETY: F_GETFD only inspects the descriptor table.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(NicError::FdNotOpen(*fd));
                }
                // SAFETY: the user handed this open fd to Tapir for this NIC; nothing else in
                // Tapir owns it.
                let owned = unsafe { crate::tap::owned_fd_from_raw(*fd) };
                let queue = TapQueue::from_fd(owned)?;
                let iface = queue.iface().to_string();
                let link = lookup(&iface).ok();
                // A macvtap's MAC is the guest's; a tap's is the host side's own.
                let mac = match &link {
                    Some(l) if l.kind.as_deref() == Some("macvtap") => {
                        l.mac.ok_or_else(|| NicError::NoMac(iface.clone()))?
                    }
                    _ => spec.mac.unwrap_or_else(MacAddr::random_local),
                };
                let offloads = queue.probe_offloads()?;
                Ok(Nic {
                    iface,
                    index: link.as_ref().map(|l| l.index),
                    mac,
                    mtu: link.and_then(|l| l.mtu),
                    queues: vec![queue],
                    offloads,
                    created: None,
                    host_port: None,
                })
            }
        }
    }

    /// The host interface's name.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The host interface's index (what rtnetlink's link announcements name it by).
    pub fn ifindex(&self) -> Option<u32> {
        self.index
    }

    /// The MAC the guest must use (for a macvtap, the macvtap's own).
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The interface's MTU when it could be read.
    pub fn mtu(&self) -> Option<u32> {
        self.mtu
    }

    /// The TUN_F_* offloads the kernel accepted on this device; offer the guest only these.
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    /// Whether the interface is up with carrier, asked afresh.
    pub fn link_running(&self) -> Result<bool, NicError> {
        lookup(&self.iface).map(|l| l.running)
    }

    /// Whether Tapir created this macvtap (and will delete it on drop).
    pub fn is_created(&self) -> bool {
        self.created.is_some()
    }

    pub fn queues(&self) -> &[TapQueue] {
        &self.queues
    }

    pub fn queues_mut(&mut self) -> &mut [TapQueue] {
        &mut self.queues
    }

    /// Hands the queues to their user (a device); the Nic stays the owner of a macvtap it created,
    /// which it deletes when dropped.
    pub fn take_queues(&mut self) -> Vec<TapQueue> {
        std::mem::take(&mut self.queues)
    }
}

fn lookup(name: &str) -> Result<Link, NicError> {
    let mut rtnl = Rtnl::open().map_err(|source| NicError::Netlink {
        iface: name.into(),
        source,
    })?;
    rtnl.link_by_name(name)
        .map_err(|source| NicError::Netlink {
            iface: name.into(),
            source,
        })?
        .ok_or_else(|| NicError::NoSuchLink(name.into()))
}

/// `tpr<pid><role><counter>`: role `n` for a guest's macvtap, `h` for the host's macvlan.
fn generated_name(role: char) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{LINK_PREFIX}{}{role}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Why creating a macvtap on `lower` failed, where the other ports on it tell: the MAC is another
/// port's (EADDRINUSE), or a passthru port would not be alone (EINVAL). None when they do not tell.
fn explain_create_error(
    rtnl: &mut Rtnl,
    lower: &Link,
    mode: MacvtapMode,
    mac: MacAddr,
) -> Option<NicError> {
    let ports: Vec<Link> = rtnl
        .links()
        .ok()?
        .into_iter()
        .filter(|l| {
            l.parent == Some(lower.index)
                && matches!(l.kind.as_deref(), Some("macvtap" | "macvlan"))
        })
        .collect();
    if let Some(holder) = ports.iter().find(|p| p.mac == Some(mac)) {
        return Some(NicError::MacInUse {
            mac,
            lower: lower.name.clone(),
            holder: holder.name.clone(),
        });
    }
    if let Some(owner) = ports
        .iter()
        .find(|p| p.macvlan_mode == Some(MacvtapMode::Passthru))
    {
        return Some(NicError::LowerTaken {
            lower: lower.name.clone(),
            why: format!(
                "{} {} holds it in passthru mode, alone; no other macvtap or macvlan can be added to it",
                owner.kind.as_deref().unwrap_or("link"),
                owner.name
            ),
        });
    }
    if mode == MacvtapMode::Passthru {
        if let Some(other) = ports.first() {
            return Some(NicError::LowerTaken {
                lower: lower.name.clone(),
                why: format!(
                    "mode=passthru needs the lower device alone, but {} {} is already on it",
                    other.kind.as_deref().unwrap_or("link"),
                    other.name
                ),
            });
        }
    }
    None
}

/// Fails when `host`'s address is already on some interface in this network namespace.
fn check_address_free(host: &HostAddr) -> Result<(), NicError> {
    let netlink_err = |source| NicError::Netlink {
        iface: format!("the addresses in use (for host={host})"),
        source,
    };
    let mut rtnl = Rtnl::open().map_err(netlink_err)?;
    let Some(taken) = rtnl
        .addresses()
        .map_err(netlink_err)?
        .into_iter()
        .find(|a| a.addr == host.addr)
    else {
        return Ok(());
    };
    let iface = rtnl
        .links()
        .map_err(netlink_err)?
        .into_iter()
        .find(|l| l.index == taken.index)
        .map(|l| l.name)
        .unwrap_or_else(|| format!("link #{}", taken.index));
    Err(NicError::AddressInUse { addr: *host, iface })
}

/// The host's port on `lower`: a bridge-mode macvlan holding `host`'s address, deleted on drop.
fn add_host_port(
    rtnl: &mut Rtnl,
    lower_index: u32,
    lower: &str,
    host: &HostAddr,
) -> Result<CreatedLink, NicError> {
    let name = generated_name('h');
    let netlink_err = |source| NicError::Netlink {
        iface: name.clone(),
        source,
    };
    rtnl.create_macvlan_bridge(&name, lower_index, MacAddr::random_local())
        .map_err(netlink_err)?;
    let mut port = CreatedLink {
        index: None,
        name: name.clone(),
        kind: "macvlan",
    };
    let link = rtnl
        .link_by_name(&name)
        .map_err(netlink_err)?
        .ok_or_else(|| NicError::NoSuchLink(name.clone()))?;
    port.index = Some(link.index);
    rtnl.add_address(link.index, host.addr, host.prefix)
        .map_err(netlink_err)?;
    log::info!("created macvlan {name} with {host} on {lower}: the host's port to its guests");
    Ok(port)
}

fn tap_open_error(name: &str, queues: usize, e: TapError) -> NicError {
    match &e {
        TapError::SetIff { source, .. } if source.raw_os_error() == Some(libc::EINVAL) => {
            NicError::Queues {
                iface: name.into(),
                why: format!(
                "TUNSETIFF refused {} queue(s): the existing tap was created {} IFF_MULTI_QUEUE",
                queues,
                if queues > 1 { "without" } else { "with" }
            ),
            }
        }
        TapError::Open { source, path, .. } if is_permission(source) => NicError::Permission {
            iface: name.into(),
            path: path.clone(),
        },
        _ => NicError::Tap(e),
    }
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}

/// Opens `queues` queues of the macvtap `link`, finding or making its `/dev/tapN` node.
fn open_macvtap(link: &Link, queues: usize, opts: &OpenOptions) -> Result<Nic, NicError> {
    let kind = link.kind.clone().unwrap_or_else(|| "plain".into());
    if kind != "macvtap" {
        return Err(NicError::NotMacvtap {
            name: link.name.clone(),
            kind,
        });
    }
    let mac = link.mac.ok_or_else(|| NicError::NoMac(link.name.clone()))?;
    let (major, minor) = char_dev_number(link)?;
    let node = opts.dev_dir.join(format!("tap{}", link.index));
    let mut private = None;
    match fs::symlink_metadata(&node) {
        Ok(meta) if !meta.file_type().is_char_device() => {
            return Err(NicError::WrongNode {
                iface: link.name.clone(),
                path: node.display().to_string(),
                found: describe(&meta),
                major,
                minor,
            });
        }
        // Another char device: /dev/tapN is named by ifindex, which each network namespace counts
        // on its own, so a macvtap of another namespace (or one long gone) may hold the name.
        // Ours gets a private node, as when there is none.
        Ok(meta) if (libc::major(meta.rdev()), libc::minor(meta.rdev())) != (major, minor) => {
            log::debug!(
                "{} is {}, not macvtap {}'s {major}:{minor}; using a private node",
                node.display(),
                describe(&meta),
                link.name
            );
            private = Some(make_private_node(link, major, minor, opts)?);
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            private = Some(make_private_node(link, major, minor, opts)?);
        }
        Err(source) => {
            return Err(NicError::MakeNode {
                iface: link.name.clone(),
                path: node.display().to_string(),
                source,
            })
        }
    }
    let path = private
        .as_ref()
        .map_or(node.as_path(), |p| p.path.as_path());
    let mut opened = Vec::with_capacity(queues);
    for i in 0..queues {
        let queue = TapQueue::open_node(path, &link.name).map_err(|e| match e {
            TapError::Open { ref source, .. } if is_permission(source) => NicError::Permission {
                iface: link.name.clone(),
                path: path.display().to_string(),
            },
            TapError::Open { ref source, .. }
                if i > 0 && source.raw_os_error() == Some(libc::EBUSY) =>
            {
                NicError::Queues {
                    iface: link.name.clone(),
                    why: format!("the macvtap accepted {i} queue(s) but {queues} were asked"),
                }
            }
            e => NicError::Tap(e),
        })?;
        opened.push(queue);
    }
    drop(private);
    Ok(Nic {
        iface: link.name.clone(),
        index: Some(link.index),
        mac,
        mtu: link.mtu,
        queues: opened,
        offloads: 0,
        created: None,
        host_port: None,
    })
}

fn char_dev_number(link: &Link) -> Result<(u32, u32), NicError> {
    let path = format!("/sys/class/net/{}/macvtap/tap{}/dev", link.name, link.index);
    let sysfs_err = |source| NicError::Sysfs {
        iface: link.name.clone(),
        path: path.clone(),
        source,
    };
    let text = fs::read_to_string(&path).map_err(sysfs_err)?;
    let parsed = text
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.ok_or_else(|| {
        sysfs_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected MAJOR:MINOR, found {:?}", text.trim()),
        ))
    })
}

fn describe(meta: &fs::Metadata) -> String {
    let ft = meta.file_type();
    if ft.is_file() {
        "a regular file".into()
    } else if ft.is_dir() {
        "a directory".into()
    } else if ft.is_symlink() {
        "a symbolic link".into()
    } else if ft.is_char_device() {
        format!(
            "char device {}:{}",
            libc::major(meta.rdev()),
            libc::minor(meta.rdev())
        )
    } else {
        "not a char device".into()
    }
}

fn make_private_node(
    link: &Link,
    major: u32,
    minor: u32,
    opts: &OpenOptions,
) -> Result<PrivateNode, NicError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = opts.runtime_dir.join(format!(
        "node-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let path = dir.join(format!("tap{}", link.index));
    let make_err = |source| NicError::MakeNode {
        iface: link.name.clone(),
        path: path.display().to_string(),
        source,
    };
    fs::create_dir_all(&opts.runtime_dir).map_err(make_err)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(make_err)?;
    let guard = PrivateNode {
        dir,
        path: path.clone(),
    };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| make_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: mknod reads the NUL-terminated path, which lives until the call returns.
    let ret = unsafe {
        libc::mknod(
            cpath.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    };
    if ret < 0 {
        return Err(make_err(io::Error::last_os_error()));
    }
    log::debug!("made {} for macvtap {}", path.display(), link.name);
    Ok(guard)
}

#[cfg(test)]
mod tests {
    thread_local! {
        /// Makes the look-up right after a link= macvtap's creation fail, on this thread.
        pub static LOOKUP_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    use super::*;

    #[test]
    fn specs_print_as_they_parse() {
        for text in [
            "macvtap=mvt0",
            "link=eth1,mode=vepa,mac=52:54:00:00:00:01",
            "tap=tap0,queues=2",
            "fd=3",
            "link=eth1,mode=bridge,queues=2,vhost=on",
            "fd=3,coalesce=0",
        ] {
            let spec: NicSpec = text.parse().unwrap();
            assert_eq!(spec.to_string().parse::<NicSpec>().unwrap(), spec, "{text}");
        }
        let spec: NicSpec = "link=lower0".parse().unwrap();
        assert_eq!(spec.to_string(), "link=lower0,mode=bridge");
        let text = "link=lower0,mode=bridge,host=10.0.0.1/24";
        assert_eq!(text.parse::<NicSpec>().unwrap().to_string(), text);
    }

    fn ok(spec: &str) -> NicSpec {
        spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    #[test]
    fn parses_specs() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().expect("mac");
        let cases = [
            ("macvtap=mvt0", NicKind::Macvtap("mvt0".into()), None, 1),
            (
                "macvtap=mvt0,mac=52:54:00:00:00:01,queues=4",
                NicKind::Macvtap("mvt0".into()),
                Some(mac),
                4,
            ),
            (
                "link=eth1",
                NicKind::Link {
                    lower: "eth1".into(),
                    mode: MacvtapMode::Bridge,
                    host: None,
                },
                None,
                1,
            ),
            (
                "link=eth1,mode=vepa,queues=2",
                NicKind::Link {
                    lower: "eth1".into(),
                    mode: MacvtapMode::Vepa,
                    host: None,
                },
                None,
                2,
            ),
            (
                "link=eth1,mode=passthru",
                NicKind::Link {
                    lower: "eth1".into(),
                    mode: MacvtapMode::Passthru,
                    host: None,
                },
                None,
                1,
            ),
            (
                "link=eth1,host=10.0.0.1/24",
                NicKind::Link {
                    lower: "eth1".into(),
                    mode: MacvtapMode::Bridge,
                    host: Some(HostAddr {
                        addr: "10.0.0.1".parse().unwrap(),
                        prefix: 24,
                    }),
                },
                None,
                1,
            ),
            (
                "link=eth1,mode=vepa,host=fd00::1/64",
                NicKind::Link {
                    lower: "eth1".into(),
                    mode: MacvtapMode::Vepa,
                    host: Some(HostAddr {
                        addr: "fd00::1".parse().unwrap(),
                        prefix: 64,
                    }),
                },
                None,
                1,
            ),
            ("tap=tap0,queues=2", NicKind::Tap("tap0".into()), None, 2),
            ("fd=3,mac=52:54:00:00:00:01", NicKind::Fd(3), Some(mac), 1),
        ];
        for (text, kind, mac, queues) in cases {
            let vhost = VhostMode::Off;
            let want = NicSpec {
                kind,
                mac,
                queues,
                vhost,
                coalesce_us: DEFAULT_COALESCE_US,
            };
            assert_eq!(ok(text), want, "{text}");
        }
        assert_eq!(ok("fd=3,vhost=on").vhost, VhostMode::On);
        assert_eq!(ok("tap=tap0,vhost=off,queues=2").vhost, VhostMode::Off);
        assert_eq!(ok("fd=3,coalesce=0").coalesce_us, 0);
        assert_eq!(ok("fd=3,coalesce=250").coalesce_us, 250);
        let user = ok("vhost-user=/run/net0.sock,queues=2,mac=52:54:00:00:00:01");
        assert_eq!(user.kind, NicKind::VhostUser("/run/net0.sock".into()));
        assert_eq!((user.queues, user.mac), (2, Some(mac)));
        assert_eq!(
            user.to_string(),
            "vhost-user=/run/net0.sock,mac=52:54:00:00:00:01,queues=2"
        );
    }

    #[test]
    fn refuses_bad_specs_saying_why() {
        let cases = [
            ("mvt0", "expected macvtap=NAME"),
            ("macvtap=", "needs a value"),
            ("bridge=br0", "unknown kind"),
            ("macvtap=mvt0,queues=0", "queues=0"),
            ("macvtap=mvt0,queues=17", "from 1 to 16"),
            ("macvtap=mvt0,queues=x", "queues=x"),
            ("macvtap=mvt0,mode=bridge", "mode= only goes with link="),
            ("link=eth1,mode=source", "unknown macvtap mode"),
            ("macvtap=mvt0,speed=10", "unknown option"),
            ("macvtap=mvt0,vhost=yes", "vhost=yes: give on or off"),
            ("macvtap=mvt0,coalesce=-1", "coalesce=-1: give microseconds"),
            ("macvtap=mvt0,coalesce=10001", "from 0 (none) to 10000"),
            ("macvtap=mvt0,mac", "not KEY=VALUE"),
            ("macvtap=averyveryverylongname", "longer than 15"),
            ("fd=-1", "descriptor number of 3 or more"),
            ("fd=three", "descriptor number of 3 or more"),
            ("fd=0", "Tapir's own stdio"),
            ("fd=2", "Tapir's own stdio"),
            ("fd=3,queues=2", "hands over one queue"),
            (
                "vhost-user=/s,vhost=on",
                "vhost= does not go with vhost-user=",
            ),
            (
                "vhost-user=/s,coalesce=0",
                "coalesce= does not go with vhost-user=",
            ),
            ("vhost-user=/s,mode=bridge", "mode= only goes with link="),
            ("vhost-user=", "needs a value"),
            ("link=eth1,host=10.0.0.1", "give ADDR/PREFIX"),
            (
                "link=eth1,host=10.0.0.300/24",
                "not an IPv4 or IPv6 address",
            ),
            ("link=eth1,host=10.0.0.1/33", "from 0 to 32"),
            ("link=eth1,host=fd00::1/129", "from 0 to 128"),
            ("link=eth1,host=10.0.0.1/x", "from 0 to 32"),
            (
                "link=eth1,host=0.0.0.0/24",
                "cannot be an interface's own address",
            ),
            (
                "link=eth1,host=224.0.0.1/4",
                "cannot be an interface's own address",
            ),
            (
                "link=eth1,host=255.255.255.255/32",
                "cannot be an interface's own address",
            ),
            (
                "macvtap=mvt0,host=10.0.0.1/24",
                "host= only goes with link=",
            ),
            (
                "link=eth1,mode=private,host=10.0.0.1/24",
                "cannot work with mode=private",
            ),
            (
                "link=eth1,mode=passthru,host=10.0.0.1/24",
                "cannot work with mode=passthru",
            ),
        ];
        for (text, why) in cases {
            let err = text.parse::<NicSpec>().expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err:?} lacks {why:?}");
        }
        let err = "macvtap=m,mac=01:00:5e:00:00:01"
            .parse::<NicSpec>()
            .expect_err("multicast");
        assert!(matches!(
            err,
            NicError::Mac {
                source: MacError::Multicast(_),
                ..
            }
        ));
    }

    #[test]
    fn tapir_named_links_tell_their_owner() {
        assert_eq!(link_owner("tpr1234n0"), Some(1234));
        assert_eq!(link_owner("tpr77n12"), Some(77));
        assert_eq!(link_owner("tpr77h3"), Some(77));
        for other in [
            "mvt0", "tpr", "tprn0", "tpr12", "tpr12n", "tprxn0", "tpr1n2x", "xtpr1n0",
        ] {
            assert_eq!(link_owner(other), None, "{other}");
        }
        assert_eq!(link_owner(&generated_name('n')), Some(std::process::id()));
        assert_eq!(link_owner(&generated_name('h')), Some(std::process::id()));
    }

    #[test]
    fn an_fd_that_is_not_open_is_refused_not_closed() {
        // Past any descriptor this test process has open.
        let err = Nic::open(&ok("fd=1000000"), &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, NicError::FdNotOpen(1000000)), "{err}");
    }

    #[test]
    #[ignore = "needs root (a network namespace and a macvtap): run by scripts/test"]
    fn a_macvtap_whose_look_up_fails_right_after_creation_is_deleted() {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread (and the processes it starts).
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let ip = std::process::Command::new("ip")
                .args([
                    "link", "add", "lower0", "type", "veth", "peer", "name", "peer0",
                ])
                .status()
                .expect("running ip");
            assert!(ip.success(), "ip link add lower0 type veth");
            LOOKUP_FAILS.with(|f| f.set(true));
            let err = Nic::open(&ok("link=lower0"), &OpenOptions::default()).unwrap_err();
            assert!(matches!(err, NicError::NoSuchLink(_)), "{err}");
            let links = Rtnl::open().unwrap().links().unwrap();
            let left: Vec<_> = links
                .iter()
                .filter(|l| l.kind.as_deref() == Some("macvtap"))
                .map(|l| l.name.clone())
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        })
        .join()
        .unwrap();
    }
}
