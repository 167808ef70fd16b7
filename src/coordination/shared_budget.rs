//! One Defender budget per app: slot reservations shared by every instance.
//!
//! Defender counts 100 calls a minute and 1,500 an hour per API for the app
//! in the tenant, whichever instance sends them. Each API (bucket) has one
//! blob, `budget/<bucket>`, holding the wall-clock times (Unix ms) of the
//! slots handed out in the last hour, oldest first. Reserving is a read, the
//! same computation as the in-process budget
//! ([`crate::defender::budget::RateBudget`]: the earliest time at or after
//! now and after the last slot that keeps both windows within their limits,
//! each window one [`LATENCY_ALLOWANCE`] longer than Defender's), then a
//! write conditioned on the ETag that was read. A 412 means another instance
//! reserved in between: read again (after a jittered pause, 20 ms doubling
//! to 1 s) until the caller's deadline. So an uncontended reservation costs two storage
//! operations. Within one instance, the reservations that arrive while one
//! is in flight are served together by the next read and write, so a burst
//! costs two operations per batch, and one instance's calls never conflict
//! with each other. A job's group reserves its writes' slots together
//! ([`SharedBudget::reserve_share`]: within the jobs' share, now, all or
//! none) with a read and write of its own; a slot whose call goes later than
//! it says is moved to the call's time in the write that reserves the call
//! ([`SharedBudget::reserve_replacing`]).
//!
//! Slots are wall-clock times because instances share no monotonic clock;
//! Azure keeps instance clocks in sync, and the latency allowance absorbs
//! small skew.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;

use azure_core::http::Etag;
use serde::{Deserialize, Serialize};
use tokio::{sync::oneshot, time::Instant};

use super::{CoordinationError, backoff::Backoff, store::Store};
use crate::defender::budget::{LATENCY_ALLOWANCE, Share, next_within};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// A reserved slot: when the call may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The wall-clock time, as stored for every instance to see.
    pub at: SystemTime,
    /// The same moment on this process's monotonic clock.
    pub instant: Instant,
}

/// The stored form of a bucket.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Reservations {
    /// Unix milliseconds, ascending.
    slots: Vec<u64>,
}

/// The budget's limits and windows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub per_minute: usize,
    pub per_hour: usize,
    pub minute_ms: u64,
    pub hour_ms: u64,
    /// [`LATENCY_ALLOWANCE`] on the same clock.
    pub allowance: Duration,
}

impl Limits {
    /// Defender's limits, with the clock `speed` times faster than real time
    /// (benchmarks and tests; `DEFENDER_RATE_CLOCK_SPEED`).
    pub fn new(per_minute: u32, per_hour: u32, speed: f64) -> Self {
        let speed = if speed.is_finite() && speed >= 1.0 {
            speed
        } else {
            1.0
        };
        let ms = |window: Duration| {
            u64::try_from((window + LATENCY_ALLOWANCE).div_f64(speed).as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
        };
        Self {
            per_minute: usize::try_from(per_minute.max(1)).unwrap_or(usize::MAX),
            per_hour: usize::try_from(per_hour.max(1)).unwrap_or(usize::MAX),
            minute_ms: ms(MINUTE),
            hour_ms: ms(HOUR),
            allowance: LATENCY_ALLOWANCE.div_f64(speed),
        }
    }

    /// Both windows' limits (ms) as `share` leaves them, for [`next_within`].
    fn within(&self, share: Share) -> [(usize, u64); 2] {
        [
            (share.limit(self.per_minute, share.minute), self.minute_ms),
            (share.limit(self.per_hour, share.hour), self.hour_ms),
        ]
    }

    /// The earliest slot at or after `now` and the last reservation that
    /// keeps both windows within their limits. `slots` is ascending.
    fn next_slot(&self, slots: &[u64], now: u64) -> u64 {
        let mut slot = slots.last().map_or(now, |&last| last.max(now));
        loop {
            let mut moved = false;
            for (limit, window) in [
                (self.per_minute, self.minute_ms),
                (self.per_hour, self.hour_ms),
            ] {
                let in_window = slots.len() - slots.partition_point(|&t| t + window <= slot);
                if in_window >= limit {
                    // The limit-th most recent slot leaves the window then.
                    slot = slots[slots.len() - limit] + window;
                    moved = true;
                }
            }
            if !moved {
                return slot;
            }
        }
    }
}

/// The first pause after another instance's write beat ours, and the
/// longest. The first is short: in a burst over several instances, conflicts
/// are the rule and each costs a read and a write; doubling keeps instances
/// that keep colliding from spending their callers' time and the account's
/// requests on it.
const FIRST_CONFLICT_PAUSE: Duration = Duration::from_millis(20);
const MAX_CONFLICT_PAUSE: Duration = Duration::from_secs(1);

/// The shared budget over the coordination container.
#[derive(Debug)]
pub(crate) struct SharedBudget {
    limits: Limits,
    buckets: Mutex<HashMap<String, Arc<Mutex<Queue>>>>,
}

/// The reservations of this instance waiting for a bucket, and whether a
/// task is serving them.
#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<Request>,
    serving: bool,
}

