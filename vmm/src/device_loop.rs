//! The devices' event loop on a thread of its own ("tapir-devices"): queue notifications and
//! backend fds are served there, so the main thread, which carries the stop requests (signals,
//! the stop handle, the console's quit), never waits for device work. Every device pass is
//! budgeted; should one still not return, stopping the VM does not wait for it longer than
//! [`JOIN_TIMEOUT`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, Filters, Kind};

/// How long stopping waits for the device thread before leaving it behind.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(1);

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the loop so that it sees the stop flag.
struct Wake(EventFd);

impl MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("device loop: watching its wake eventfd: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// The running device thread.
pub struct DeviceLoop {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl DeviceLoop {
    /// Starts a thread serving `subscribers` until [`DeviceLoop::stop`], sandboxed by `filters`.
    pub fn start(subscribers: Vec<Subscriber>, filters: &Arc<Filters>) -> std::io::Result<Self> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut events = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        events.add_subscriber(Arc::new(Mutex::new(Wake(wake.try_clone()?))));
        for s in subscribers {
            events.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = seccomp::spawn("tapir-devices".into(), filters, Kind::Devices, move || {
            while !flag.load(Ordering::Acquire) {
                if let Err(e) = events.run() {
                    log::error!("device loop: {e:?}");
                    break;
                }
            }
        })?;
        Ok(Self {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Whether the thread ended on its own (an event loop error, or a panic).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().map_or(true, JoinHandle::is_finished)
    }

    /// Asks the thread to end and joins it, waiting at most [`JOIN_TIMEOUT`].
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            log::error!("device loop: waking it to stop: {e}");
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !thread.is_finished() {
            if Instant::now() > deadline {
                log::error!("the device thread did not stop within {JOIN_TIMEOUT:?}; leaving it");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.join().is_err() {
            log::error!("the device thread panicked");
        }
    }
}

impl Drop for DeviceLoop {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Release);
            let _ = self.wake.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose event handling never ends.
    struct Stuck(EventFd, Arc<AtomicBool>);

    impl MutEventSubscriber for Stuck {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            self.1.store(true, Ordering::SeqCst);
            loop {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn filters() -> Arc<Filters> {
        Filters::new(crate::Seccomp::Threads).unwrap()
    }

    #[test]
    fn stopping_ends_an_idle_loop_at_once() {
        let l = DeviceLoop::start(vec![], &filters()).unwrap();
        let t = Instant::now();
        l.stop();
        assert!(t.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn stopping_does_not_wait_for_a_device_that_never_returns() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let entered = Arc::new(AtomicBool::new(false));
        let stuck: Subscriber =
            Arc::new(Mutex::new(Stuck(evt.try_clone().unwrap(), entered.clone())));
        let l = DeviceLoop::start(vec![stuck], &filters()).unwrap();
        evt.write(1).unwrap();
        while !entered.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        l.stop();
        let took = t.elapsed();
        assert!(
            took >= JOIN_TIMEOUT && took < JOIN_TIMEOUT + Duration::from_millis(500),
            "{took:?}"
        );
    }
}
