//! Fault injection for GetObject requests, configured at runtime by tests.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;

/// Fault injection, applied to GetObject requests only. Every setter takes
/// effect on the next request.
#[derive(Debug)]
pub struct Faults {
    fail_next: AtomicU64,
    fail_next_status: AtomicU16,
    fail_percent: AtomicU32,
    fail_percent_status: AtomicU16,
    cut_next: AtomicU64,
    shift_next: AtomicU64,
    shift_by: AtomicU64,
    stall: Mutex<StallRule>,
    get_delay: Delay,
    meta_delay: Delay,
    rng: AtomicU64,
}

/// An added latency, settable while requests run (zero: none).
#[derive(Debug, Default)]
struct Delay(AtomicU64);

impl Delay {
    fn set(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos, Ordering::SeqCst);
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct StallRule {
    remaining: u64,
    after_bytes: u64,
    pause: Duration,
}

/// A body stall: after `after_bytes` bytes, sleep `pause` once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stall {
    pub after_bytes: u64,
    pub pause: Duration,
}

/// What to do to one GetObject request, decided when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GetPlan {
    /// Answer with this status and an S3 XML error, without calling s3s.
    Fail(StatusCode),
    /// Serve it through s3s, possibly damaging the body, or answering a range `shift` bytes
    /// further on than the one asked for.
    Serve {
        cut: bool,
        stall: Option<Stall>,
        shift: u64,
    },
}

/// Fixed seed so that fractional failures are reproducible from run to run.
const RNG_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_next: AtomicU64::new(0),
            fail_next_status: AtomicU16::new(503),
            fail_percent: AtomicU32::new(0),
            fail_percent_status: AtomicU16::new(503),
            cut_next: AtomicU64::new(0),
            shift_next: AtomicU64::new(0),
            shift_by: AtomicU64::new(0),
            stall: Mutex::new(StallRule::default()),
            get_delay: Delay::default(),
            meta_delay: Delay::default(),
            rng: AtomicU64::new(RNG_SEED),
        }
    }
}

