//! Jittered exponential backoff, for everything coordination tries again:
//! a storage request storage was too busy for, a budget write another
//! instance beat, a lease someone else still holds.
//!
//! Each pause is the current step ±50 % at random, so that instances that
//! failed together do not come back together; the step doubles up to its
//! maximum. Callers stop at their own deadline: a pause that would end past
//! it is not taken.

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            step: first,
        }
    }

    /// The next pause, and double the step for the one after.
    pub fn pause(&mut self) -> Duration {
        let pause = self.step.mul_f64(0.5 + fastrand::f64());
        self.step = (self.step * 2).min(self.max);
        pause
    }

    /// Start again from the first step (the other side made progress).
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_within_half_either_side() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        for step in [100, 200, 400, 400, 400] {
            let pause = backoff.pause();
            let step = Duration::from_millis(step);
            assert!(pause >= step / 2 && pause <= step * 3 / 2, "{pause:?}");
        }
        backoff.reset();
        assert!(backoff.pause() <= Duration::from_millis(150));
    }
}
