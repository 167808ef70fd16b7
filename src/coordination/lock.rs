//! One decision per device across instances: a blob lease per machine.
//!
//! The lease is taken on `locks/<machine id, lower-cased>` in the
//! coordination container (the empty blob and the container are created on
//! first use). Within one instance, invocations for the same machine queue
//! for the machine's round ([`crate::service::machine_queue`]), so only the
//! round polls storage, and it releases the lease before the next round
//! takes it.
//!
//! - Acquiring proposes a fresh lease id (so a retry after a lost answer is
//!   idempotent). While another holder has the lease (409
//!   `LeaseAlreadyPresent`), the waiter looks at the blob (one HEAD: leased
//!   or not, and its metadata) instead of trying again and again, until the
//!   lease is free or the caller's deadline passes.
//! - A holder whose next Defender call must wait for the rate budget (in an
//!   outbreak, up to minutes) announces in the blob's metadata until when it
//!   expects to be busy ([`MachineLease::announce`]). Waiters sleep until
//!   then, waking at least every third of the lease duration; without an
//!   announcement they back off exponentially (0.1 s doubling to 2 s, each
//!   pause ±50 % at random). A holder that leaves before its announced time
//!   (its callers went away) removes the announcement first.
//!   This keeps the storage requests of a waiting round to a few, however
//!   long the wait.
//! - A holder whose POST was answered with a pending action leaves it in the
//!   metadata for the waiters ([`Handoff`]), and removes it before it sends
//!   anything else ([`MachineLease::withdraw_handoff`], awaited). A waiting
//!   duplicate that arrived before that POST was sent is answered
//!   `already_pending` from it, without taking the lease or reading Defender
//!   (see [`crate::service::restrict`]). In the benchmark's burst spread
//!   over three instances, polling alone made 14 storage requests per
//!   invocation; announcements and handoffs bring it to about 6.
//! - The last step before each POST or cancel attempt is a metadata write
//!   under the lease id ([`MachineLease::confirm`]): storage refuses it once
//!   the lease is not ours, whatever our clock says. A refused metadata
//!   write (404, 409, 412) marks the lease lost; nothing more is sent.
//! - While held, a background task renews the lease every third of its
//!   duration. If renewing keeps failing, [`MachineLease::check`] fails
//!   before the lease could have run out, so the caller stops before acting.
//! - Dropping the guard stops the renewal and releases the lease in the
//!   background (best effort). A holder that dies without releasing stops
//!   renewing, and storage expires its lease after at most the lease
//!   duration: waiters go on then (a third of it later at most, if they were
//!   sleeping on an announcement). Azure may refuse a new lease for up to
//!   about a minute after the old one expired while the blob already looks
//!   free: the waiter's backoff is kept across its looks and tries, so it
//!   does not poll every 0.1 s meanwhile.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use parking_lot::Mutex;
use tokio::{task::JoinHandle, time::Instant};

use crate::defender::models::MachineAction;

use super::{
    CoordinationError,
    backoff::Backoff,
    shared_budget::unix_ms,
    store::{Refusal, Store},
};

/// First wait after finding the lease held, and the longest. Not sped up
/// with `DEFENDER_RATE_CLOCK_SPEED` (benchmarks): the waits that clock
/// scales, for the rate budget, are announced; what is left is storage and
/// Defender round trips, which no clock speeds up.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Holds shorter than this are not announced: a waiter's first looks come
/// about as often.
const ANNOUNCE_BEYOND: Duration = Duration::from_millis(500);

/// Added to an announced hold for the POST itself and the handoff after it.
const ACT_ALLOWANCE: Duration = Duration::from_millis(250);

/// Kept between a request's end and the lease's possible expiry.
const IN_FLIGHT_MARGIN: Duration = Duration::from_secs(1);

/// The lock blob's metadata entry in which a holder announces until when
/// (Unix milliseconds) it expects to hold the lease.
const BUSY_UNTIL: &str = "busyuntil";
/// The entries of a [`Handoff`]: the action (base64 of its JSON) and when its
/// POST was sent (Unix milliseconds).
const HANDOFF_ACTION: &str = "handoffaction";
const HANDOFF_SENT: &str = "handoffsent";
/// The largest handoff written: storage allows 8 KiB of metadata per blob.
const MAX_HANDOFF_BYTES: usize = 6 * 1024;

