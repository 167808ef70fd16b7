//! Containment jobs: restrict or release a whole group of devices at the pace
//! Defender allows, on the Functions host's queue trigger.
//!
//! A job is started once ([`Jobs::start`]): its selector is resolved to
//! devices ([`resolve`]), its records are written ([`model`]) and then its
//! messages are sent, ten devices each. The host delivers each message at
//! least once to the worker ([`Jobs::work`]), which runs every device
//! through the same per-device protocol as a single request
//! ([`crate::service::restrict::Restrictor::run`]) and records its outcome;
//! a message that keeps failing reaches the poison function
//! ([`Jobs::poison`]), which records its devices `failed` with their last
//! problem. Nothing is remembered in memory between invocations: every
//! invocation reads the records it needs, so any instance can take any
//! message, and one killed mid-job loses nothing but time.
//!
//! The status read ([`Jobs::status`]) is also the repair: a job whose start
//! died before its messages were sent, or whose devices stay queued long
//! after the last sign of progress, is re-driven from its records (one
//! instance wins the repair through a conditional write), so a Logic App
//! polling it always sees it end.

pub mod model;
pub mod request;
pub mod resolve;
mod worker;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures_util::{StreamExt, stream};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;

use crate::defender::budget::Share;

use self::model::{
    DEVICES_PER_MESSAGE, INDEX_PREFIX, JobMessage, MessageDevice, from_metadata, index_of,
    to_metadata,
};
pub use self::{
    model::{DeviceEntry, DeviceProblem, IndexEntry, JobRecord, OutcomeRecord, SelectorRecord},
    request::{JobRequest, Selector},
    resolve::ResolveError,
    worker::{Explain, WorkFailed},
};
use crate::{
    coordination::{
        CoordinationError,
        queue::MessageQueue,
        records::{Records, WriteIf, Written},
    },
    defender::{DefenderClient, DefenderError},
    service::restrict::Restrictor,
};

/// The queue the worker's trigger reads; the host moves failing messages to
/// `<queue>-poison`.
pub const QUEUE_NAME: &str = "restrict-jobs";
pub const POISON_QUEUE_NAME: &str = "restrict-jobs-poison";

/// How long an `Idempotency-Key` answers the job it started.
const IDEMPOTENCY_WINDOW: time::Duration = time::Duration::hours(24);
/// A job with no sign of its messages this long after it started is
/// re-driven (its start died before sending them).
const START_GRACE: time::Duration = time::Duration::minutes(2);
/// A running job with no progress this long is re-driven: longer than the
/// host keeps a message invisible while an instance holds it (10 minutes)
/// plus an invocation, so that a message still held is not sent twice.
const STALL: time::Duration = time::Duration::minutes(15);
/// Messages sent at once when a job starts or is repaired.
const SEND_CONCURRENCY: usize = 16;

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job with id {0}")]
    NotFound(String),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Storage(#[from] CoordinationError),
    #[error("a job with this Idempotency-Key is still being started; retry in a few seconds")]
    StillStarting,
    /// The key started a job with a different request within the window.
    #[error("the Idempotency-Key {0:?} started a job with a different request")]
    KeyReused(String),
}

impl From<DefenderError> for JobError {
    fn from(e: DefenderError) -> Self {
        Self::Resolve(ResolveError::Defender(e))
    }
}

/// What a start answered.
#[derive(Debug, Clone)]
pub struct Started {
    pub job: JobRecord,
    /// The job an earlier request with the same `Idempotency-Key` started.
    pub replayed: bool,
}

/// A device as the status shows it.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub entry: DeviceEntry,
    /// `queued` until it has an outcome (`skipped` once the job is cancelled).
    pub outcome: OutcomeRecord,
}

/// A job's state, from its records.
#[derive(Debug, Clone)]
pub struct JobState {
    pub job: JobRecord,
    /// `running`, `done` or `cancelled`.
    pub status: &'static str,
    pub finished_at: Option<String>,
    /// Every outcome with its count, `queued` included.
    pub counts: BTreeMap<String, usize>,
    pub devices: Vec<DeviceState>,
    /// Messages were sent again because the job had stalled.
    pub repaired: bool,
}

impl JobState {
    pub fn finished(&self) -> bool {
        self.status != "running"
    }
}

