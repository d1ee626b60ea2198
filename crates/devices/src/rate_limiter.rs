//! Token-bucket rate limiting for device I/O (`iops=` and `bw=` on `--disk` and `--net`).
//!
//! Each limited quantity (operations, bytes) has a bucket holding up to one second's worth of
//! tokens, refilled continuously. A request may go when every bucket is positive; it then takes
//! its full cost, which may leave a bucket in debt (so a request larger than a bucket never
//! starves). When a request must wait, the limiter arms a timerfd for the moment the buckets are
//! positive again; the device's worker watches that descriptor and retries.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket: `rate` tokens per second, at most `rate` banked.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` tokens per second (`rate` > 0).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        TokenBucket {
            rate,
            tokens: i128::from(rate),
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000;
        if add > 0 {
            // Advance `last` only by the time that produced whole tokens, keeping the remainder.
            let used_ns = add * 1_000_000_000 / u128::from(self.rate);
            self.last += Duration::from_nanos(used_ns.min(u128::from(u64::MAX)) as u64);
            let add = i128::try_from(add).unwrap_or(i128::MAX);
            self.tokens = self.tokens.saturating_add(add).min(i128::from(self.rate));
        }
    }

    /// How long until the bucket is positive again (zero if it is).
    fn wait(&self) -> Duration {
        if self.tokens > 0 {
            return Duration::ZERO;
        }
        let missing = (1 - self.tokens) as u128;
        let ns = missing * 1_000_000_000 / u128::from(self.rate) + 1;
        Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
    }

    /// Tokens now in the bucket (negative while in debt).
    pub fn tokens(&self) -> i128 {
        self.tokens
    }
}

/// Limits for one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Operations (requests or packets) per second.
    pub ops_per_sec: Option<u64>,
    /// Bytes per second.
    pub bytes_per_sec: Option<u64>,
}

impl RateLimit {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.ops_per_sec.is_none() && self.bytes_per_sec.is_none()
    }
}

/// The limiter of one device (or one direction of one device).
pub struct RateLimiter {
    ops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter for `limit`.
    pub fn new(limit: RateLimit) -> io::Result<Self> {
        Ok(RateLimiter {
            ops: limit.ops_per_sec.filter(|&r| r > 0).map(TokenBucket::new),
            bytes: limit.bytes_per_sec.filter(|&r| r > 0).map(TokenBucket::new),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Asks to do `ops` operations moving `bytes` bytes. True: go ahead (the cost is taken).
    /// False: wait until the timer descriptor fires, then call [`RateLimiter::on_timer`] and ask
    /// again.
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        self.consume_at(ops, bytes, Instant::now())
    }

    fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let mut wait = Duration::ZERO;
        for b in [&mut self.ops, &mut self.bytes].into_iter().flatten() {
            b.refill(now);
            wait = wait.max(b.wait());
        }
        if wait > Duration::ZERO {
            self.blocked = true;
            if let Err(e) = self.timer.reset(wait, None) {
                tracing::warn!("rate limiter timer: {e}");
                self.blocked = false;
            }
            return false;
        }
        if let Some(b) = &mut self.ops {
            b.tokens -= i128::from(ops);
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= i128::from(bytes);
        }
        true
    }

    /// The timer fired: the limiter may let requests through again.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// True while waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer descriptor to watch (readable when the wait is over).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// True when the limiter limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.ops.is_none() && self.bytes.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_blocks() {
        let mut r = RateLimiter::new(RateLimit::default()).unwrap();
        assert!(r.is_unlimited());
        for _ in 0..10_000 {
            assert!(r.consume(1, 1 << 20));
        }
    }

    #[test]
    fn ops_bucket_allows_one_second_then_blocks_then_refills() {
        let mut r = RateLimiter::new(RateLimit {
            ops_per_sec: Some(100),
            bytes_per_sec: None,
        })
        .unwrap();
        let t0 = Instant::now();
        let mut allowed = 0;
        while r.consume_at(1, 0, t0) {
            allowed += 1;
            assert!(allowed <= 100);
        }
        assert_eq!(allowed, 100);
        assert!(r.is_blocked());
        assert!(
            !r.consume_at(1, 0, t0 + Duration::from_secs(10)),
            "blocked until timer"
        );
        r.blocked = false; // what on_timer does after the timer fires
                           // 50 ms later: 5 tokens back.
        let t1 = t0 + Duration::from_millis(50);
        let mut more = 0;
        while r.consume_at(1, 0, t1) {
            more += 1;
        }
        assert_eq!(more, 5);
    }

    #[test]
    fn big_request_goes_into_debt_and_waits_in_proportion() {
        let mut r = RateLimiter::new(RateLimit {
            ops_per_sec: None,
            bytes_per_sec: Some(1000),
        })
        .unwrap();
        let t0 = Instant::now();
        assert!(
            r.consume_at(1, 5000, t0),
            "a full bucket lets a big request go"
        );
        assert_eq!(r.bytes.as_ref().unwrap().tokens(), -4000);
        assert!(!r.consume_at(1, 1, t0));
        let wait = r.bytes.as_ref().unwrap().wait();
        assert!(wait > Duration::from_millis(4000) && wait < Duration::from_millis(4010));
        r.blocked = false;
        assert!(r.consume_at(1, 1, t0 + Duration::from_millis(4002)));
    }

    #[test]
    fn timer_fires_when_blocked() {
        let mut r = RateLimiter::new(RateLimit {
            ops_per_sec: Some(1000),
            bytes_per_sec: None,
        })
        .unwrap();
        while r.consume(1, 0) {}
        let mut pfd = libc::pollfd {
            fd: r.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1);
        r.on_timer();
        assert!(r.consume(1, 0));
    }
}