/// The blob holding a machine's lease.
pub(crate) fn lock_blob(machine_id: &str) -> String {
    format!("locks/{}", machine_id.trim().to_ascii_lowercase())
}

/// A held machine lease. Dropping it releases the lease (in the background,
/// best effort); [`MachineLease::release`] does it and waits.
#[derive(Debug)]
pub struct MachineLease {
    state: Arc<LeaseState>,
    renewal: JoinHandle<()>,
    store: Arc<Store>,
    released: bool,
}

#[derive(Debug)]
struct LeaseState {
    machine_id: String,
    blob: String,
    lease_id: String,
    duration: Duration,
    /// Until when storage surely still counts the lease as ours: the send
    /// time of the last successful acquire or renew, plus the duration.
    valid_until: Mutex<Instant>,
    /// Storage said the lease is no longer ours.
    lost: AtomicBool,
    /// The last time announced, so that a round announces each later one once.
    announced: Mutex<Option<Instant>>,
    /// The blob's metadata as this holder last wrote it. Writes hold the
    /// lock while they are sent, so they reach storage in the order they
    /// were made, each with everything written before it.
    metadata: tokio::sync::Mutex<HashMap<String, String>>,
}

impl MachineLease {
    /// Fails when the lease may not be ours long enough to act safely: it
    /// was lost, or renewing has failed for more than a third of its
    /// duration. Call it right before sending to Defender. `Ok(until)`: the
    /// lease is surely ours until then, even if no renewal succeeds from now
    /// on; a request sent under it must be over by then.
    pub fn check(&self) -> Result<Instant, CoordinationError> {
        let valid_until = *self.state.valid_until.lock();
        let margin = self.state.duration / 3;
        if self.state.lost.load(Ordering::Relaxed) || Instant::now() + margin > valid_until {
            return Err(CoordinationError::Unavailable {
                retry_after: self.state.duration,
                reason: format!(
                    "the lease on machine {} could not be renewed",
                    self.state.machine_id
                ),
            });
        }
        // Our clock started the lease when we sent the acquire or renew, so
        // storage's runs a little later; the second is for the answer's way back.
        Ok(valid_until - IN_FLIGHT_MARGIN)
    }

