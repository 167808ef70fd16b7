//! Per-endpoint rate limits: Defender's "100 calls per minute and 1,500 calls
//! per hour on each endpoint", as two sliding windows on the simulated clock.
//!
//! Only accepted calls are counted: a call answered `429` does not use up a
//! slot, so a client that backs off for `Retry-After` gets in.

use std::collections::{HashMap, VecDeque};

use time::{Duration, OffsetDateTime};

use super::RateLimits;
use crate::defender::Endpoint;

const MINUTE: Duration = Duration::seconds(60);
const HOUR: Duration = Duration::seconds(3600);

#[derive(Debug)]
pub(crate) struct RateLimiter {
    limits: RateLimits,
    /// Sim instants of accepted calls within the last hour, oldest first.
    accepted: HashMap<Endpoint, VecDeque<OffsetDateTime>>,
}

impl RateLimiter {
    pub(crate) fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            accepted: HashMap::new(),
        }
    }

    /// Counts the call and returns `Ok`, or returns the simulated time until a
    /// slot frees in every window that is full.
    pub(crate) fn try_acquire(
        &mut self,
        endpoint: Endpoint,
        now: OffsetDateTime,
    ) -> Result<(), Duration> {
        let calls = self.accepted.entry(endpoint).or_default();
        while calls.front().is_some_and(|t| now - *t >= HOUR) {
            calls.pop_front();
        }
        let wait_minute = wait_for_slot(calls, now, MINUTE, self.limits.per_minute);
        let wait_hour = wait_for_slot(calls, now, HOUR, self.limits.per_hour);
        match (wait_minute, wait_hour) {
            (None, None) => {
                calls.push_back(now);
                Ok(())
            }
            (a, b) => Err(a.unwrap_or(Duration::ZERO).max(b.unwrap_or(Duration::ZERO))),
        }
    }
}

/// `None` if the window ending at `now` has room; otherwise how long until
/// enough calls age out of it to leave room for one more.
fn wait_for_slot(
    calls: &VecDeque<OffsetDateTime>,
    now: OffsetDateTime,
    window: Duration,
    limit: u32,
) -> Option<Duration> {
    let in_window: Vec<OffsetDateTime> = calls
        .iter()
        .copied()
        .filter(|t| now - *t < window)
        .collect();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if in_window.len() < limit {
        return None;
    }
    // Room for one more needs `len - limit + 1` calls to leave the window; the
    // last of them to leave is at index `len - limit`.
    let wait = in_window
        .get(in_window.len() - limit)
        .map_or(window, |t| (*t - now) + window);
    Some(wait.max(Duration::ZERO))
}

/// `Retry-After` in whole real seconds: the simulated wait scaled by the clock
/// speed, rounded up, at least 1 (a client sleeping 0 s would just hammer).
pub(crate) fn retry_after_secs(sim_wait: Duration, speed: f64) -> u64 {
    let real = (sim_wait.as_seconds_f64() / speed).ceil();
    if real.is_finite() && real >= 1.0 {
        // Saturating float-to-int cast; Retry-After is at most an hour anyway.
        real as u64
    } else if real.is_finite() {
        1
    } else {
        3600
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-01-01 00:00:00 UTC);

    fn limiter(per_minute: u32, per_hour: u32) -> RateLimiter {
        RateLimiter::new(RateLimits {
            per_minute,
            per_hour,
        })
    }

    #[test]
    fn minute_window_slides() {
        let mut rl = limiter(3, 100);
        for s in [0, 10, 20] {
            assert!(
                rl.try_acquire(Endpoint::Restrict, T0 + Duration::seconds(s))
                    .is_ok()
            );
        }
        // Full: the call at t=0 leaves the window at t=60.
        let wait = rl
            .try_acquire(Endpoint::Restrict, T0 + Duration::seconds(30))
            .expect_err("limited");
        assert_eq!(wait, Duration::seconds(30));
        // Rejected calls are not counted: at t=60 exactly one slot is free.
        assert!(
            rl.try_acquire(Endpoint::Restrict, T0 + Duration::seconds(60))
                .is_ok()
        );
        assert_eq!(
            rl.try_acquire(Endpoint::Restrict, T0 + Duration::seconds(61)),
            Err(Duration::seconds(9))
        );
    }

    #[test]
    fn endpoints_are_limited_separately() {
        let mut rl = limiter(1, 100);
        assert!(rl.try_acquire(Endpoint::Restrict, T0).is_ok());
        assert!(rl.try_acquire(Endpoint::Unrestrict, T0).is_ok());
        assert!(rl.try_acquire(Endpoint::ListMachines, T0).is_ok());
        assert!(rl.try_acquire(Endpoint::Restrict, T0).is_err());
    }

    #[test]
    fn hour_window_uses_the_longer_wait() {
        let mut rl = limiter(100, 2);
        assert!(rl.try_acquire(Endpoint::GetAction, T0).is_ok());
        assert!(
            rl.try_acquire(Endpoint::GetAction, T0 + Duration::minutes(10))
                .is_ok()
        );
        let at = T0 + Duration::minutes(20);
        assert_eq!(
            rl.try_acquire(Endpoint::GetAction, at),
            Err(Duration::minutes(40))
        );
        assert!(
            rl.try_acquire(Endpoint::GetAction, T0 + Duration::minutes(60))
                .is_ok()
        );
    }

    #[test]
    fn zero_limit_blocks_for_a_whole_window() {
        let mut rl = limiter(0, 10);
        assert_eq!(rl.try_acquire(Endpoint::Cancel, T0), Err(MINUTE));
    }

    #[test]
    fn retry_after_is_real_seconds_rounded_up() {
        assert_eq!(retry_after_secs(Duration::seconds(30), 1.0), 30);
        assert_eq!(retry_after_secs(Duration::milliseconds(29_001), 1.0), 30);
        // At 10x, 30 sim seconds pass in 3 real seconds.
        assert_eq!(retry_after_secs(Duration::seconds(30), 10.0), 3);
        // Never below one second.
        assert_eq!(retry_after_secs(Duration::seconds(30), 1000.0), 1);
        assert_eq!(retry_after_secs(Duration::ZERO, 1.0), 1);
    }
}
