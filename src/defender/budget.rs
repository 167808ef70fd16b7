//! A client-side rate budget per Defender endpoint.
//!
//! Defender allows 100 calls per minute and 1500 per hour on each endpoint, per
//! application and tenant, and answers 429 beyond that. Every invocation of
//! the process draws from one shared budget, so a burst queues for a free slot
//! instead of drawing 429s. Slots are handed out first come, first served:
//! a call never overtakes one that is already waiting.
//!
//! [`RateBudget`] is per process: `COORDINATION=local`. With
//! `COORDINATION=storage` the client draws from the budget every instance
//! shares instead ([`crate::coordination::Coordinator`]); both are a
//! [`CallBudget`].
//!
//! A slot counts from the moment it is reserved, but a caller that goes away
//! while it waits for its slot (the client disconnected, the invocation was
//! dropped) never sends its call: the reservation gives its slot back in both
//! windows when it is dropped before the wait is over.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{api::Endpoint, error::Refusal};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Defender counts a call when it arrives; the budget counts it from the slot
/// it handed out. Calls given slots together arrive spread out (connection
/// set-up, scheduling, the network), so a call sent exactly one window after
/// an earlier one can arrive while that one still counts, and draw a 429
/// (the end-to-end benchmark's burst showed it). Each window is therefore
/// kept this much longer than Defender's: 100 calls per 61 s, not per 60 s.
pub const LATENCY_ALLOWANCE: Duration = Duration::from_secs(1);

/// Where the Defender client gets its slots: this process's [`RateBudget`],
/// or the budget shared by every instance through storage.
#[async_trait::async_trait]
pub trait CallBudget: std::fmt::Debug + Send + Sync {
    /// Wait for a slot on `endpoint`; fail at once if it would come after
    /// `deadline`, or if the budget cannot be consulted (nothing is sent then).
    async fn acquire(&self, endpoint: Endpoint, deadline: Instant) -> Result<(), BudgetError>;

    /// [`Self::acquire`], telling `on_slot` when the slot is before waiting
    /// for it (a lease holder announces it to the instances waiting for it).
    async fn acquire_announcing(
        &self,
        endpoint: Endpoint,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
    ) -> Result<(), BudgetError> {
        let _ = on_slot;
        self.acquire(endpoint, deadline).await
    }

    /// Calls `endpoint` could make at once, now, as far as this instance
    /// knows without asking anyone (0 when it cannot tell).
    fn free_now(&self, endpoint: Endpoint) -> usize;

    /// How long until `endpoint` has a slot that leaves every window at
    /// most `share` full, counting every reservation made so far; nothing
    /// is reserved. A lower-priority caller waits for this before it asks
    /// for its slot, so the rest of each window stays free for the callers
    /// above it.
    async fn wait_for_share(
        &self,
        endpoint: Endpoint,
        share: Share,
    ) -> Result<Duration, BudgetError>;

    /// Reserve `share.calls` slots on `endpoint` together, all at once and
    /// now, each keeping every window within `share`; or none, with how
    /// long until they would fit ([`BudgetError::OverBudget`]), or when the
    /// budget cannot answer by `deadline`. A
    /// lower-priority caller (a job's group) takes its slots so, before it
    /// starts, and its calls then use them ([`crate::defender::DefenderClient::prepay`]):
    /// instances racing for the same room cannot each take it, because
    /// the reservation itself is what is checked against the share.
    async fn reserve_share(
        &self,
        endpoint: Endpoint,
        share: Share,
        deadline: Instant,
    ) -> Result<Vec<Reserved>, BudgetError>;

    /// Give back slots from [`Self::reserve_share`] whose calls were not
    /// made (best effort: a slot not given back only delays later calls).
    fn give_back(&self, endpoint: Endpoint, slots: Vec<Reserved>);