    /// Tell the instances waiting for this lease that it will be held until
    /// about `until` (the holder's next Defender call has its rate-budget slot
    /// then), so that they sleep instead of polling. Sent in the background,
    /// best effort: without it, waiters only poll more. Waits shorter than
    /// [`ANNOUNCE_BEYOND`] are not worth the request.
    pub fn announce(&self, until: Instant) {
        let now = Instant::now();
        let Some(ahead) = until.checked_duration_since(now) else {
            return;
        };
        if ahead < ANNOUNCE_BEYOND || self.state.lost.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut announced = self.state.announced.lock();
            if *announced == Some(until) {
                return;
            }
            *announced = Some(until);
        }
        // The POST and the handoff after it take a moment: waiters that wake
        // a little later find the handoff instead of the lease still held.
        let ms = unix_ms(SystemTime::now() + ahead + ACT_ALLOWANCE);
        let (store, state) = (self.store.clone(), self.state.clone());
        tokio::spawn(async move {
            let written = write_metadata(&store, &state, |metadata| {
                metadata.insert(BUSY_UNTIL.to_owned(), ms.to_string());
            })
            .await;
            if let Err(error) = written {
                tracing::debug!(machine_id = %state.machine_id, %error,
                    "could not announce the lease's hold");
            }
        });
    }

    /// Before a POST or cancel is sent under this lease: remove any
    /// [`Handoff`] from the blob (this holder's or an earlier one's), so that
    /// no waiter takes it for the machine's state once this write may have
    /// changed that. Awaited; when it fails, nothing may be sent.
    pub async fn withdraw_handoff(&self) -> Result<(), CoordinationError> {
        write_metadata(&self.store, &self.state, |metadata| {
            metadata.remove(HANDOFF_ACTION);
            metadata.remove(HANDOFF_SENT);
        })
        .await
    }

    /// The last step before a POST or cancel goes out under this lease (every
    /// attempt, retries included): a write to the lock blob conditioned on
    /// our lease id, which storage refuses once the lease is no longer ours,
    /// whatever our clock says. It also removes any [`Handoff`] (this
    /// holder's or an earlier one's), so that no waiter takes it for the
    /// machine's state once this write may have changed that. `Ok(until)` as
    /// [`Self::check`]; when it fails, nothing may be sent.
    pub async fn confirm(&self) -> Result<Instant, CoordinationError> {
        self.check()?;
        self.withdraw_handoff().await?;
        self.check()
    }

    /// After a POST answered with a pending action: leave it in the blob for
    /// the instances waiting for this lease ([`Handoff`]). Best effort:
    /// without it, they take the lease in turn and read the machine's
    /// actions themselves.
    pub async fn hand_off(&self, action: &MachineAction, sent: SystemTime) {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(action).unwrap_or_default());
        if encoded.len() > MAX_HANDOFF_BYTES {
            // Storage takes 8 KiB of metadata in all; the waiters read instead.
            tracing::debug!(machine_id = %self.state.machine_id, bytes = encoded.len(),
                "the action is too large to hand off");
            return;
        }
        let written = write_metadata(&self.store, &self.state, |metadata| {
            metadata.remove(BUSY_UNTIL);
            metadata.insert(HANDOFF_ACTION.to_owned(), encoded);
            metadata.insert(HANDOFF_SENT.to_owned(), unix_ms(sent).to_string());
        })
        .await;
        if let Err(error) = written {
            tracing::debug!(machine_id = %self.state.machine_id, %error,
                "could not hand the action off to waiting instances");
        }
    }

    pub fn machine_id(&self) -> &str {
        &self.state.machine_id
    }

    /// Release now and wait for storage's answer (the drop does the same in
    /// the background). A failure only delays the next holder until the
    /// lease expires.
    pub async fn release(mut self) -> Result<(), CoordinationError> {
        self.renewal.abort();
        self.released = true;
        if self.state.lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        withdraw_stale_announcement(&self.store, &self.state).await;
        let first = release_once(&self.store, &self.state.blob, &self.state.lease_id).await;
        if first.is_err() {
            // A release lost to a storage hiccup would keep every waiter for
            // the machine until the lease expires: try again, in the
            // background, so that this instance's next round is not held up.
            let (store, state) = (self.store.clone(), self.state.clone());
            tokio::spawn(async move { release_in_background(store, state).await });
        }
        first
    }
}

impl Drop for MachineLease {
    fn drop(&mut self) {
        self.renewal.abort();
        if self.released || self.state.lost.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // No runtime left: the lease expires by itself.
        };
        let (store, state) = (self.store.clone(), self.state.clone());
        runtime.spawn(async move {
            withdraw_stale_announcement(&store, &state).await;
            release_in_background(store, state).await;
        });
    }
}

/// A holder that announced a time still ahead is leaving before it (its
/// caller went away): remove the announcement, or the next holder's waiters
/// would sleep on it. One request, only in that case.
async fn withdraw_stale_announcement(store: &Store, state: &LeaseState) {
    let ahead = state
        .announced
        .lock()
        .take()
        .is_some_and(|until| until > Instant::now());
    if ahead {
        let _ = write_metadata(store, state, |metadata| {
            metadata.remove(BUSY_UNTIL);
        })
        .await;
    }
}

/// Release, trying up to three times.
async fn release_in_background(store: Arc<Store>, state: Arc<LeaseState>) {
    if let Err(error) = release(&store, &state.blob, &state.lease_id).await {
        tracing::warn!(machine_id = %state.machine_id, %error,
            "could not release the machine lease; it expires by itself");
    }
}

/// What waiting for a lease came to.
#[derive(Debug)]
pub enum Locked {
    Held(MachineLease),
    /// A [`Handoff`] seen while waiting answered everyone who needed the lease.
    Answered,
}