/// What a cancel did.
#[derive(Debug, Clone)]
pub struct Cancelled {
    pub state: JobState,
    /// Devices whose action was already created; those actions stand.
    pub actions_created: usize,
    /// Devices that will not be sent.
    pub skipped: usize,
}

/// Starts jobs, runs their messages and reads their state. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    restrictor: Restrictor,
    client: DefenderClient,
    records: Arc<dyn Records>,
    queue: Arc<dyn MessageQueue>,
    /// How long one worker invocation runs devices before it hands the rest
    /// to a new message.
    work_time: Duration,
    explain: Arc<Explain>,
    /// The restriction records an expiry attaches to (set at startup).
    restrictions: std::sync::OnceLock<crate::service::expiry::Restrictions>,
    /// Job groups admitted on this instance and not finished, and their
    /// devices: each admission counts their reads and lookups, which may
    /// not be reserved yet (their writes are: [`DefenderClient::prepay`]).
    admitted: std::sync::atomic::AtomicUsize,
    admitted_groups: std::sync::atomic::AtomicUsize,
    /// Of those devices, the ones whose write has no slot reserved (a
    /// `deviceIds` job's Entra ids, looked up first): their writes ask the
    /// budget when they go, so they are counted against the share here.
    admitted_unreserved: std::sync::atomic::AtomicUsize,
    /// One admission at a time on this instance.
    admission: tokio::sync::Mutex<()>,
    /// The budget's clock speed (`DEFENDER_RATE_CLOCK_SPEED`, 1 but in
    /// benchmarks): the spread of deferred messages shrinks with the windows.
    clock_speed: f64,
    /// The most devices run as one group: never more than the jobs' share
    /// of a window holds.
    group: usize,
    /// The last listing of each job's selector, shared by its messages on
    /// this instance while it is fresh (see `worker::Listing`).
    listings: tokio::sync::Mutex<std::collections::HashMap<String, worker::Listing>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("records", &self.inner.records)
            .field("queue", &self.inner.queue)
            .field("work_time", &self.inner.work_time)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    /// `explain` gives a failed device's problem (code and detail) as a single
    /// request would have answered it.
    pub fn new(
        restrictor: Restrictor,
        client: DefenderClient,
        records: Arc<dyn Records>,
        queue: Arc<dyn MessageQueue>,
        work_time: Duration,
        explain: Arc<Explain>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                restrictor,
                client,
                records,
                queue,
                work_time,
                explain,
                restrictions: std::sync::OnceLock::new(),
                admitted: std::sync::atomic::AtomicUsize::new(0),
                admitted_groups: std::sync::atomic::AtomicUsize::new(0),
                admitted_unreserved: std::sync::atomic::AtomicUsize::new(0),
                admission: tokio::sync::Mutex::new(()),
                clock_speed: 1.0,
                group: worker::GROUP,
                listings: tokio::sync::Mutex::default(),
            }),
        }
    }

    /// The Defender budget the jobs share: `per_minute` and `per_hour`
    /// calls per API, its clock `speed` times faster than real time
    /// (`DEFENDER_RATE_CLOCK_SPEED`). Call right after [`Self::new`].
    #[must_use]
    pub fn with_budget(mut self, per_minute: u32, per_hour: u32, speed: f64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            if speed.is_finite() && speed >= 1.0 {
                inner.clock_speed = speed;
            }
            let share = |limit: u32, fraction: f64| {
                Share::of(usize::try_from(limit).unwrap_or(usize::MAX), fraction)
            };
            inner.group = worker::GROUP
                .min(share(per_minute, Share::JOBS.minute))
                .min(share(per_hour, Share::JOBS.hour));
        }
        self
    }

    /// Keep the restriction records (and a job's `releaseAfter`) in
    /// `restrictions`, the records the reconciler reads.
    pub fn keep_restrictions(&self, restrictions: crate::service::expiry::Restrictions) {
        let _ = self.inner.restrictions.set(restrictions);
    }

    /// Whether jobs live in this process's memory only (local mode).
    pub fn in_memory(&self) -> bool {
        self.inner.queue.in_memory()
    }

    /// Resolve the selector, write the job's records, then send its messages.
    pub async fn start(
        &self,
        request: &JobRequest,
        idempotency_key: Option<&str>,
        deadline: Instant,
    ) -> Result<Started, JobError> {
        let fingerprint = request.fingerprint();
        // A retry of a start that succeeded costs no Defender call.
        if let Some(key) = idempotency_key
            && let Some(earlier) = self.replay(key, &fingerprint).await?
        {
            return Ok(Started {
                job: earlier,
                replayed: true,
            });
        }
        let devices = resolve::devices(&self.inner.client, &request.selector, deadline).await?;
        let now = OffsetDateTime::now_utc();
        let job_id = uuid::Uuid::new_v4().to_string();
        if let Some(key) = idempotency_key
            && let Some(earlier) = self.claim_key(key, &fingerprint, &job_id, now).await?
        {
            return Ok(Started {
                job: earlier,
                replayed: true,
            });
        }
        let job = JobRecord {
            job_id: job_id.clone(),
            created_at: rfc3339(now),
            release: request.release,
            selector: match &request.selector {
                Selector::DeviceIds(ids) => SelectorRecord::DeviceIds(ids.len()),
                Selector::MachineTag(tag) => SelectorRecord::MachineTag(tag.clone()),
                Selector::DeviceGroup(id) => SelectorRecord::DeviceGroupId(*id),
            },
            comment: request.comment.as_str().to_owned(),
            caller_name: request.caller.as_ref().map(|c| c.as_str().to_owned()),
            force: request.force,
            devices: devices.len(),
            cancelled_at: None,
            release_at: request
                .release_after
                .and_then(|r| r.release_at(now))
                .map(crate::service::expiry::rfc3339),
            dry_run: request.dry_run,
        };
        let records = &self.inner.records;
        // The devices and the job before any message: a worker that finds
        // no job acknowledges its message and does nothing.
        records
            .write(
                &model::devices_name(&job_id),
                serde_json::to_vec(&devices).unwrap_or_default(),
                Default::default(),
                WriteIf::Always,
            )
            .await?;
        records
            .write(
                &model::job_name(&job_id),
                serde_json::to_vec(&job).unwrap_or_default(),
                Default::default(),
                WriteIf::Absent,
            )
            .await?;
        let entry = IndexEntry {
            job_id: job_id.clone(),
            created_at: job.created_at.clone(),
            release: job.release,
            selector: job.selector.clone(),
            devices: job.devices,
            caller_name: job.caller_name.clone(),
        };
        records
            .write(
                &model::index_name(unix_ms(now), &job_id),
                Vec::new(),
                to_metadata(&entry, &[]),
                WriteIf::Always,
            )
            .await?;
        let pending: Vec<(usize, &DeviceEntry)> = devices.iter().enumerate().collect();
        // A send that fails leaves the job to its repair (the records say
        // which devices still wait), and the caller gets the failure: a retry
        // with the same Idempotency-Key answers this job.
        if let Err(error) = self.send_devices(&job_id, &pending).await {
            tracing::warn!(job_id = %job_id, error = %error, "not every message of the job was sent; the job is re-driven when its status is read");
            return Err(error.into());
        }
        self.mark_progress(&job_id, None).await;
        tracing::info!(job_id = %job_id, devices = devices.len(), release = job.release, "job started");
        Ok(Started {
            job,
            replayed: false,
        })
    }

    /// The job `key` started within the window, if its record is there; an
    /// error if that job was started by a different request.
    async fn replay(&self, key: &str, fingerprint: &str) -> Result<Option<JobRecord>, JobError> {
        let Some(claim) = self
            .inner
            .records
            .read(&model::idempotency_name(key))
            .await?
        else {
            return Ok(None);
        };
        let at = meta(&claim.metadata, "at")
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        let age = unix_ms(OffsetDateTime::now_utc()).saturating_sub(at);
        if age >= IDEMPOTENCY_WINDOW.whole_milliseconds() as i64 {
            return Ok(None);
        }
        same_request(&claim.metadata, key, fingerprint)?;
        let job = meta(&claim.metadata, "job").unwrap_or_default();
        Ok(self.read_job(&job).await?)
    }

    /// Claim `key` for `job_id`; or the job it already started within the window.
    async fn claim_key(
        &self,
        key: &str,
        fingerprint: &str,
        job_id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<JobRecord>, JobError> {
        let name = model::idempotency_name(key);
        let claim = |condition| {
            let metadata = [
                ("job".to_owned(), job_id.to_owned()),
                ("at".to_owned(), unix_ms(now).to_string()),
                ("request".to_owned(), fingerprint.to_owned()),
            ]
            .into_iter()
            .collect();
            self.inner
                .records
                .write(&name, Vec::new(), metadata, condition)
        };
        for _ in 0..20 {
            if let Written::Done(_) = claim(WriteIf::Absent).await? {
                return Ok(None);
            }
            let Some(existing) = self.inner.records.read(&name).await? else {
                continue;
            };
            let at = meta(&existing.metadata, "at")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            let age = time::Duration::milliseconds(unix_ms(now).saturating_sub(at));
            let earlier = meta(&existing.metadata, "job").unwrap_or_default();
            if age < IDEMPOTENCY_WINDOW {
                same_request(&existing.metadata, key, fingerprint)?;
                if let Some(job) = self.read_job(&earlier).await? {
                    return Ok(Some(job));
                }
                if age < START_GRACE {
                    // The first request is writing its records right now.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            // Expired, or its start died before writing the job: take it over.
            if let Written::Done(_) = claim(WriteIf::Matches(existing.etag)).await? {
                return Ok(None);
            }
        }
        Err(JobError::StillStarting)
    }

    async fn read_job(&self, job_id: &str) -> Result<Option<JobRecord>, CoordinationError> {
        Ok(self.read_job_tagged(job_id).await?.map(|(job, _)| job))
    }

    async fn read_job_tagged(
        &self,
        job_id: &str,
    ) -> Result<Option<(JobRecord, String)>, CoordinationError> {
        let Some(record) = self.inner.records.read(&model::job_name(job_id)).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&record.body)
            .ok()
            .map(|job| (job, record.etag)))
    }

    /// Send messages for `devices`, ten devices each.
    async fn send_devices(
        &self,
        job_id: &str,
        devices: &[(usize, &DeviceEntry)],
    ) -> Result<(), CoordinationError> {
        let messages: Vec<String> = devices
            .chunks(DEVICES_PER_MESSAGE)
            .map(|chunk| {
                let message = JobMessage {
                    job: job_id.to_owned(),
                    devices: chunk
                        .iter()
                        .map(|(i, entry)| MessageDevice {
                            i: *i,
                            d: entry.device_id.clone(),
                            m: entry.machine_id.clone(),
                        })
                        .collect(),
                };
                serde_json::to_string(&message).unwrap_or_default()
            })
            .collect();
        let results: Vec<Result<(), CoordinationError>> = stream::iter(messages)
            .map(|text| async move { self.inner.queue.send(&text, Duration::ZERO).await })
            .buffer_unordered(SEND_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Record that messages were sent now, or that they wait until `quiet_until`.
    async fn mark_progress(&self, job_id: &str, quiet_until: Option<OffsetDateTime>) {
        let name = model::progress_name(job_id);
        let now = unix_ms(OffsetDateTime::now_utc());
        let mut metadata: std::collections::HashMap<String, String> =
            [("at".to_owned(), now.to_string())].into_iter().collect();
        if let Some(quiet) = quiet_until {
            // Keep the latest wait another worker recorded.
            let earlier = match self.inner.records.read(&name).await {
                Ok(Some(record)) => meta(&record.metadata, "quiet")
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0),
                _ => 0,
            };
            metadata.insert("quiet".to_owned(), unix_ms(quiet).max(earlier).to_string());
        }
        if let Err(error) = self
            .inner
            .records
            .write(&name, Vec::new(), metadata, WriteIf::Always)
            .await
        {
            tracing::warn!(job_id = %job_id, error = %error, "the job's progress could not be recorded");
        }
    }

    /// The job's state from its records; re-drives it when it has stalled.
    pub async fn status(&self, job_id: &str) -> Result<JobState, JobError> {
        let Some(job) = self.read_job(job_id).await? else {
            return Err(JobError::NotFound(job_id.to_owned()));
        };
        let mut state = self.state(job).await?;
        if !state.finished() {
            // The state is the answer; a repair that fails is tried again at
            // the next read.
            match self.repair(&state).await {
                Ok(repaired) => state.repaired = repaired,
                Err(error) => {
                    tracing::warn!(job_id = %job_id, error = %error, "the stalled job could not be re-driven");
                }
            }
        }
        Ok(state)
    }

    async fn state(&self, job: JobRecord) -> Result<JobState, CoordinationError> {
        let records = &self.inner.records;
        let devices: Vec<DeviceEntry> =
            match records.read(&model::devices_name(&job.job_id)).await? {
                Some(record) => serde_json::from_slice(&record.body).unwrap_or_default(),
                None => Vec::new(),
            };
        let mut outcomes: BTreeMap<usize, OutcomeRecord> = BTreeMap::new();
        for listed in records
            .list_all(&model::outcome_prefix(&job.job_id))
            .await?
        {
            if let (Some(index), Some(outcome)) = (
                index_of(&listed.name),
                from_metadata::<OutcomeRecord>(&listed.metadata),
            ) {
                outcomes.insert(index, outcome);
            }
        }
        let cancelled = job.cancelled_at.is_some();
        let mut counts: BTreeMap<String, usize> = model::OUTCOMES
            .iter()
            .map(|o| ((*o).to_owned(), 0))
            .chain([("queued".to_owned(), 0)])
            .collect();
        let mut latest = 0;
        let devices: Vec<DeviceState> = devices
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let outcome = outcomes.remove(&index).unwrap_or_else(|| OutcomeRecord {
                    outcome: if cancelled { "skipped" } else { "queued" }.to_owned(),
                    machine_id: entry.machine_id.clone(),
                    computer_dns_name: entry.computer_dns_name.clone(),
                    action_id: None,
                    problem: None,
                    at: 0,
                });
                latest = latest.max(outcome.at);
                *counts.entry(outcome.outcome.clone()).or_default() += 1;
                DeviceState { entry, outcome }
            })
            .collect();
        let queued = counts.get("queued").copied().unwrap_or(0);
        let (status, finished_at) = if let Some(at) = &job.cancelled_at {
            ("cancelled", Some(at.clone()))
        } else if queued == 0 {
            (
                "done",
                Some(
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(latest) * 1_000_000)
                        .map(rfc3339)
                        .unwrap_or_else(|_| job.created_at.clone()),
                ),
            )
        } else {
            ("running", None)
        };
        Ok(JobState {
            job,
            status,
            finished_at,
            counts,
            devices,
            repaired: false,
        })
    }

    /// Re-send the queued devices of a job that shows no progress: its start
    /// died before the messages, or every message is gone (expired, lost)
    /// while devices still wait. One instance wins, by a conditional write
    /// of the progress record. Duplicates are harmless: a device that ran
    /// already keeps its first outcome, and Defender's state answers
    /// `already_pending` for an action already created.
    async fn repair(&self, state: &JobState) -> Result<bool, CoordinationError> {
        let job_id = &state.job.job_id;
        let now = OffsetDateTime::now_utc();
        let progress = self
            .inner
            .records
            .read(&model::progress_name(job_id))
            .await?;
        let created = OffsetDateTime::parse(&state.job.created_at, &Rfc3339).unwrap_or(now);
        let last_outcome = state
            .devices
            .iter()
            .map(|d| d.outcome.at)
            .max()
            .unwrap_or(0);
        let (stalled, condition) = match &progress {
            None => (now - created > START_GRACE, WriteIf::Absent),
            Some(record) => {
                let ms = |key| {
                    meta(&record.metadata, key)
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0)
                };
                let last = ms("at").max(ms("quiet")).max(last_outcome);
                (
                    unix_ms(now).saturating_sub(last) > STALL.whole_milliseconds() as i64,
                    WriteIf::Matches(record.etag.clone()),
                )
            }
        };
        if !stalled {
            return Ok(false);
        }
        let metadata = [("at".to_owned(), unix_ms(now).to_string())]
            .into_iter()
            .collect();
        let won = self
            .inner
            .records
            .write(
                &model::progress_name(job_id),
                Vec::new(),
                metadata,
                condition,
            )
            .await?;
        if won == Written::Lost {
            return Ok(false);
        }
        let queued: Vec<(usize, &DeviceEntry)> = state
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.outcome.outcome == "queued")
            .map(|(i, d)| (i, &d.entry))
            .collect();
        tracing::warn!(job_id = %job_id, devices = queued.len(), "job showed no progress; sending its queued devices again");
        self.send_devices(job_id, &queued).await?;
        Ok(true)
    }

    /// Recent jobs, newest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<IndexEntry>, JobError> {
        let (page, _) = self
            .inner
            .records
            .list(INDEX_PREFIX, limit.clamp(1, 1000), None)
            .await?;
        Ok(page
            .iter()
            .filter_map(|listed| from_metadata::<IndexEntry>(&listed.metadata))
            .collect())
    }

    /// Stop sending the job's devices: those not sent yet become `skipped`;
    /// actions already created are left alone.
    pub async fn cancel(&self, job_id: &str) -> Result<Cancelled, JobError> {
        for _ in 0..10 {
            let Some((mut job, etag)) = self.read_job_tagged(job_id).await? else {
                return Err(JobError::NotFound(job_id.to_owned()));
            };
            if job.cancelled_at.is_none() {
                job.cancelled_at = Some(rfc3339(OffsetDateTime::now_utc()));
                let written = self
                    .inner
                    .records
                    .write(
                        &model::job_name(job_id),
                        serde_json::to_vec(&job).unwrap_or_default(),
                        Default::default(),
                        WriteIf::Matches(etag),
                    )
                    .await?;
                if written == Written::Lost {
                    continue;
                }
                tracing::info!(job_id = %job_id, "job cancelled");
            }
            let state = self.state(job).await?;
            let count = |o: &str| state.counts.get(o).copied().unwrap_or(0);
            return Ok(Cancelled {
                actions_created: count("requested"),
                skipped: count("skipped"),
                state,
            });
        }
        Err(JobError::Storage(CoordinationError::Unavailable {
            retry_after: Duration::from_secs(1),
            reason: "the job record kept changing while cancelling".into(),
        }))
    }
}