    /// The call a slot from [`Self::reserve_share`] was reserved for goes
    /// now. Defender counts it when it arrives, the budget from the slot's
    /// time: when the group's preparation (listing, leases, state read) took
    /// longer than the window's latency allowance, the slot is moved to now,
    /// in the same write that reserves the new one (the earliest slot, in
    /// order behind every call already waiting), so that later calls are
    /// not given room Defender has not freed yet. A fresh slot is used as it
    /// is, without asking anyone.
    async fn use_reserved(
        &self,
        endpoint: Endpoint,
        slot: Reserved,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
    ) -> Result<(), BudgetError>;
}

/// How stale a slot reserved ahead may be when its call goes: half of the
/// window's latency allowance, the rest being the network's.
pub fn fresh_for(allowance: Duration) -> Duration {
    allowance / 2
}

/// Wait for a reserved `slot` that is still fresh (see [`fresh_for`]) and
/// answer `true`; `false`, at once, when its call must move it instead.
pub async fn wait_if_fresh(slot: Reserved, allowance: Duration, deadline: Instant) -> bool {
    if Instant::now() > slot.instant + fresh_for(allowance) {
        return false;
    }
    tokio::time::sleep_until(slot.instant.min(deadline)).await;
    true
}

/// The longest a call whose slot moved waits for its new one: a twelfth of
/// the minute window (five seconds on Defender's clock). It waits under its
/// machine's lease, so beyond that it is refused (`OverBudget`) and a job
/// defers the device outside the lease.
pub fn move_wait(minute_window: Duration) -> Duration {
    minute_window / 12
}

/// A slot reserved ahead of its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// When the call may go, on this process's clock.
    pub instant: Instant,
    /// The same moment as the budget stored it (wall-clock time for the
    /// budget every instance shares).
    pub at: std::time::SystemTime,
}

/// The part of each rate window a class of callers may fill: interactive
/// requests all of it, background work less, so that it never takes the
/// slots an interactive request needs next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    /// Of the per-minute limit, 0 to 1.
    pub minute: f64,
    /// Of the per-hour limit, 0 to 1.
    pub hour: f64,
    /// Calls the caller is about to make together (at least one): the
    /// window must have room for all of them within the share.
    pub calls: usize,
}

impl Share {
    /// Interactive requests: the whole window.
    pub const ALL: Self = Self {
        minute: 1.0,
        hour: 1.0,
        calls: 1,
    };
    /// Containment jobs: four fifths of each minute and nine tenths of each
    /// hour, leaving the rest to interactive requests (and the reconciler).
    pub const JOBS: Self = Self {
        minute: 0.8,
        hour: 0.9,
        calls: 1,
    };
    /// The reconciler's reads (callbacks): below interactive requests,
    /// above jobs.
    pub const RECONCILER: Self = Self {
        minute: 0.9,
        hour: 0.95,
        calls: 1,
    };
    /// The fleet view's reads: below every caller that contains or
    /// releases a device, jobs included. Anyone with the view's key can
    /// repeat it; it must never take the slots a restrict needs next.
    /// A read is two calls at least (restricts and releases).
    pub const VIEWS: Self = Self {
        minute: 0.5,
        hour: 0.5,
        calls: 2,
    };

    /// The same share, for `calls` calls made together.
    #[must_use]
    pub const fn for_calls(self, calls: usize) -> Self {
        Self {
            calls: if calls == 0 { 1 } else { calls },
            ..self
        }
    }

    /// The limit this share leaves a caller that needs `self.calls` slots:
    /// the one more call [`next_within`] looks for stands for all of them.
    pub fn limit(self, limit: usize, fraction: f64) -> usize {
        Self::of(limit, fraction)
            .saturating_sub(self.calls.saturating_sub(1))
            .max(1)
    }

    /// `limit` scaled by `fraction`, at least one call.
    pub fn of(limit: usize, fraction: f64) -> usize {
        let scaled = (limit as f64 * fraction.clamp(0.0, 1.0)).floor();
        (scaled as usize).clamp(1, limit.max(1))
    }
}