/// Take the machine's lease, waiting for other holders until `deadline`.
/// Every [`Handoff`] seen while waiting is given to `answered`; when it
/// returns `true`, the lease is no longer needed.
pub(crate) async fn lock_machine(
    store: &Arc<Store>,
    machine_id: &str,
    duration: Duration,
    deadline: Instant,
    answered: &mut (dyn FnMut(&Handoff) -> bool + Send),
) -> Result<Locked, CoordinationError> {
    let blob = lock_blob(machine_id);
    let lease_id = uuid::Uuid::new_v4().to_string();
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(60);
    let timed_out = || CoordinationError::LockTimeout {
        machine_id: machine_id.to_owned(),
    };
    // The longest sleep on an announcement: a holder that dies after
    // announcing a late time is noticed within this, once its lease expired.
    let max_sleep = duration / 3;
    // Creating the container or the blob is done at most a few times; a
    // storage that keeps answering "not found" is not waited for.
    let mut creations = 0;
    // Kept across the whole wait: when a look says the lease is free but
    // storage still refuses to grant it (after a lease expired, Azure can take
    // up to a minute to let go of it), the next look must not start again
    // from the shortest pause.
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        let sent = Instant::now();
        let answer = match acquire_detached(store, &blob, seconds, &lease_id, deadline).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Err(timed_out()),
            Err(error) => return Err(error),
        };
        match answer {
            Ok(()) => {
                let state = Arc::new(LeaseState {
                    machine_id: machine_id.to_owned(),
                    blob,
                    lease_id,
                    duration,
                    valid_until: Mutex::new(sent + duration),
                    lost: AtomicBool::new(false),
                    announced: Mutex::new(None),
                    metadata: tokio::sync::Mutex::default(),
                });
                let renewal = tokio::spawn(renew(store.clone(), state.clone()));
                return Ok(Locked::Held(MachineLease {
                    state,
                    renewal,
                    store: store.clone(),
                    released: false,
                }));
            }
            Err(refusal) if refusal.status == 404 && creations < 3 => {
                creations += 1;
                if refusal.is("ContainerNotFound") {
                    store.create_container().await?.or_else(already_there)?;
                }
                store
                    .write(&blob, Vec::new(), None)
                    .await?
                    .map(drop)
                    .or_else(already_there)?;
                continue;
            }
            Err(refusal) if refusal.status == 409 => {} // Held by someone else.
            Err(refusal) => {
                return Err(CoordinationError::Unavailable {
                    retry_after: duration,
                    reason: format!(
                        "storage answered {} {} to acquiring a lease",
                        refusal.status,
                        refusal.code.unwrap_or_default()
                    ),
                });
            }
        }
        match wait_while_held(store, &blob, max_sleep, deadline, &mut backoff, answered).await? {
            Waited::Free => {}
            Waited::Answered => return Ok(Locked::Answered),
            Waited::TimedOut => return Err(timed_out()),
        }
    }
}

enum Waited {
    /// Try for the lease again.
    Free,
    Answered,
    TimedOut,
}

/// Wait until the lease looks free, `deadline` passes, or a [`Handoff`]
/// answers everyone who was waiting.
///
/// Each look is one HEAD on the blob: whether it is leased, and until when
/// its holder said it would be busy ([`MachineLease::announce`]). With an
/// announcement, the waiter sleeps until then; without one (the holder is
/// still reading, or will not act), it backs off exponentially with jitter.
/// Trying to acquire would cost the same request but say neither.
async fn wait_while_held(
    store: &Store,
    blob: &str,
    max_sleep: Duration,
    deadline: Instant,
    backoff: &mut Backoff,
    answered: &mut (dyn FnMut(&Handoff) -> bool + Send),
) -> Result<Waited, CoordinationError> {
    // The holder was found a moment ago: it has not announced anything yet.
    tokio::time::sleep_until((Instant::now() + backoff.pause()).min(deadline)).await;
    loop {
        let Some(look) = store.lease_and_metadata(blob, deadline).await? else {
            return Ok(Waited::TimedOut);
        };
        let lease = match look {
            Ok(lease) => lease,
            // Gone: the acquire that follows creates it again.
            Err(refusal) if refusal.status == 404 => return Ok(Waited::Free),
            Err(refusal) => {
                return Err(CoordinationError::Unavailable {
                    retry_after: max_sleep,
                    reason: format!(
                        "storage answered {} {} to reading a lease",
                        refusal.status,
                        refusal.code.unwrap_or_default()
                    ),
                });
            }
        };
        if Handoff::from_metadata(&lease.metadata).is_some_and(|handoff| answered(&handoff)) {
            return Ok(Waited::Answered);
        }
        if !lease.leased {
            return Ok(Waited::Free);
        }
        let now = Instant::now();
        let announced = busy_until(&lease.metadata)
            .and_then(|until| until.duration_since(SystemTime::now()).ok())
            .filter(|ahead| !ahead.is_zero());
        let pause = match announced {
            Some(ahead) => {
                backoff.reset();
                ahead.min(max_sleep) + FIRST_BACKOFF.mul_f64(fastrand::f64())
            }
            None => backoff.pause(),
        };
        if now >= deadline {
            return Ok(Waited::TimedOut);
        }
        tokio::time::sleep_until((now + pause).min(deadline)).await;
        if Instant::now() >= deadline {
            return Ok(Waited::TimedOut);
        }
    }
}