#[derive(Debug)]
struct Request {
    deadline: Instant,
    /// A slot reserved ahead that this one replaces (Unix ms): removed in
    /// the same write ([`SharedBudget::reserve_replacing`]).
    replaces: Option<u64>,
    reply: oneshot::Sender<Result<Slot, CoordinationError>>,
}

impl SharedBudget {
    /// The latency allowance on the budget's clock.
    pub fn allowance(&self) -> Duration {
        self.limits.allowance
    }

    /// The minute window on the budget's clock, allowance included.
    pub fn minute_window(&self) -> Duration {
        Duration::from_millis(self.limits.minute_ms)
    }

    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: Mutex::default(),
        }
    }

    /// Reserve the next free slot in `bucket`. Requests that arrive while a
    /// read-and-write is in flight are served together by the next one, in
    /// arrival order: a burst on one instance costs two storage operations
    /// per batch, not per call, and its instances' writes rarely conflict.
    /// The batch is served by a task of its own, so a caller that gives up
    /// cannot strand the others.
    pub async fn reserve(
        &self,
        store: &Arc<Store>,
        bucket: &str,
        deadline: Instant,
    ) -> Result<Slot, CoordinationError> {
        self.reserve_replacing(store, bucket, deadline, None).await
    }

    /// [`Self::reserve`], removing `replaces` (a slot reserved ahead whose
    /// call is going later than its time) in the same write.
    pub async fn reserve_replacing(
        &self,
        store: &Arc<Store>,
        bucket: &str,
        deadline: Instant,
        replaces: Option<Slot>,
    ) -> Result<Slot, CoordinationError> {
        let queue = {
            let mut buckets = self.buckets.lock();
            buckets.entry(bucket.to_owned()).or_default().clone()
        };
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = queue.lock();
            q.waiting.push(Request {
                deadline,
                replaces: replaces.map(|slot| unix_ms(slot.at)),
                reply,
            });
            !std::mem::replace(&mut q.serving, true)
        };
        if start {
            tokio::spawn(serve(store.clone(), queue, bucket.to_owned(), self.limits));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CoordinationError::Unavailable {
                retry_after: Duration::from_secs(1),
                reason: "the budget reservation was abandoned".into(),
            })
        })
    }
}

impl SharedBudget {
    /// How long until `bucket` has a slot within `share` of each window,
    /// from the reservations every instance made (one read; nothing reserved).
    pub async fn wait_for_share(
        &self,
        store: &Store,
        bucket: &str,
        share: Share,
    ) -> Result<Duration, CoordinationError> {
        let (reservations, _) = read(store, &format!("budget/{bucket}")).await?;
        let now = unix_ms(SystemTime::now());
        let at = next_within(&reservations.slots, now, self.limits.within(share));
        Ok(Duration::from_millis(at.saturating_sub(now)))
    }

