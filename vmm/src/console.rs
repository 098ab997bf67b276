//! The guest's serial console on the host side: where its output goes (and the watch for a kernel
//! panic in it), and how the user's input reaches it (raw terminal, the Ctrl-A x escape, and a
//! feeder that waits for room in the UART's FIFO instead of dropping bytes).
//!
//! Output never blocks the vCPU that writes the UART: bytes go to a bounded queue that a thread of
//! its own ("tapir-console-out") writes to the sink. A sink that stalls (a terminal on hold, a
//! pipe nobody reads) costs the guest the bytes that do not fit ([`OUTPUT_QUEUE`]), counted, never
//! a vCPU stuck inside the serial port's lock.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tapir_devices::bus::lock;
use tapir_devices::legacy::SerialPort;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitLatch, ExitReason};
use crate::seccomp::{self, Filters, Kind};

/// Where the guest's console output goes; `Stdio` also sends the host's stdin to the guest.
pub enum Console {
    /// Output to stdout, input from stdin (raw mode when stdin is a terminal).
    Stdio,
    /// Output discarded, no input.
    None,
    /// Output appended to a file created or truncated at start, no input.
    File(PathBuf),
    /// Output to a writer of the embedding program, no input.
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdio => write!(f, "stdio"),
            Self::None => write!(f, "none"),
            Self::File(p) => write!(f, "file={}", p.display()),
            Self::Writer(_) => write!(f, "writer"),
        }
    }
}

const PANIC: &str = "Kernel panic - not syncing: ";
const PANIC_END: &str = "---[ end Kernel panic - not syncing: ";
/// Longest console line kept for the panic watch; the rest of a longer line is ignored.
const MAX_LINE: usize = 512;

/// What a console line says about a kernel panic.
#[derive(Debug, PartialEq, Eq)]
pub enum PanicLine<'a> {
    Start(&'a str),
    End(&'a str),
}

/// Reads the kernel's panic banners from one console line (printk timestamp and CR allowed).
pub fn classify(line: &str) -> Option<PanicLine<'_>> {
    let line = line.trim_end_matches(['\r', '\n']);
    let text = match line.strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(line, |(_, text)| text),
        None => line,
    };
    if let Some(message) = text.strip_prefix(PANIC) {
        Some(PanicLine::Start(message))
    } else {
        text.strip_prefix(PANIC_END)
            .map(|message| PanicLine::End(message.trim_end_matches(" ]---")))
    }
}

/// Guest output held for a slow sink; what does not fit is dropped and counted.
pub const OUTPUT_QUEUE: usize = 256 * 1024;

#[derive(Default)]
struct QueueState {
    bytes: VecDeque<u8>,
    /// The writer thread holds bytes it took and has not finished writing.
    writing: bool,
    closed: bool,
    dropped: u64,
}

/// The bounded queue between the UART and the thread that writes the sink.
#[derive(Default)]
pub(crate) struct OutputQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