impl Faults {
    /// The next `n` GetObject requests answer `status` (e.g. 503 `SlowDown`,
    /// 500 `InternalError`) with an S3 XML error body, without touching s3s.
    ///
    /// # Panics
    /// If `status` is not a 4xx or 5xx code.
    pub fn fail_next_gets(&self, n: u64, status: u16) {
        assert_error_status(status);
        self.fail_next_status.store(status, Ordering::SeqCst);
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// This percentage of GetObject requests (picked at random) answer
    /// `status`; 0 turns it off.
    ///
    /// # Panics
    /// If `percent` is over 100 or `status` is not a 4xx or 5xx code.
    pub fn fail_fraction(&self, percent: u32, status: u16) {
        assert!(
            percent <= 100,
            "fail_fraction: percent must be 0..=100, got {percent}"
        );
        assert_error_status(status);
        self.fail_percent_status.store(status, Ordering::SeqCst);
        self.fail_percent.store(percent, Ordering::SeqCst);
    }

    /// The next `n` GetObject responses send the status line, the headers
    /// (with the full Content-Length) and only the first half of the body,
    /// then abort the connection.
    pub fn cut_next_bodies(&self, n: u64) {
        self.cut_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` ranged GetObject requests are answered with the range `by` bytes further on
    /// (same length, honest `Content-Range`, the object's ETag): a gateway that serves the wrong
    /// bytes.
    pub fn shift_next_ranges(&self, n: u64, by: u64) {
        self.shift_by.store(by, Ordering::SeqCst);
        self.shift_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` GetObject responses send `after_bytes` of body, then
    /// sleep `stall` before sending the rest.
    pub fn stall_next_bodies(&self, n: u64, after_bytes: u64, stall: Duration) {
        *self.stall_rule() = StallRule {
            remaining: n,
            after_bytes,
            pause: stall,
        };
    }

    /// Latency added before the response headers of every GetObject
    /// (`Duration::ZERO` = none).
    pub fn set_get_delay(&self, d: Duration) {
        self.get_delay.set(d);
    }

    /// Latency added before the answer to every HeadObject and ListObjects request: a slow
    /// metadata path (`Duration::ZERO` = none).
    pub fn set_meta_delay(&self, d: Duration) {
        self.meta_delay.set(d);
    }

    /// Turns every fault off.
    pub fn clear(&self) {
        self.fail_next.store(0, Ordering::SeqCst);
        self.fail_percent.store(0, Ordering::SeqCst);
        self.cut_next.store(0, Ordering::SeqCst);
        self.shift_next.store(0, Ordering::SeqCst);
        *self.stall_rule() = StallRule::default();
        self.get_delay.set(Duration::ZERO);
        self.meta_delay.set(Duration::ZERO);
    }

    /// The configured HeadObject and ListObjects latency.
    pub(crate) fn meta_delay(&self) -> Duration {
        self.meta_delay.get()
    }

    /// The configured GetObject latency.
    pub(crate) fn get_delay(&self) -> Duration {
        self.get_delay.get()
    }

    /// Decides (and consumes one-shot faults for) one GetObject request.
    /// Failures take precedence; body damage is kept for a response that
    /// actually has the object body.
    pub(crate) fn plan_get(&self) -> GetPlan {
        if take_one(&self.fail_next) {
            return GetPlan::Fail(status_code(&self.fail_next_status));
        }
        let percent = self.fail_percent.load(Ordering::SeqCst);
        if percent > 0 && self.roll_percent() < percent {
            return GetPlan::Fail(status_code(&self.fail_percent_status));
        }
        GetPlan::Serve {
            cut: take_one(&self.cut_next),
            stall: self.take_stall(),
            shift: match take_one(&self.shift_next) {
                true => self.shift_by.load(Ordering::SeqCst),
                false => 0,
            },
        }
    }

    fn take_stall(&self) -> Option<Stall> {
        let mut rule = self.stall_rule();
        if rule.remaining == 0 {
            return None;
        }
        rule.remaining -= 1;
        Some(Stall {
            after_bytes: rule.after_bytes,
            pause: rule.pause,
        })
    }

    fn stall_rule(&self) -> std::sync::MutexGuard<'_, StallRule> {
        // The rule is plain data, so a poisoned lock is still consistent.
        self.stall
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A pseudo-random number in 0..100 (xorshift64*).
    fn roll_percent(&self) -> u32 {
        let step = |mut x: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        let prev = self
            .rng
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| Some(step(x)))
            .unwrap_or(RNG_SEED);
        let out = step(prev).wrapping_mul(0x2545_F491_4F6C_DD1D);
        // `out >> 32` is below 2^32, so the remainder fits in u32.
        ((out >> 32) % 100) as u32
    }
}

/// Decrements `counter` if it is positive; true if it did.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn status_code(stored: &AtomicU16) -> StatusCode {
    StatusCode::from_u16(stored.load(Ordering::SeqCst)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn assert_error_status(status: u16) {
    assert!(
        (400..=599).contains(&status),
        "injected failure status must be 4xx or 5xx, got {status}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_faults_are_consumed_in_order() {
        let f = Faults::default();
        f.fail_next_gets(1, 500);
        f.cut_next_bodies(1);
        f.shift_next_ranges(1, 7);
        assert_eq!(
            f.plan_get(),
            GetPlan::Fail(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(
            f.plan_get(),
            GetPlan::Serve {
                cut: true,
                stall: None,
                shift: 7
            }
        );
        assert_eq!(
            f.plan_get(),
            GetPlan::Serve {
                cut: false,
                stall: None,
                shift: 0
            }
        );
    }

    #[test]
    fn fraction_is_roughly_honoured() {
        let f = Faults::default();
        f.fail_fraction(30, 503);
        let failed = (0..10_000)
            .filter(|_| matches!(f.plan_get(), GetPlan::Fail(_)))
            .count();
        assert!((2_500..3_500).contains(&failed), "{failed} of 10000 failed");
        f.clear();
        assert!(matches!(f.plan_get(), GetPlan::Serve { .. }));
    }
}