/// The holder's announcement in the lock blob's metadata, if any.
fn busy_until(metadata: &HashMap<String, String>) -> Option<SystemTime> {
    let ms = metadata.get(BUSY_UNTIL)?.parse::<u64>().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// What the last POST under a machine's lease left for the instances waiting
/// for it: the action Defender answered it with (typed: every field
/// Defender sent, written out and read back), and when the POST was sent
/// (the holder's wall clock). A holder removes it before it sends anything
/// else ([`MachineLease::withdraw_handoff`]), so while it is there, no write
/// was sent under the lease for the machine after it (the cancel function,
/// which cancels by action id, takes the lease too). Metadata writes are not
/// conditioned on an ETag: a write held up in transit for longer than the
/// storage timeout could land after a later one; we accept that.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    pub sent: SystemTime,
    pub action: MachineAction,
}

impl Handoff {
    fn from_metadata(metadata: &HashMap<String, String>) -> Option<Self> {
        let ms = metadata.get(HANDOFF_SENT)?.parse::<u64>().ok()?;
        // Only times a calendar can hold: the waiter compares it with its own.
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(metadata.get(HANDOFF_ACTION)?)
            .ok()?;
        Some(Self {
            sent: UNIX_EPOCH.checked_add(Duration::from_millis(ms))?,
            action: serde_json::from_slice(&bytes).ok()?,
        })
    }
}

/// Apply `update` to the holder's metadata and write all of it (one request).
async fn write_metadata(
    store: &Store,
    state: &LeaseState,
    update: impl FnOnce(&mut HashMap<String, String>),
) -> Result<(), CoordinationError> {
    let mut metadata = state.metadata.lock().await;
    update(&mut metadata);
    store
        .set_metadata(&state.blob, &state.lease_id, &metadata)
        .await?
        .map_err(|refusal| {
            // Every such write carries our lease id: storage refuses it (412
            // `LeaseIdMismatchWithBlobOperation` or `LeaseNotPresent…`, 409
            // `LeaseLost`, or 404 once the blob is gone) only when the lease
            // is no longer ours. Another instance may be deciding for the
            // machine now: this holder sends nothing more.
            if matches!(refusal.status, 404 | 409 | 412) {
                tracing::warn!(machine_id = %state.machine_id, status = refusal.status,
                    code = ?refusal.code, "the machine lease was lost");
                state.lost.store(true, Ordering::Relaxed);
            }
            CoordinationError::Unavailable {
                retry_after: state.duration,
                reason: format!(
                    "storage answered {} {} to writing the lease's metadata; the lease on \
                     machine {} is no longer ours",
                    refusal.status,
                    refusal.code.unwrap_or_default(),
                    state.machine_id
                ),
            }
        })
}

/// A container or blob someone else created first is what we wanted.
fn already_there(refusal: super::store::Refusal) -> Result<(), CoordinationError> {
    if matches!(refusal.status, 409 | 412) {
        Ok(())
    } else {
        Err(CoordinationError::Unavailable {
            retry_after: Duration::from_secs(10),
            reason: format!("storage answered {} while creating a lock", refusal.status),
        })
    }
}