/// The earliest time at or after `now` at which one more call keeps both
/// windows within `limits`, given the ascending call times `calls` (which
/// may lie in the future: reservations not sent yet).
pub fn next_within<T, W>(calls: &[T], now: T, limits: [(usize, W); 2]) -> T
where
    T: Copy + Ord + std::ops::Add<W, Output = T>,
    W: Copy,
{
    let mut slot = now;
    loop {
        let mut moved = false;
        for (limit, window) in limits {
            let limit = limit.max(1);
            let in_window = calls.len() - calls.partition_point(|&t| t + window <= slot);
            if in_window >= limit {
                let leaving = calls[calls.len() - limit] + window;
                if leaving > slot {
                    slot = leaving;
                    moved = true;
                }
            }
        }
        if !moved {
            return slot;
        }
    }
}

/// Why no slot was given.
#[derive(Debug, Clone)]
pub enum BudgetError {
    OverBudget(OverBudget),
    /// A budget shared through another layer (storage) could not be
    /// consulted: fail closed, with that layer's own error.
    Refused(Refusal),
}

#[async_trait::async_trait]
impl CallBudget for RateBudget {
    async fn acquire(&self, endpoint: Endpoint, deadline: Instant) -> Result<(), BudgetError> {
        RateBudget::acquire(self, endpoint, deadline)
            .await
            .map_err(BudgetError::OverBudget)
    }

    fn free_now(&self, endpoint: Endpoint) -> usize {
        RateBudget::free_now(self, endpoint)
    }

    async fn wait_for_share(
        &self,
        endpoint: Endpoint,
        share: Share,
    ) -> Result<Duration, BudgetError> {
        let now = Instant::now();
        let calls = self.calls.lock();
        let Some(queue) = calls.get(&endpoint) else {
            return Ok(Duration::ZERO);
        };
        let queue: Vec<Instant> = queue.iter().copied().collect();
        let at = next_within(&queue, now, self.within(share));
        Ok(at.saturating_duration_since(now))
    }

    async fn reserve_share(
        &self,
        endpoint: Endpoint,
        share: Share,
        _deadline: Instant,
    ) -> Result<Vec<Reserved>, BudgetError> {
        let now = Instant::now();
        let wall = std::time::SystemTime::now();
        let mut calls = self.calls.lock();
        let queue = calls.entry(endpoint).or_default();
        while queue.front().is_some_and(|&t| t + self.hour <= now) {
            queue.pop_front();
        }
        let times: Vec<Instant> = queue.iter().copied().collect();
        let fits = next_within(&times, now, self.within(share));
        // Slots are handed out in order: behind a caller already waiting
        // for a later slot, there is no room now.
        let at = fits.max(queue.back().copied().unwrap_or(now));
        if at > now {
            return Err(BudgetError::OverBudget(OverBudget { wait: at - now }));
        }
        let slots = share.calls.max(1);
        queue.extend(std::iter::repeat_n(now, slots));
        Ok(vec![
            Reserved {
                instant: now,
                at: wall
            };
            slots
        ])
    }

    fn give_back(&self, endpoint: Endpoint, slots: Vec<Reserved>) {
        for slot in slots {
            self.release(endpoint, slot.instant);
        }
    }

    async fn use_reserved(
        &self,
        endpoint: Endpoint,
        slot: Reserved,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
    ) -> Result<(), BudgetError> {
        let _ = on_slot;
        if wait_if_fresh(slot, self.allowance, deadline).await {
            return Ok(());
        }
        self.release(endpoint, slot.instant);
        let deadline = deadline.min(Instant::now() + move_wait(self.minute));
        RateBudget::acquire(self, endpoint, deadline)
            .await
            .map_err(BudgetError::OverBudget)
    }
}

/// The next free slot is later than the caller can wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// How long until a slot would be free.
    pub wait: Duration,
}

/// The shared budget.
#[derive(Debug)]
pub struct RateBudget {
    per_minute: usize,
    per_hour: usize,
    /// The two windows, in real time: a minute and an hour, divided by the
    /// clock speed (`DEFENDER_RATE_CLOCK_SPEED`, 1 outside benchmarks).
    minute: Duration,
    hour: Duration,
    /// [`LATENCY_ALLOWANCE`] on the same clock.
    allowance: Duration,
    /// Times of calls made or reserved, oldest first, per endpoint.
    calls: Mutex<HashMap<Endpoint, VecDeque<Instant>>>,
}

