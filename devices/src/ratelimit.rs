//! Log lines a guest can trigger, rate-limited per call site: at most one line every
//! [`INTERVAL`], which then says how many were held back since the last one. A guest that breaks
//! the rules in a loop costs the host one line every few seconds, not a flooded disk.
//!
//! `devices/clippy.toml` forbids the plain `log` macros at warn level and above in this crate, so a
//! new guest-triggerable line cannot bypass the limit by accident.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Shortest time between two lines from one call site.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// One call site's state: when it last logged, and what it held back since.
#[derive(Debug)]
pub struct RateLimit {
    /// Milliseconds since the process's first rate-limited line, plus one (0: never logged).
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let ms = START.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
}

impl RateLimit {
    pub const fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out now; if so, how many were held back before it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let interval = u64::try_from(INTERVAL.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= interval;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `limited!(Level, "format", args...)`: a log line at most once per [`INTERVAL`] from this call
/// site.
#[macro_export]
macro_rules! limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if log::log_enabled!($level) {
            if let Some(held) = LIMIT.admit() {
                #[allow(clippy::disallowed_macros)]
                if held == 0 {
                    log::log!($level, $($arg)+);
                } else {
                    log::log!($level, "{} ({held} more like it held back)", format_args!($($arg)+));
                }
            }
        }
    }};
}

/// A rate-limited warning.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::limited!(log::Level::Warn, $($arg)+) };
}

/// A rate-limited error.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::limited!(log::Level::Error, $($arg)+) };
}

/// A rate-limited info line (activation, reset: a driver may repeat them in a loop).
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::limited!(log::Level::Info, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count_of_what_was_held_back() {
        let limit = RateLimit::new();
        let step = u64::try_from(INTERVAL.as_millis()).unwrap();
        assert_eq!(limit.admit_at(1), Some(0), "the first line goes out");
        for t in 2..1000 {
            assert_eq!(limit.admit_at(t), None, "within the interval");
        }
        assert_eq!(
            limit.admit_at(1 + step),
            Some(998),
            "then one, with the count"
        );
        assert_eq!(limit.admit_at(2 + step), None);
        assert_eq!(limit.admit_at(1 + 3 * step), Some(1));
    }
}