impl OutputQueue {
    fn push(&self, bytes: &[u8]) {
        let mut st = lock(&self.state);
        let room = OUTPUT_QUEUE.saturating_sub(st.bytes.len());
        let (fits, rest) = bytes.split_at(room.min(bytes.len()));
        st.bytes.extend(fits);
        st.dropped += rest.len() as u64;
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until the sink has everything written so far, or `timeout` passed; true when drained.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while !st.bytes.is_empty() || st.writing {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            st = match self.changed.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Bytes dropped because the sink did not keep up.
    pub fn dropped(&self) -> u64 {
        lock(&self.state).dropped
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// The writer thread's loop: everything queued goes to `sink`, until closed and empty.
    fn serve(&self, mut sink: Box<dyn Write + Send>) {
        let mut chunk = Vec::with_capacity(OUTPUT_QUEUE);
        let mut sink_ok = true;
        loop {
            {
                let mut st = lock(&self.state);
                st.writing = false;
                self.changed.notify_all();
                while st.bytes.is_empty() && !st.closed {
                    st = match self.changed.wait(st) {
                        Ok(st) => st,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                }
                if st.bytes.is_empty() {
                    return;
                }
                chunk.clear();
                chunk.extend(st.bytes.drain(..));
                st.writing = true;
            }
            // A sink that failed once (closed pipe, full disk) is not retried for every byte.
            if sink_ok {
                sink_ok = sink.write_all(&chunk).and_then(|()| sink.flush()).is_ok();
                if !sink_ok {
                    log::warn!(
                        "console output: the sink refused a write; output is dropped from now on"
                    );
                }
            }
        }
    }
}

/// The serial port's writer: watches the guest's output for a panic and queues it for the sink.
pub(crate) struct GuestOutput {
    queue: Option<Arc<OutputQueue>>,
    line: Vec<u8>,
    latch: Arc<ExitLatch>,
}

impl GuestOutput {
    /// The output for `console`, with its writer thread (sandboxed by `filters`) when there is a
    /// sink.
    pub fn new(
        console: Console,
        latch: Arc<ExitLatch>,
        filters: &Arc<Filters>,
    ) -> io::Result<Self> {
        let sink: Option<Box<dyn Write + Send>> = match console {
            Console::Stdio => Some(Box::new(io::stdout())),
            Console::None => None,
            Console::File(path) => Some(Box::new(File::create(path)?)),
            Console::Writer(w) => Some(w),
        };
        let queue = match sink {
            Some(sink) => {
                let queue = Arc::new(OutputQueue::default());
                let served = queue.clone();
                seccomp::spawn(
                    "tapir-console-out".into(),
                    filters,
                    Kind::ConsoleOut,
                    move || served.serve(sink),
                )?;
                Some(queue)
            }
            None => None,
        };
        Ok(Self {
            queue,
            line: Vec::with_capacity(MAX_LINE),
            latch,
        })
    }

    /// The queue to the sink, to drain it when the VM stops.
    pub fn queue(&self) -> Option<Arc<OutputQueue>> {
        self.queue.clone()
    }

    fn watch(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() < MAX_LINE {
                    self.line.push(b);
                }
                continue;
            }
            match classify(&String::from_utf8_lossy(&self.line)) {
                Some(PanicLine::Start(m)) => self.latch.note_panic(m.to_owned()),
                Some(PanicLine::End(m)) => {
                    self.latch.note_panic(m.to_owned());
                    self.latch.request(ExitReason::GuestPanic {
                        message: m.to_owned(),
                    });
                }
                None => {}
            }
            self.line.clear();
        }
    }
}

impl Drop for GuestOutput {
    fn drop(&mut self) {
        if let Some(q) = &self.queue {
            q.close();
        }
    }
}

impl Write for GuestOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch(buf);
        if let Some(q) = &self.queue {
            q.push(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const CTRL_A: u8 = 0x01;

/// QEMU-style console escapes: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A followed by
/// anything else sends both.
#[derive(Default)]
pub struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// Appends the bytes meant for the guest to `out`; true when the user asked to quit.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if std::mem::take(&mut self.pending) {
                match b {
                    b'x' | b'X' => return true,
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend([CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

/// Puts a terminal in raw mode (no echo, no line editing, no signals from keys, output processing
/// kept) and restores its exact previous settings when dropped.
pub(crate) struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; None when it is not one.
    pub fn enter(fd: RawFd) -> io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to write to.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same descriptor.
        if unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) } != 0 {
            log::warn!("restoring the terminal: {}", io::Error::last_os_error());
        }
    }
}

/// Waits until one of `fds` is readable; returns which ones.
fn wait_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polls` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(polls.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Feeds the host's stdin to the guest's UART on its own thread until EOF or until stopped.
pub(crate) struct InputPump {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl InputPump {
    /// Starts feeding `input` (a readable fd, usually 0) to `serial`. `room` is the port's
    /// "FIFO drained" eventfd. With `escapes`, Ctrl-A x requests a stop through `latch`.
    pub fn start(
        input: RawFd,
        serial: Arc<Mutex<SerialPort>>,
        room: EventFd,
        escapes: bool,
        latch: Arc<ExitLatch>,
        filters: &Arc<Filters>,
    ) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_fd = stop.try_clone()?;
        let thread = seccomp::spawn(
            "tapir-console".into(),
            filters,
            Kind::ConsoleIn,
            move || {
                if let Err(e) = pump(
                    input,
                    &serial,
                    &room,
                    &stop_fd,
                    escapes.then(EscapeFilter::default),
                    &latch,
                ) {
                    log::warn!("console input stopped: {e}");
                }
            },
        )?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for InputPump {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pump(
    input: RawFd,
    serial: &Mutex<SerialPort>,
    room: &EventFd,
    stop: &EventFd,
    mut escapes: Option<EscapeFilter>,
    latch: &ExitLatch,
) -> io::Result<()> {
    let mut buf = [0u8; 256];
    let mut pending = Vec::with_capacity(512);
    loop {
        if !wait_readable(&[input, stop.as_raw_fd()])?[0] {
            return Ok(());
        }
        // SAFETY: reads into a buffer we own, of the length given.
        let n = unsafe { libc::read(input, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                    _ => return Err(e),
                }
            }
            n => {
                let bytes = &buf[..n as usize];
                match &mut escapes {
                    Some(filter) => {
                        if filter.feed(bytes, &mut pending) {
                            latch.request(ExitReason::ConsoleQuit);
                            return Ok(());
                        }
                    }
                    None => pending.extend_from_slice(bytes),
                }
            }
        }
        // Hand everything over before reading more; wait for the guest to drain a full FIFO.
        while !pending.is_empty() {
            let _ = room.read();
            let taken = lock(serial).enqueue_input(&pending);
            pending.drain(..taken);
            if !pending.is_empty() && wait_readable(&[room.as_raw_fd(), stop.as_raw_fd()])?[1] {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filters of Tapir's own threads, as the embedding API's default applies them.
    fn sandbox() -> Arc<Filters> {
        Filters::new(crate::Seccomp::Threads).unwrap()
    }
    use tapir_devices::BusDevice;

    #[test]
    fn panic_banners_are_recognised_with_and_without_timestamps() {
        assert_eq!(
            classify("[    1.234567] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r"),
            Some(PanicLine::Start("Attempted to kill init! exitcode=0x00000100"))
        );
        assert_eq!(
            classify("Kernel panic - not syncing: VFS: Unable to mount root fs"),
            Some(PanicLine::Start("VFS: Unable to mount root fs"))
        );
        assert_eq!(
            classify("---[ end Kernel panic - not syncing: sysrq triggered crash ]---\r\n"),
            Some(PanicLine::End("sysrq triggered crash"))
        );
        assert_eq!(classify("echo Kernel panic - not syncing: no"), None);
        assert_eq!(classify("[ 0.1] ordinary line"), None);
        assert_eq!(classify(""), None);
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_writer_and_drops_what_does_not_fit() {
        /// A sink that blocks forever once written to.
        struct Stalled(Arc<std::sync::Barrier>);
        impl Write for Stalled {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                self.0.wait();
                loop {
                    std::thread::park();
                }
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let entered = Arc::new(std::sync::Barrier::new(2));
        let latch = Arc::new(ExitLatch::new().unwrap());
        let mut out = GuestOutput::new(
            Console::Writer(Box::new(Stalled(entered.clone()))),
            latch,
            &sandbox(),
        )
        .unwrap();
        out.write_all(b"x").unwrap();
        entered.wait(); // the writer thread is stuck in the sink now
        let t = Instant::now();
        let chunk = [b'y'; 4096];
        for _ in 0..(2 * OUTPUT_QUEUE / chunk.len()) {
            out.write_all(&chunk).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let q = out.queue().unwrap();
        assert_eq!(q.dropped(), OUTPUT_QUEUE as u64);
        assert!(
            !q.drain(Duration::from_millis(50)),
            "a stalled sink never drains"
        );
    }

    #[test]
    fn output_reaches_the_sink_and_a_panic_end_stops_the_vm() {
        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let latch = Arc::new(ExitLatch::new().unwrap());
        let sink = Shared::default();
        let mut out = GuestOutput::new(
            Console::Writer(Box::new(sink.clone())),
            latch.clone(),
            &sandbox(),
        )
        .unwrap();
        let text = "booting\r\n[ 2.0] Kernel panic - not syncing: oops\r\nCall Trace:\r\n";
        for b in text.bytes() {
            out.write_all(&[b]).unwrap();
        }
        assert_eq!(
            latch.reason(),
            None,
            "the panic is only noted until its end banner"
        );
        out.write_all(b"---[ end Kernel panic - not syncing: oops ]---\r\n")
            .unwrap();
        assert!(out.queue().unwrap().drain(Duration::from_secs(5)));
        assert_eq!(
            latch.reason(),
            Some(ExitReason::GuestPanic {
                message: "oops".into()
            })
        );
        assert!(sink
            .0
            .lock()
            .unwrap()
            .starts_with(b"booting\r\n[ 2.0] Kernel panic"));
    }

    #[test]
    fn overlong_lines_are_cut_not_grown() {
        let latch = Arc::new(ExitLatch::new().unwrap());
        let mut out = GuestOutput::new(Console::None, latch.clone(), &sandbox()).unwrap();
        out.write_all(&vec![b'a'; 10 * MAX_LINE]).unwrap();
        assert_eq!(out.line.len(), MAX_LINE);
        out.write_all(b"\n").unwrap();
        assert!(out.line.is_empty());
    }

    #[test]
    fn escape_filter_quits_on_ctrl_a_x_and_passes_the_rest() {
        type Case<'a> = (&'a [&'a [u8]], &'a [u8], bool);
        let cases: [Case; 6] = [
            (&[b"ls\r"], b"ls\r", false),
            (&[b"a\x01x"], b"a", true),
            (&[b"a\x01", b"x"], b"a", true),
            (&[b"\x01\x01b"], b"\x01b", false),
            (&[b"\x01c"], b"\x01c", false),
            (&[b"\x03"], b"\x03", false), // Ctrl-C goes to the guest
        ];
        for (chunks, want, quit) in cases {
            let mut f = EscapeFilter::default();
            let mut out = Vec::new();
            let quitted = chunks.iter().any(|c| f.feed(c, &mut out));
            assert_eq!((out.as_slice(), quitted), (want, quit), "{chunks:?}");
        }
    }

    #[test]
    fn pump_feeds_more_than_a_fifo_through_a_pipe() {
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: fds is a valid array of two ints.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialPort::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            room.try_clone().unwrap(),
            Box::new(io::sink()),
        )));
        let latch = Arc::new(ExitLatch::new().unwrap());
        let pump = InputPump::start(r, serial.clone(), room, false, latch, &sandbox()).unwrap();
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        // SAFETY: writes our buffer to the pipe's write end, then closes it.
        unsafe {
            assert_eq!(libc::write(w, input.as_ptr().cast(), input.len()), 1000);
            libc::close(w);
        }
        // Drain like the guest's driver: read data while LSR says data ready.
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < input.len() && std::time::Instant::now() < deadline {
            let mut s = lock(&serial);
            let mut b = [0u8];
            s.read(5, &mut b);
            if b[0] & 1 != 0 {
                s.read(0, &mut b);
                got.push(b[0]);
            }
        }
        drop(pump);
        // SAFETY: closes the read end we opened.
        unsafe { libc::close(r) };
        assert_eq!(got, input, "every byte arrives, in order");
    }
}