/// Acquire in a task of its own, so that neither an unclear answer nor a
/// waiter that goes away meanwhile (its callers hung up) leaves a lease with
/// our id behind for a full duration: the task releases it, after storage
/// answered (a release sent earlier could arrive before the acquire).
async fn acquire_detached(
    store: &Arc<Store>,
    blob: &str,
    seconds: i32,
    lease_id: &str,
    deadline: Instant,
) -> Result<Option<Result<(), Refusal>>, CoordinationError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let (store, blob, lease_id) = (store.clone(), blob.to_owned(), lease_id.to_owned());
    tokio::spawn(async move {
        let answer = store
            .acquire_lease(&blob, seconds, &lease_id, deadline)
            .await;
        // No answer (timeout, failure): the request may still have reached storage.
        let may_hold = !matches!(answer, Ok(Some(Err(_))));
        let unclear = !matches!(answer, Ok(Some(_)));
        let nobody_waits = reply.send(answer).is_err();
        if unclear || (nobody_waits && may_hold) {
            let _ = release(&store, &blob, &lease_id).await;
        }
    });
    answer.await.unwrap_or_else(|_| {
        Err(CoordinationError::Unavailable {
            retry_after: Duration::from_secs(1),
            reason: "the lease request was lost".into(),
        })
    })
}

/// Release a lease, trying up to three times: a release lost to a storage
/// hiccup would keep every waiter for the machine waiting until the lease
/// expires (up to its whole duration).
async fn release(store: &Store, blob: &str, lease_id: &str) -> Result<(), CoordinationError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let Err(error) = release_once(store, blob, lease_id).await else {
            return Ok(());
        };
        if tries >= 3 {
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(100 * tries + fastrand::u64(0..100))).await;
    }
}

/// Releasing is idempotent: a lease no longer ours (409) has nothing left to
/// release.
async fn release_once(store: &Store, blob: &str, lease_id: &str) -> Result<(), CoordinationError> {
    match store.release_lease(blob, lease_id).await? {
        Ok(()) => Ok(()),
        Err(refusal) if refusal.status == 409 => Ok(()),
        Err(refusal) => Err(CoordinationError::Unavailable {
            retry_after: Duration::from_secs(10),
            reason: format!("storage answered {} to a release", refusal.status),
        }),
    }
}

async fn renew(store: Arc<Store>, state: Arc<LeaseState>) {
    let every = state.duration / 3;
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        match store.renew_lease(&state.blob, &state.lease_id).await {
            Ok(Ok(())) => {
                *state.valid_until.lock() = sent + state.duration;
                next = sent + every;
            }
            Ok(Err(refusal)) => {
                tracing::warn!(machine_id = %state.machine_id, status = refusal.status,
                    code = ?refusal.code, "the machine lease was lost");
                state.lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::warn!(machine_id = %state.machine_id, %error,
                    "could not renew the machine lease; trying again");
                let valid_until = *state.valid_until.lock();
                if Instant::now() >= valid_until {
                    state.lost.store(true, Ordering::Relaxed);
                    return;
                }
                next = Instant::now() + Duration::from_secs(1).min(every);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_time_no_calendar_holds_is_no_handoff() {
        let action = base64::engine::general_purpose::STANDARD
            .encode(br#"{"id":"a","type":"RestrictCodeExecution","status":"Pending"}"#);
        let metadata = |sent: &str| {
            HashMap::from([
                (HANDOFF_ACTION.to_owned(), action.clone()),
                (HANDOFF_SENT.to_owned(), sent.to_owned()),
            ])
        };
        assert!(Handoff::from_metadata(&metadata("1764547200000")).is_some());
        assert!(Handoff::from_metadata(&metadata("99999999999999999")).is_none());
        assert!(Handoff::from_metadata(&metadata("soon")).is_none());
    }

    #[test]
    fn a_handoff_that_is_not_a_machine_action_is_no_handoff() {
        let metadata = |json: &str| {
            HashMap::from([
                (
                    HANDOFF_ACTION.to_owned(),
                    base64::engine::general_purpose::STANDARD.encode(json),
                ),
                (HANDOFF_SENT.to_owned(), "1764547200000".to_owned()),
            ])
        };
        assert!(Handoff::from_metadata(&metadata(r#"{"id":"a"}"#)).is_none());
        let handoff = Handoff::from_metadata(&metadata(
            r#"{"id":"A-1","type":"RestrictCodeExecution","status":"Pending","scope":"x"}"#,
        ))
        .unwrap();
        assert_eq!(handoff.action.id, "a-1");
        assert_eq!(handoff.action.extra.to_map()["scope"], "x");
    }
}