impl RateBudget {
    pub fn new(per_minute: u32, per_hour: u32) -> Self {
        Self {
            per_minute: usize::try_from(per_minute.max(1)).unwrap_or(usize::MAX),
            per_hour: usize::try_from(per_hour.max(1)).unwrap_or(usize::MAX),
            minute: MINUTE + LATENCY_ALLOWANCE,
            hour: HOUR + LATENCY_ALLOWANCE,
            allowance: LATENCY_ALLOWANCE,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Runs the budget's clock `speed` times faster than real time (both
    /// windows shrink by that factor), to match a sped-up simulator in
    /// benchmarks. A speed below 1 or not finite is ignored.
    #[must_use]
    pub fn with_clock_speed(mut self, speed: f64) -> Self {
        if speed.is_finite() && speed >= 1.0 {
            self.minute = (MINUTE + LATENCY_ALLOWANCE).div_f64(speed);
            self.hour = (HOUR + LATENCY_ALLOWANCE).div_f64(speed);
            self.allowance = LATENCY_ALLOWANCE.div_f64(speed);
        }
        self
    }

    /// Both windows' limits as `share` leaves them, for [`next_within`].
    fn within(&self, share: Share) -> [(usize, Duration); 2] {
        [
            (share.limit(self.per_minute, share.minute), self.minute),
            (share.limit(self.per_hour, share.hour), self.hour),
        ]
    }

    /// Wait for a slot on `endpoint`, or fail at once if the slot would come
    /// after `deadline`. Dropping the future before it is ready gives the
    /// slot back: the call it was for is never sent.
    pub async fn acquire(&self, endpoint: Endpoint, deadline: Instant) -> Result<(), OverBudget> {
        let now = Instant::now();
        let slot = self.reserve(endpoint, now, deadline)?;
        let reservation = Reservation {
            budget: self,
            endpoint,
            slot,
            kept: false,
        };
        if slot > now {
            tracing::debug!(
                ?endpoint,
                wait_ms = (slot - now).as_millis(),
                "waiting for the rate budget"
            );
            tokio::time::sleep_until(slot).await;
        }
        reservation.keep();
        Ok(())
    }

    /// Give back a reserved slot whose call was never sent. Later
    /// reservations keep their slots (first come, first served); the freed
    /// room counts for every reservation made from now on, in both windows.
    fn release(&self, endpoint: Endpoint, slot: Instant) {
        let mut calls = self.calls.lock();
        if let Some(queue) = calls.get_mut(&endpoint)
            && let Some(index) = queue.iter().rposition(|&t| t == slot)
        {
            queue.remove(index);
        }
    }

    /// Reserve the earliest slot at or after `now` (and after every earlier
    /// reservation) that keeps both windows within their limits.
    pub fn reserve(
        &self,
        endpoint: Endpoint,
        now: Instant,
        deadline: Instant,
    ) -> Result<Instant, OverBudget> {
        let mut calls = self.calls.lock();
        let queue = calls.entry(endpoint).or_default();
        while queue.front().is_some_and(|&t| t + self.hour <= now) {
            queue.pop_front();
        }

        let mut slot = queue.back().map_or(now, |&last| last.max(now));
        loop {
            let mut moved = false;
            for (limit, window) in [(self.per_minute, self.minute), (self.per_hour, self.hour)] {
                // All reservations are at or before `slot`, in order; the
                // window holds those after `slot - window` (a binary search:
                // with high limits the queue holds many calls).
                let in_window = queue.len() - queue.partition_point(|&t| t + window <= slot);
                if in_window >= limit {
                    // The limit-th most recent call leaves the window then.
                    let leaving = queue[queue.len() - limit];
                    slot = leaving + window;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }

        if slot > deadline {
            return Err(OverBudget { wait: slot - now });
        }
        queue.push_back(slot);
        Ok(slot)
    }

    /// How many calls `endpoint` could make at once, now, without waiting:
    /// what both windows have left. Zero while calls queue for later slots.
    pub fn free_now(&self, endpoint: Endpoint) -> usize {
        let now = Instant::now();
        let calls = self.calls.lock();
        let Some(queue) = calls.get(&endpoint) else {
            return self.per_minute.min(self.per_hour);
        };
        if queue.back().is_some_and(|&last| last > now) {
            return 0;
        }
        let left = |limit: usize, window: Duration| {
            let in_window = queue.len() - queue.partition_point(|&t| t + window <= now);
            limit.saturating_sub(in_window)
        };
        left(self.per_minute, self.minute).min(left(self.per_hour, self.hour))
    }
}

/// A reserved slot whose call has not been sent yet.
struct Reservation<'a> {
    budget: &'a RateBudget,
    endpoint: Endpoint,
    slot: Instant,
    kept: bool,
}

impl Reservation<'_> {
    /// The wait is over and the call goes out: the slot stays taken.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            tracing::debug!(endpoint = ?self.endpoint, "a caller gave up waiting; its rate budget slot is free again");
            self.budget.release(self.endpoint, self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_leaves_the_rest_of_each_window_to_the_callers_above() {
        assert_eq!(Share::of(100, Share::JOBS.minute), 80);
        assert_eq!(Share::of(1500, Share::JOBS.hour), 1350);
        assert_eq!(Share::of(1, 0.5), 1, "never nothing at all");
        // Ten calls together need ten free places within the share.
        assert_eq!(Share::JOBS.for_calls(10).limit(100, Share::JOBS.minute), 71);
        assert_eq!(Share::JOBS.for_calls(0).limit(100, Share::JOBS.minute), 80);
        assert_eq!(Share::JOBS.for_calls(500).limit(100, Share::JOBS.minute), 1);
        // Ten calls in the last minute (ms): the jobs' share of a limit of 10
        // (8) is full until the third call leaves the window; the whole
        // window (10) is full until the first leaves it.
        let calls: Vec<u64> = (0..10).map(|i| 1_000 + i * 100).collect();
        let now = 2_000;
        let minute = 60_000;
        let hour = 3_600_000;
        assert_eq!(
            next_within(&calls, now, [(Share::of(10, 0.8), minute), (1000, hour)]),
            calls[2] + minute
        );
        assert_eq!(
            next_within(&calls, now, [(10, minute), (1000, hour)]),
            calls[0] + minute
        );
        assert_eq!(next_within(&calls, now, [(11, minute), (1000, hour)]), now);
    }

    /// The windows the budget keeps, allowance included.
    const M: Duration = MINUTE.saturating_add(LATENCY_ALLOWANCE);
    const H: Duration = HOUR.saturating_add(LATENCY_ALLOWANCE);

    /// A group's slots are reserved all at once within the share, or not
    /// at all; behind a caller already waiting there is no room now; and
    /// the slots given back count again.
    #[tokio::test(start_paused = true)]
    async fn a_share_is_reserved_all_at_once_or_not_at_all() {
        let budget = RateBudget::new(10, 1500);
        let jobs = |calls| Share::JOBS.for_calls(calls);
        let group = budget
            .reserve_share(Endpoint::Restrict, jobs(5), Instant::now())
            .await
            .unwrap();
        assert_eq!(group.len(), 5);
        // Five more would make ten, over the jobs' eight: none is taken.
        let Err(BudgetError::OverBudget(over)) = budget
            .reserve_share(Endpoint::Restrict, jobs(5), Instant::now())
            .await
        else {
            panic!("over the share")
        };
        assert_eq!(over.wait, M);
        assert_eq!(budget.free_now(Endpoint::Restrict), 5);
        // Three more fit, and an interactive call still gets one of the two
        // slots the jobs leave.
        let three = budget
            .reserve_share(Endpoint::Restrict, jobs(3), Instant::now())
            .await
            .unwrap();
        budget
            .acquire(Endpoint::Restrict, Instant::now())
            .await
            .unwrap();
        CallBudget::give_back(&budget, Endpoint::Restrict, three);
        assert_eq!(budget.free_now(Endpoint::Restrict), 4);
    }

    /// Slots go in order: behind a call already waiting for a later slot,
    /// a group finds no room now, even where the window has room for it.
    #[tokio::test(start_paused = true)]
    async fn a_group_never_overtakes_a_call_waiting_for_its_slot() {
        let budget = RateBudget::new(10, 1500);
        let now = Instant::now();
        let far = now + HOUR;
        let first: Vec<Instant> = (0..10)
            .map(|_| budget.reserve(Endpoint::Restrict, now, far).unwrap())
            .collect();
        let waiting = budget.reserve(Endpoint::Restrict, now, far).unwrap();
        assert_eq!(waiting, now + M);
        // Five of the first give up: the window has room for the jobs' share
        // again, but the waiting call is first.
        for slot in &first[..5] {
            budget.release(Endpoint::Restrict, *slot);
        }
        let Err(BudgetError::OverBudget(over)) = budget
            .reserve_share(Endpoint::Restrict, Share::JOBS, far)
            .await
        else {
            panic!("behind the waiting call")
        };
        assert_eq!(over.wait, M);
    }

    #[test]
    fn the_hundred_and_first_call_in_a_minute_waits_for_the_first_to_leave() {
        let budget = RateBudget::new(100, 1500);
        let start = Instant::now();
        let far = start + HOUR * 2;
        for _ in 0..100 {
            assert_eq!(budget.reserve(Endpoint::Restrict, start, far), Ok(start));
        }
        assert_eq!(
            budget.reserve(Endpoint::Restrict, start, far),
            Ok(start + M)
        );
        // Other endpoints have their own budget.
        assert_eq!(
            budget.reserve(Endpoint::ListMachines, start, far),
            Ok(start)
        );
    }

    #[test]
    fn a_slot_past_the_deadline_is_refused_with_an_honest_wait_and_not_reserved() {
        let budget = RateBudget::new(2, 1500);
        let start = Instant::now();
        budget.reserve(Endpoint::Cancel, start, start).unwrap();
        budget.reserve(Endpoint::Cancel, start, start).unwrap();
        let err = budget
            .reserve(
                Endpoint::Cancel,
                start + Duration::from_secs(10),
                start + Duration::from_secs(20),
            )
            .unwrap_err();
        assert_eq!(err.wait, M - Duration::from_secs(10));
        // Nothing was reserved: a caller with time gets the same slot.
        assert_eq!(
            budget.reserve(
                Endpoint::Cancel,
                start + Duration::from_secs(10),
                start + HOUR
            ),
            Ok(start + M)
        );
    }

    #[test]
    fn free_now_counts_what_both_windows_have_left() {
        let budget = RateBudget::new(5, 7);
        assert_eq!(budget.free_now(Endpoint::ListActions), 5);
        let now = Instant::now();
        for _ in 0..3 {
            budget.reserve(Endpoint::ListActions, now, now).unwrap();
        }
        assert_eq!(budget.free_now(Endpoint::ListActions), 2);
        assert_eq!(budget.free_now(Endpoint::Restrict), 5, "per endpoint");
    }

    #[test]
    fn the_hourly_limit_holds_across_minutes() {
        let budget = RateBudget::new(100, 150);
        let start = Instant::now();
        let far = start + HOUR * 3;
        let slots: Vec<Instant> = (0..301)
            .map(|_| budget.reserve(Endpoint::ListActions, start, far).unwrap())
            .collect();
        // 100 now, 50 a minute later (hour cap), then nothing until the first leave the hour.
        assert_eq!(slots[99], start);
        assert_eq!(slots[100], start + M);
        assert_eq!(slots[149], start + M);
        assert_eq!(slots[150], start + H);
        assert_eq!(slots[250], start + H + M);
        assert_eq!(slots[300], start + H * 2);
        // Invariant: no window of a minute holds more than 100, of an hour more than 150.
        for (i, &t) in slots.iter().enumerate() {
            let minute = slots[..=i].iter().filter(|&&s| s + MINUTE > t).count();
            let hour = slots[..=i].iter().filter(|&&s| s + HOUR > t).count();
            assert!(
                minute <= 100 && hour <= 150,
                "slot {i}: {minute}/min {hour}/h"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_queues_for_free_slots_instead_of_failing() {
        let budget = std::sync::Arc::new(RateBudget::new(2, 1500));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(230);
        let calls = (0..5).map(|_| {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget
                    .acquire(Endpoint::ListMachines, deadline)
                    .await
                    .unwrap();
                Instant::now() - start
            })
        });
        let mut waited = Vec::new();
        for call in calls {
            waited.push(call.await.unwrap());
        }
        waited.sort();
        assert_eq!(
            waited,
            [0, 0, 61, 61, 122].map(Duration::from_secs),
            "two a minute, the rest queued"
        );
    }

    #[test]
    fn a_sped_up_clock_shrinks_both_windows() {
        let budget = RateBudget::new(2, 3).with_clock_speed(60.0);
        let start = Instant::now();
        let far = start + HOUR;
        let slots: Vec<Instant> = (0..5)
            .map(|_| budget.reserve(Endpoint::Restrict, start, far).unwrap())
            .collect();
        // 61 s and 3601 s of budget time: about 1.02 s and 60.02 s.
        let (minute, hour) = (M.div_f64(60.0), H.div_f64(60.0));
        assert_eq!(
            slots,
            [start, start, start + minute, start + hour, start + hour]
        );
        // Speeds below 1 are ignored.
        let budget = RateBudget::new(1, 1500).with_clock_speed(0.5);
        budget.reserve(Endpoint::Cancel, start, far).unwrap();
        assert_eq!(budget.reserve(Endpoint::Cancel, start, far), Ok(start + M));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_waiting_frees_its_slot_in_both_windows() {
        let budget = std::sync::Arc::new(RateBudget::new(2, 4));
        let start = Instant::now();
        let deadline = start + HOUR * 2;
        // Two calls go out now; ten more queue and are abandoned after a second.
        budget.acquire(Endpoint::Restrict, deadline).await.unwrap();
        budget.acquire(Endpoint::Restrict, deadline).await.unwrap();
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.acquire(Endpoint::Restrict, deadline).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        for task in &waiting {
            task.abort();
        }
        for task in waiting {
            // Cancelled while waiting, or refused at once (no slot before the deadline).
            assert!(!matches!(task.await, Ok(Ok(()))));
        }
        // Only the two sent calls count: the next caller waits for the minute
        // window, not for the hour the abandoned reservations had filled.
        let now = Instant::now();
        assert_eq!(
            budget.reserve(Endpoint::Restrict, now, deadline),
            Ok(start + M)
        );
        assert_eq!(
            budget.reserve(Endpoint::Restrict, now, deadline),
            Ok(start + M)
        );
        // Hour full (2 sent + 2 reserved): the fifth waits for the hour.
        assert_eq!(
            budget.reserve(Endpoint::Restrict, now, deadline),
            Ok(start + H)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_wait_is_over_keeps_its_slot() {
        let budget = RateBudget::new(1, 1500);
        let start = Instant::now();
        let far = start + HOUR;
        budget.acquire(Endpoint::Cancel, far).await.unwrap();
        budget.acquire(Endpoint::Cancel, far).await.unwrap();
        assert_eq!(Instant::now(), start + M, "the second waited a window");
        assert_eq!(
            budget.reserve(Endpoint::Cancel, Instant::now(), far),
            Ok(start + M * 2)
        );
    }

    #[test]
    fn slots_are_first_come_first_served() {
        let budget = RateBudget::new(1, 1500);
        let start = Instant::now();
        let far = start + HOUR;
        let a = budget.reserve(Endpoint::GetAction, start, far).unwrap();
        let b = budget.reserve(Endpoint::GetAction, start, far).unwrap();
        // A later caller never lands before b, even though time has passed.
        let c = budget
            .reserve(Endpoint::GetAction, start + Duration::from_secs(30), far)
            .unwrap();
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
    }
}
