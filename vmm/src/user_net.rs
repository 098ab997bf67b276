//! `tapir vhost-user-net`: Tapir's macvtap data path as a vhost-user-net backend for another VMM.
//! One NIC (any `--net` SPEC: a macvtap created with `link=`, an existing one, a tap, an fd) is
//! served on a Unix socket to one frontend at a time; when the frontend goes away (a guest that
//! powered off, a QEMU that crashed) the device is stopped and the next frontend is served.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tapir_devices::virtio::net::{NetCounters, UserNet, UserNetHandler};
use tapir_net_backend::{Nic, NicError, NicSpec, OpenOptions, TapQueue, VhostMode};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::seccomp::{self, Filters, Kind, Seccomp, SeccompError, StopOnDenial};

/// Requests refused one after the other before a frontend is disconnected: a frontend that keeps
/// sending what the backend refuses is not going to work, and must not keep a thread busy.
const MAX_REFUSED_IN_A_ROW: u32 = 64;

/// Errors of the daemon; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error("NIC {spec}")]
    Nic {
        spec: String,
        #[source]
        source: NicError,
    },
    #[error("NIC {0}: vhost=on does not apply to a vhost-user backend (its frontend's rings are served by Tapir's own data plane)")]
    VhostOn(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0}: another backend is listening there")]
    InUse(PathBuf),
    #[error("creating the virtio-net device for {spec}")]
    Device {
        spec: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on the vhost-user socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the queue pairs' threads")]
    Threads(#[source] std::io::Error),
    #[error("starting the serving thread")]
    ServerThread(#[source] std::io::Error),
    #[error("setting up the sandbox")]
    Seccomp(#[from] SeccompError),
    #[error("a thread made system call {0}, which its seccomp allow-list lacks (run with --seccomp off to see whether it is the sandbox's fault)")]
    Denied(i64),
}

/// Where the serving thread leaves the error it ended with.
pub type ServerEnd = Arc<Mutex<Option<UserNetError>>>;

/// The backend of one NIC and where it is served, with the NIC's host side: dropping it stops
/// the pairs' threads and deletes a macvtap created for `link=`, whatever thread still serves
/// (see [`UserNetDaemon::server`]).
#[derive(Debug)]
pub struct UserNetDaemon {
    server: UserNetServer,
    description: String,
    filters: Arc<Filters>,
    /// Held for its Drop: a macvtap created for `link=` goes with it.
    _nic: Nic,
}

/// What serves frontends: the listening socket and the device. Cheap to clone, for a thread.
#[derive(Clone, Debug)]
pub struct UserNetServer {
    socket: PathBuf,
    listener: Arc<UnixListener>,
    net: Arc<UserNet<TapQueue>>,
}

impl UserNetDaemon {
    /// Opens the NIC `spec` names, makes its device, starts its pairs' threads (each under its
    /// seccomp allow-list, as `seccomp` says) and listens on `socket` (with the process's umask
    /// deciding its mode).
    pub fn new(socket: &Path, spec: &NicSpec, seccomp: Seccomp) -> Result<Self, UserNetError> {
        let filters = Filters::daemon(seccomp)?;
        if spec.vhost == VhostMode::On {
            return Err(UserNetError::VhostOn(spec.to_string()));
        }
        if let Ok(meta) = std::fs::symlink_metadata(socket) {
            if !meta.file_type().is_socket() {
                return Err(UserNetError::NotASocket(socket.to_owned()));
            }
            if UnixStream::connect(socket).is_ok() {
                return Err(UserNetError::InUse(socket.to_owned()));
            }
        }
        let mut nic =
            Nic::open(spec, &OpenOptions::default()).map_err(|source| UserNetError::Nic {
                spec: spec.to_string(),
                source,
            })?;
        let mtu = nic.mtu().and_then(|m| u16::try_from(m).ok());
        let pairs = nic.queues().len();
        let description = format!(
            "{} (mac {}, {pairs} queue pair{})",
            nic.iface(),
            nic.mac(),
            if pairs == 1 { "" } else { "s" }
        );
        let net = UserNet::new(
            format!("vhost-user-net {}", nic.iface()),
            nic.take_queues(),
            nic.mac().0,
            mtu,
            nic.supported_offloads(),
        )
        .map_err(|source| UserNetError::Device {
            spec: spec.to_string(),
            source,
        })?
        .with_coalescing(std::time::Duration::from_micros(u64::from(
            spec.coalesce_us,
        )));
        let net = Arc::new(net);
        // a stale socket (its daemon is gone: nothing answered above) is replaced
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|source| UserNetError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        let daemon = Self {
            server: UserNetServer {
                socket: socket.to_owned(),
                listener: Arc::new(listener),
                net: net.clone(),
            },
            description,
            filters,
            _nic: nic,
        };
        // (dropping `daemon` on this error stops the threads that did start)
        for p in 0..net.pair_count() {
            let net = net.clone();
            seccomp::spawn(
                format!("tapir-vu-p{p}"),
                &daemon.filters,
                Kind::UserPair,
                move || net.run_pair(p),
            )
            .map_err(UserNetError::Threads)?;
        }
        Ok(daemon)
    }

    /// Serves frontends on a thread of its own, under its allow-list, until accepting fails;
    /// `done` is written when it ends, and the error it ended with is left in the returned slot.
    /// A system call the sandbox refused in any of the daemon's threads writes `stop` (the
    /// guard returned must live as long as the daemon serves).
    pub fn serve_on_thread(
        &self,
        done: vmm_sys_util::eventfd::EventFd,
        stop: i32,
    ) -> Result<(ServerEnd, StopOnDenial), UserNetError> {
        let guard = StopOnDenial::new(stop);
        let slot = Arc::new(Mutex::new(None));
        let (server, ended) = (self.server(), slot.clone());
        seccomp::spawn(
            "tapir-vu-serve".into(),
            &self.filters,
            Kind::UserServer,
            move || {
                if let Err(e) = server.serve() {
                    *ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
                let _ = done.write(1);
            },
        )
        .map_err(UserNetError::ServerThread)?;
        Ok((slot, guard))
    }

    /// The system call the sandbox refused, if one was.
    pub fn denied_syscall() -> Option<i64> {
        seccomp::denied_syscall()
    }

    /// What is served: the host interface, its MAC (the frontend's guest must use it) and pairs.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.server.net.counters()
    }

    /// The pairs' rings as they are now, for a diagnosis.
    pub fn state(&self) -> tapir_devices::virtio::net::NetState {
        self.server.net.state()
    }

    /// The server, to run on a thread of its own ([`UserNetServer::serve`]).
    pub fn server(&self) -> UserNetServer {
        self.server.clone()
    }
}

impl Drop for UserNetDaemon {
    fn drop(&mut self) {
        self.server.net.stop_workers();
        if let Ok(meta) = std::fs::symlink_metadata(&self.server.socket) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(&self.server.socket);
            }
        }
    }
}

impl UserNetServer {
    /// Serves frontends one after the other, forever; returns only when accepting fails.
    pub fn serve(&self) -> Result<(), UserNetError> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.serve_connection(stream),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(UserNetError::Listen {
                        path: self.socket.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Serves one frontend until it disconnects (or keeps sending what is refused), then stops
    /// the device.
    pub fn serve_connection(&self, stream: UnixStream) {
        log::info!("vhost-user-net: a frontend connected");
        let handler = Arc::new(Mutex::new(UserNetHandler::new(self.net.clone())));
        let mut requests = BackendReqHandler::from_stream(stream, handler);
        let mut refused = 0u32;
        loop {
            match requests.handle_request() {
                Ok(()) => refused = 0,
                Err(e) if ends_connection(&e) => {
                    log::info!("vhost-user-net: the frontend disconnected ({e})");
                    break;
                }
                Err(e) => {
                    // A request refused; the messages around it are intact. (QEMU 7.2 enables
                    // rings at reset before it acks PROTOCOL_FEATURES, which the vhost crate
                    // refuses: that one is harmless, the rings are enabled again at start.)
                    log::debug!("vhost-user-net: a request was refused: {e}");
                    refused += 1;
                    if refused > MAX_REFUSED_IN_A_ROW {
                        log::warn!(
                            "vhost-user-net: {refused} requests refused in a row (the last: {e}); disconnecting the frontend"
                        );
                        break;
                    }
                }
            }
        }
        self.net.disconnected();
    }
}

/// Whether an error of one request leaves the connection unusable (the socket is gone, or the
/// stream of messages lost its framing) rather than refusing that request only.
fn ends_connection(e: &VuError) -> bool {
    !matches!(
        e,
        VuError::InactiveFeature(_)
            | VuError::InactiveOperation(_)
            | VuError::InvalidParam
            | VuError::InvalidOperation(_)
            | VuError::ReqHandlerError(_)
            | VuError::FeatureMismatch
            | VuError::BackendInternalError
    )
}