    /// Reserve `share.calls` slots now, each within `share` of every
    /// window, counting every instance's reservations; or none, with how
    /// long until they would fit. A read and a conditional write; after
    /// another instance's write, read again (a few times, and not past
    /// `deadline`: the caller asks again after the wait it is given).
    pub async fn reserve_share(
        &self,
        store: &Store,
        bucket: &str,
        share: Share,
        deadline: Instant,
    ) -> Result<Vec<Slot>, CoordinationError> {
        let blob = format!("budget/{bucket}");
        let mut backoff = Backoff::new(FIRST_CONFLICT_PAUSE, MAX_CONFLICT_PAUSE);
        let mut tries = 0;
        loop {
            let (mut reservations, etag) = read(store, &blob).await?;
            let (now_wall, now) = (unix_ms(SystemTime::now()), Instant::now());
            reservations
                .slots
                .retain(|&t| t + self.limits.hour_ms > now_wall);
            let fits = next_within(&reservations.slots, now_wall, self.limits.within(share));
            // Slots are handed out in order: behind a caller already
            // waiting for a later slot, there is no room now.
            let at = fits.max(reservations.slots.last().copied().unwrap_or(now_wall));
            if at > now_wall {
                return Err(CoordinationError::OverBudget {
                    bucket: bucket.to_owned(),
                    wait: Duration::from_millis(at - now_wall),
                });
            }
            let n = share.calls.max(1);
            reservations.slots.extend(std::iter::repeat_n(now_wall, n));
            let body = serde_json::to_vec(&reservations).unwrap_or_default();
            match store.write(&blob, body, etag).await? {
                Ok(_) => {
                    let slot = Slot {
                        at: UNIX_EPOCH + Duration::from_millis(now_wall),
                        instant: now,
                    };
                    return Ok(vec![slot; n]);
                }
                Err(refusal) if matches!(refusal.status, 409 | 412) => {}
                Err(refusal) => return Err(refused(&refusal, &blob)),
            }
            tries += 1;
            let pause = backoff.pause();
            if tries >= CONFLICT_TRIES || Instant::now() + pause >= deadline {
                // Busy: the caller waits and asks again.
                return Err(CoordinationError::OverBudget {
                    bucket: bucket.to_owned(),
                    wait: pause,
                });
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// Conditional writes [`SharedBudget::reserve_share`] tries before it
/// answers that the bucket is busy.
const CONFLICT_TRIES: u32 = 5;

/// Serve the bucket's queue, batch after batch, until it is empty.
async fn serve(store: Arc<Store>, queue: Arc<Mutex<Queue>>, bucket: String, limits: Limits) {
    loop {
        let batch = {
            let mut q = queue.lock();
            if q.waiting.is_empty() {
                q.serving = false;
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        let answers = reserve_batch(&store, &bucket, limits, &batch).await;
        for (request, answer) in batch.into_iter().zip(answers) {
            // A caller that stopped waiting leaves its slot unused: give it
            // back for the others.
            if let Err(Ok(slot)) = request.reply.send(answer) {
                give_back_later(&store, &bucket, slot);
            }
        }
    }
}

/// One answer per request, in order: read, assign slots, conditional write;
/// read again after a conflict.
async fn reserve_batch(
    store: &Store,
    bucket: &str,
    limits: Limits,
    batch: &[Request],
) -> Vec<Result<Slot, CoordinationError>> {
    let blob = format!("budget/{bucket}");
    let over = |wait: Duration| CoordinationError::OverBudget {
        bucket: bucket.to_owned(),
        wait,
    };
    let all = |error: CoordinationError| batch.iter().map(|_| Err(error.clone())).collect();
    let latest = batch.iter().map(|r| r.deadline).max();
    let mut backoff = Backoff::new(FIRST_CONFLICT_PAUSE, MAX_CONFLICT_PAUSE);
    loop {
        let (mut reservations, etag) = match read(store, &blob).await {
            Ok(read) => read,
            Err(error) => return all(error),
        };
        let (now_wall, now) = (unix_ms(SystemTime::now()), Instant::now());
        reservations
            .slots
            .retain(|&t| t + limits.hour_ms > now_wall);
        for old in batch.iter().filter_map(|r| r.replaces) {
            if let Some(index) = reservations.slots.iter().position(|&t| t == old) {
                reservations.slots.remove(index);
            }
        }
        let answers: Vec<_> = batch
            .iter()
            .map(|request| {
                let slot = limits.next_slot(&reservations.slots, now_wall);
                let wait = Duration::from_millis(slot.saturating_sub(now_wall));
                if now + wait > request.deadline {
                    // Not reserved: a later request with more time may
                    // still take this slot.
                    return Err(over(wait));
                }
                reservations.slots.push(slot);
                Ok(Slot {
                    at: UNIX_EPOCH + Duration::from_millis(slot),
                    instant: now + wait,
                })
            })
            .collect();
        // A slot being replaced is removed even when its new one is
        // refused: its call is not sent, and nobody else holds the old one.
        if answers.iter().all(Result::is_err) && batch.iter().all(|r| r.replaces.is_none()) {
            return answers;
        }
        let body = serde_json::to_vec(&reservations).unwrap_or_default();
        match store.write(&blob, body, etag).await {
            Ok(Ok(_)) => return answers,
            // Another instance reserved first: read again.
            Ok(Err(refusal)) if matches!(refusal.status, 409 | 412) => {}
            Ok(Err(refusal)) => return all(refused(&refusal, &blob)),
            Err(error) => return all(error),
        }
        let pause = backoff.pause();
        if latest.is_none_or(|latest| Instant::now() + pause >= latest) {
            return all(over(Duration::ZERO));
        }
        tokio::time::sleep(pause).await;
    }
}

/// Slots closer than this are not given back: the call would have gone out
/// before the write that frees it lands.
const GIVE_BACK_BEYOND: Duration = Duration::from_secs(1);

/// Give back, in the background, a slot whose call will not be sent (its
/// caller went away), so that the app's budget is not spent on nothing: two
/// storage operations (a read and a conditional write). Best effort: a slot
/// not given back only delays later calls.
pub(crate) fn give_back_later(store: &Arc<Store>, bucket: &str, slot: Slot) {
    if slot.instant < Instant::now() + GIVE_BACK_BEYOND {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return; // Shutting down: nothing will be sent anyway.
    };
    let (store, bucket) = (store.clone(), bucket.to_owned());
    runtime.spawn(async move {
        if let Err(error) = give_back_many(&store, &bucket, &[slot.at]).await {
            tracing::debug!(bucket, %error, "could not give back an unused budget slot");
        }
    });
}

/// Give back, in the background, slots reserved ahead
/// ([`SharedBudget::reserve_share`]) whose calls were not made: one read and
/// one conditional write for all of them, however close they are (the room
/// they leave counts for every later reservation).
pub(crate) fn give_back_all_later(store: &Arc<Store>, bucket: &str, slots: Vec<Slot>) {
    if slots.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (store, bucket) = (store.clone(), bucket.to_owned());
    runtime.spawn(async move {
        let at: Vec<SystemTime> = slots.iter().map(|s| s.at).collect();
        if let Err(error) = give_back_many(&store, &bucket, &at).await {
            tracing::debug!(bucket, %error, "could not give back unused budget slots");
        }
    });
}

/// Remove one reservation at each of `at` from the bucket (read,
/// conditional write; again after a conflict, a few times).
async fn give_back_many(
    store: &Store,
    bucket: &str,
    at: &[SystemTime],
) -> Result<(), CoordinationError> {
    let blob = format!("budget/{bucket}");
    let at: Vec<u64> = at.iter().map(|&t| unix_ms(t)).collect();
    let mut backoff = Backoff::new(FIRST_CONFLICT_PAUSE, MAX_CONFLICT_PAUSE);
    for _ in 0..5 {
        let (mut reservations, etag) = read(store, &blob).await?;
        let before = reservations.slots.len();
        for t in &at {
            if let Some(index) = reservations.slots.iter().position(|s| s == t) {
                reservations.slots.remove(index);
            }
        }
        if reservations.slots.len() == before {
            return Ok(());
        }
        let body = serde_json::to_vec(&reservations).unwrap_or_default();
        match store.write(&blob, body, etag).await? {
            Ok(_) => return Ok(()),
            Err(refusal) if matches!(refusal.status, 409 | 412) => {}
            Err(refusal) => return Err(refused(&refusal, &blob)),
        }
        tokio::time::sleep(backoff.pause()).await;
    }
    Ok(())
}

/// The bucket's reservations and ETag; none yet (and no ETag) when absent.
async fn read(
    store: &Store,
    blob: &str,
) -> Result<(Reservations, Option<Etag>), CoordinationError> {
    match store.read(blob).await? {
        Ok((body, etag)) => Ok((parse(&body, blob)?, Some(etag))),
        Err(refusal) if refusal.status == 404 => {
            if refusal.is("ContainerNotFound") {
                store.create_container().await?.or_else(|r| {
                    if r.status == 409 {
                        Ok(())
                    } else {
                        Err(refused(&r, blob))
                    }
                })?;
            }
            Ok((Reservations::default(), None))
        }
        Err(refusal) => Err(refused(&refusal, blob)),
    }
}

fn parse(body: &[u8], blob: &str) -> Result<Reservations, CoordinationError> {
    if body.is_empty() {
        return Ok(Reservations::default());
    }
    let mut reservations: Reservations =
        serde_json::from_slice(body).map_err(|_| CoordinationError::Unavailable {
            retry_after: Duration::from_secs(60),
            reason: format!("the budget blob {blob} is not readable; delete it to start afresh"),
        })?;
    // Written ascending by us; sort anyway, the computation relies on it.
    reservations.slots.sort_unstable();
    Ok(reservations)
}

fn refused(refusal: &super::store::Refusal, blob: &str) -> CoordinationError {
    CoordinationError::Unavailable {
        retry_after: Duration::from_secs(10),
        reason: format!(
            "storage answered {} {} on the budget blob {blob}",
            refusal.status,
            refusal.code.as_deref().unwrap_or_default()
        ),
    }
}

/// Wall-clock time as stored in blobs: Unix milliseconds.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_both_windows_within_their_limits() {
        let limits = Limits {
            per_minute: 2,
            per_hour: 3,
            minute_ms: 100,
            hour_ms: 1000,
            allowance: Duration::ZERO,
        };
        let mut slots = Vec::new();
        for _ in 0..6 {
            let slot = limits.next_slot(&slots, 0);
            slots.push(slot);
        }
        assert_eq!(slots, [0, 0, 100, 1000, 1000, 1100]);
    }

    #[test]
    fn a_sped_up_clock_shrinks_the_windows_allowance_included() {
        let limits = Limits::new(100, 1500, 60.0);
        assert_eq!(limits.minute_ms, 1016); // 61 s / 60
        assert_eq!(limits.hour_ms, 60016); // 3601 s / 60
        assert_eq!(Limits::new(100, 1500, 0.5).minute_ms, 61_000);
    }
}
