//! One decision per device across instances: a blob lease per machine.
//!
//! The lease is taken on `locks/<machine id, lower-cased>` in the
//! coordination container (the empty blob and the container are created on
//! first use). Within one instance, invocations for the same machine queue
//! for the machine's round ([`crate::machine_queue`]), so only the round polls
//! storage, and it releases the lease before the next round takes it.
//!
//! - Acquiring proposes a fresh lease id and retries while another holder has
//!   the lease (409 `LeaseAlreadyPresent`), with exponential backoff and
//!   jitter, until the caller's deadline. Proposing our own id makes a retry
//!   after a lost answer idempotent.
//! - While held, a background task renews the lease every third of its
//!   duration. If renewing keeps failing, [`MachineLease::check`] fails
//!   before the lease could have run out, so the caller stops before acting.
//! - Dropping the guard stops the renewal and releases the lease in the
//!   background (best effort). A holder that dies without releasing stops
//!   renewing, and storage expires its lease after at most the lease
//!   duration: waiters go on then.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};

use super::{CoordinationError, store::Store};

/// First wait after finding the lease held, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

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
}

impl MachineLease {
    /// Fails when the lease may not be ours long enough to act safely: it
    /// was lost, or renewing has failed for more than a third of its
    /// duration. Call it right before sending to Defender.
    pub fn check(&self) -> Result<(), CoordinationError> {
        let valid_until = *self
            .state
            .valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
        Ok(())
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
        self.store
            .release_lease(&self.state.blob, &self.state.lease_id)
            .await?
            .or_else(|refusal| {
                // 409: it expired and someone else has it now; nothing to release.
                if refusal.status == 409 {
                    Ok(())
                } else {
                    Err(CoordinationError::Unavailable {
                        retry_after: self.state.duration,
                        reason: format!("storage answered {} to a release", refusal.status),
                    })
                }
            })
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
            if let Err(error) = store.release_lease(&state.blob, &state.lease_id).await {
                tracing::warn!(machine_id = %state.machine_id, %error,
                    "could not release the machine lease; it expires by itself");
            }
        });
    }
}

/// Take the machine's lease, waiting for other holders until `deadline`.
pub(crate) async fn lock_machine(
    store: &Arc<Store>,
    machine_id: &str,
    duration: Duration,
    clock_speed: f64,
    deadline: Instant,
) -> Result<MachineLease, CoordinationError> {
    let blob = lock_blob(machine_id);
    let lease_id = uuid::Uuid::new_v4().to_string();
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(60);
    let timed_out = || CoordinationError::LockTimeout {
        machine_id: machine_id.to_owned(),
    };
    // A sped-up clock (benchmarks) shortens the polls with everything else.
    let speed = if clock_speed.is_finite() && clock_speed >= 1.0 {
        clock_speed
    } else {
        1.0
    };
    let max_backoff = MAX_BACKOFF.div_f64(speed);
    let mut backoff = FIRST_BACKOFF.div_f64(speed);
    // Creating the container or the blob is done at most a few times; a
    // storage that keeps answering "not found" is not waited for.
    let mut creations = 0;
    loop {
        let sent = Instant::now();
        let answer = match store
            .acquire_lease(&blob, seconds, &lease_id, deadline)
            .await
        {
            Ok(Some(answer)) => answer,
            Ok(None) => {
                abandon(store, &blob, &lease_id);
                return Err(timed_out());
            }
            Err(error) => {
                // The request may have reached storage: do not leave a lease
                // with our id behind for a full duration.
                abandon(store, &blob, &lease_id);
                return Err(error);
            }
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
                });
                let renewal = tokio::spawn(renew(store.clone(), state.clone()));
                return Ok(MachineLease {
                    state,
                    renewal,
                    store: store.clone(),
                    released: false,
                });
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
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out());
        }
        let jittered = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::time::sleep_until((now + jittered).min(deadline)).await;
        backoff = (backoff * 2).min(max_backoff);
    }
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

/// Release a lease that an unanswered acquire may have taken.
fn abandon(store: &Arc<Store>, blob: &str, lease_id: &str) {
    let (store, blob, lease_id) = (store.clone(), blob.to_owned(), lease_id.to_owned());
    tokio::spawn(async move {
        let _ = store.release_lease(&blob, &lease_id).await;
    });
}

async fn renew(store: Arc<Store>, state: Arc<LeaseState>) {
    let every = state.duration / 3;
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        match store.renew_lease(&state.blob, &state.lease_id).await {
            Ok(Ok(())) => {
                *state.valid_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    sent + state.duration;
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
                let valid_until = *state.valid_until.lock().unwrap_or_else(|e| e.into_inner());
                if Instant::now() >= valid_until {
                    state.lost.store(true, Ordering::Relaxed);
                    return;
                }
                next = Instant::now() + Duration::from_secs(1).min(every);
            }
        }
    }
}
