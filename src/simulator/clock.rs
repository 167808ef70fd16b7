//! The simulated clock: wall-clock time sped up by `SimConfig::speed`, plus
//! explicit jumps from the test controls.
//!
//! Everything time-dependent in the simulator (action life, rate-limit windows,
//! token expiry excepted) reads this clock, so a test can run a 5-second action
//! life in 50 ms with `speed = 100.0`, or skip three days with one call.

use parking_lot::Mutex;
use std::time::Instant;

use time::format_description::FormatItem;
use time::macros::{datetime, format_description};
use time::{Duration, OffsetDateTime};

/// Latest instant the clock reports; saturating here keeps absurd speeds or
/// jumps from overflowing (and panicking) date arithmetic.
pub(crate) const END_OF_TIME: OffsetDateTime = datetime!(9999-12-31 23:59:59.999_999_9 UTC);

/// Defender's timestamp shape: RFC 3339, UTC, always 7 fractional digits
/// (`2024-05-01T09:30:00.1234567Z`).
const TIMESTAMP: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z");

pub(crate) struct SimClock {
    real_origin: Instant,
    sim_origin: OffsetDateTime,
    speed: f64,
    /// Sim time added by `advance` on top of the scaled real time.
    skipped: Mutex<Duration>,
}

impl SimClock {
    /// A clock that starts at `sim_origin` (the current UTC time, less
    /// `SimConfig::clock_behind`). `speed` must be finite and positive
    /// (checked by `Simulator::start`).
    pub(crate) fn starting_at(sim_origin: OffsetDateTime, speed: f64) -> Self {
        Self {
            real_origin: Instant::now(),
            sim_origin,
            speed,
            skipped: Mutex::new(Duration::ZERO),
        }
    }

    pub(crate) fn speed(&self) -> f64 {
        self.speed
    }

    /// The current simulated time.
    pub(crate) fn now(&self) -> OffsetDateTime {
        let real = self.real_origin.elapsed().as_secs_f64();
        let scaled = Duration::checked_seconds_f64(real * self.speed).unwrap_or(Duration::MAX);
        let elapsed = scaled.saturating_add(*self.skipped.lock());
        self.sim_origin
            .checked_add(elapsed)
            .map_or(END_OF_TIME, |t| t.min(END_OF_TIME))
    }

    /// Jumps the simulated clock forward.
    pub(crate) fn advance(&self, by: std::time::Duration) {
        let by = Duration::try_from(by).unwrap_or(Duration::MAX);
        let mut skipped = self.skipped.lock();
        *skipped = skipped.saturating_add(by);
    }
}

/// Formats a simulated instant the way Defender does.
pub(crate) fn timestamp(t: OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    // Formatting only fails for years outside 0..=9999, which the clock never
    // reports; fall back to RFC 3339 anyway rather than panic.
    utc.format(TIMESTAMP).unwrap_or_else(|_| {
        utc.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    })
}

/// Converts a config duration, saturating instead of failing.
pub(crate) fn sim_duration(d: std::time::Duration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_seven_fractional_digits_and_z() {
        let t = datetime!(2024-05-01 09:30:00.5 UTC);
        assert_eq!(timestamp(t), "2024-05-01T09:30:00.5000000Z");
        let whole = datetime!(2024-05-01 09:30:00 UTC);
        assert_eq!(timestamp(whole), "2024-05-01T09:30:00.0000000Z");
    }

    #[test]
    fn sped_up_clock_runs_faster_and_advance_jumps() {
        let origin = datetime!(2024-01-01 00:00:00 UTC);
        let clock = SimClock::starting_at(origin, 1000.0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let elapsed = clock.now() - origin;
        assert!(elapsed >= Duration::seconds(20), "{elapsed}");
        clock.advance(std::time::Duration::from_secs(3 * 86_400));
        assert!(clock.now() - origin >= Duration::days(3));
    }

    #[test]
    fn absurd_speed_saturates_instead_of_panicking() {
        let clock = SimClock::starting_at(OffsetDateTime::now_utc(), f64::MAX);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(clock.now(), END_OF_TIME);
        clock.advance(std::time::Duration::MAX);
        assert_eq!(timestamp(clock.now()), "9999-12-31T23:59:59.9999999Z");
    }
}