fn meta(metadata: &std::collections::HashMap<String, String>, key: &str) -> Option<String> {
    metadata
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// An Idempotency-Key answers only a retry of the request that claimed it:
/// the same key with another body (another tag, `release` flipped) would
/// otherwise be told "replayed" about a job that does something else. A
/// claim written before fingerprints were kept has none and is trusted.
fn same_request(
    metadata: &std::collections::HashMap<String, String>,
    key: &str,
    fingerprint: &str,
) -> Result<(), JobError> {
    match meta(metadata, "request") {
        Some(earlier) if earlier != fingerprint => Err(JobError::KeyReused(key.to_owned())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        coordination::records::MemoryRecords,
        defender::{DefenderClient, auth::TokenSource},
    };

    /// Keeps what was sent; nothing is delivered.
    #[derive(Debug, Default)]
    struct Sent(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl MessageQueue for Sent {
        async fn send(&self, text: &str, _delay: Duration) -> Result<(), CoordinationError> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(text.to_owned());
            Ok(())
        }
        fn in_memory(&self) -> bool {
            true
        }
    }

    /// Jobs over memory records and a queue that only records; Defender is
    /// never called by what these tests do.
    fn jobs() -> (Jobs, Arc<MemoryRecords>, Arc<Sent>) {
        let client = DefenderClient::new(
            url::Url::parse("http://127.0.0.1:9/").unwrap(),
            TokenSource::fixed("unused", Duration::from_secs(1)),
            None,
        );
        let restrictor = Restrictor::new(client.clone(), false, Duration::ZERO, None);
        let records = Arc::new(MemoryRecords::new());
        let sent = Arc::new(Sent::default());
        let explain: Arc<Explain> =
            Arc::new(
                |e: &crate::service::service_error::ServiceError| DeviceProblem {
                    code: "x".into(),
                    detail: e.to_string(),
                },
            );
        let jobs = Jobs::new(
            restrictor,
            client,
            records.clone(),
            sent.clone(),
            Duration::from_secs(60),
            explain,
        );
        (jobs, records, sent)
    }

    /// A job of three devices started `age` ago, the first with an outcome.
    async fn seed(records: &MemoryRecords, id: &str, age: time::Duration) {
        let created = OffsetDateTime::now_utc() - age;
        let devices: Vec<DeviceEntry> = (0..3)
            .map(|i| DeviceEntry {
                device_id: format!("{i:040x}"),
                machine_id: Some(format!("{i:040x}")),
                computer_dns_name: None,
            })
            .collect();
        let job = JobRecord {
            job_id: id.to_owned(),
            created_at: rfc3339(created),
            release: false,
            selector: SelectorRecord::MachineTag("t".into()),
            comment: "c".into(),
            caller_name: None,
            force: false,
            dry_run: false,
            devices: 3,
            cancelled_at: None,
            release_at: None,
        };
        let write = |name: String, body: Vec<u8>| async move {
            records
                .write(&name, body, Default::default(), WriteIf::Always)
                .await
                .unwrap()
        };
        write(
            model::devices_name(id),
            serde_json::to_vec(&devices).unwrap(),
        )
        .await;
        write(model::job_name(id), serde_json::to_vec(&job).unwrap()).await;
        let outcome = OutcomeRecord {
            outcome: "requested".into(),
            machine_id: None,
            computer_dns_name: None,
            action_id: Some("a".into()),
            problem: None,
            at: unix_ms(created),
        };
        records
            .write(
                &model::outcome_name(id, 0),
                Vec::new(),
                to_metadata(&outcome, &[]),
                WriteIf::Absent,
            )
            .await
            .unwrap();
    }

    fn sent_devices(sent: &Sent) -> Vec<usize> {
        sent.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|t| serde_json::from_str::<JobMessage>(t).unwrap().devices)
            .map(|d| d.i)
            .collect()
    }

    #[tokio::test]
    async fn a_start_that_died_before_its_messages_is_re_driven_once() {
        let (jobs, records, sent) = jobs();
        seed(&records, "j1", time::Duration::minutes(3)).await;
        let state = jobs.status("j1").await.unwrap();
        assert!(state.repaired);
        assert_eq!(state.status, "running");
        assert_eq!(state.counts["queued"], 2);
        // Only the devices without an outcome are sent again.
        assert_eq!(sent_devices(&sent), [1, 2]);
        // The repair is recorded: the next read does not send them again.
        assert!(!jobs.status("j1").await.unwrap().repaired);
        assert_eq!(sent_devices(&sent).len(), 2);
    }

    #[tokio::test]
    async fn a_young_start_and_a_job_making_progress_are_left_alone() {
        let (jobs, records, sent) = jobs();
        seed(&records, "young", time::Duration::seconds(30)).await;
        assert!(!jobs.status("young").await.unwrap().repaired);
        seed(&records, "busy", time::Duration::minutes(30)).await;
        jobs.mark_progress("busy", None).await;
        assert!(!jobs.status("busy").await.unwrap().repaired);
        // Waiting for the hour's slots: quiet until then, not stalled, though
        // the last send is long ago.
        seed(&records, "waiting", time::Duration::minutes(30)).await;
        let now = OffsetDateTime::now_utc();
        let progress: std::collections::HashMap<String, String> = [
            (
                "at".to_owned(),
                unix_ms(now - time::Duration::minutes(20)).to_string(),
            ),
            (
                "quiet".to_owned(),
                unix_ms(now + time::Duration::minutes(40)).to_string(),
            ),
        ]
        .into_iter()
        .collect();
        records
            .write(
                &model::progress_name("waiting"),
                Vec::new(),
                progress,
                WriteIf::Always,
            )
            .await
            .unwrap();
        assert!(!jobs.status("waiting").await.unwrap().repaired);
        assert!(sent_devices(&sent).is_empty());
    }

    #[tokio::test]
    async fn messages_lost_while_devices_wait_are_re_driven_after_the_stall() {
        let (jobs, records, sent) = jobs();
        seed(&records, "lost", time::Duration::hours(1)).await;
        let old = unix_ms(OffsetDateTime::now_utc() - time::Duration::minutes(16));
        records
            .write(
                &model::progress_name("lost"),
                Vec::new(),
                [("at".to_owned(), old.to_string())].into_iter().collect(),
                WriteIf::Always,
            )
            .await
            .unwrap();
        assert!(jobs.status("lost").await.unwrap().repaired);
        assert_eq!(sent_devices(&sent), [1, 2]);
    }

    #[tokio::test]
    async fn a_cancelled_job_ends_with_its_unsent_devices_skipped() {
        let (jobs, records, _) = jobs();
        seed(&records, "c", time::Duration::minutes(1)).await;
        let cancelled = jobs.cancel("c").await.unwrap();
        assert_eq!(cancelled.actions_created, 1);
        assert_eq!(cancelled.skipped, 2);
        let state = jobs.status("c").await.unwrap();
        assert_eq!(state.status, "cancelled");
        assert!(state.finished());
        assert!(matches!(
            jobs.status("nope").await,
            Err(JobError::NotFound(_))
        ));
    }
}
