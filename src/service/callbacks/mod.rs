//! Completion callbacks: one POST to the caller's `callbackUrl` when what a
//! request started is final, so a Logic Apps "HTTP Webhook" action (or any
//! other caller) can wait without polling.
//!
//! - [`policy`]: where a callback may go (checked at the request, and again
//!   for every resolved address at each delivery);
//! - [`send`]: one delivery attempt (pinned to the checked address, no
//!   redirects, 10 s, signed);
//! - [`Outbox`]: the durable pending callbacks and [`Outbox::deliver_due`],
//!   which the reconciler calls on each run.
//!
//! A pending callback is a record written with the request (blobs in the
//! app's storage account, or this process's memory in local mode), named
//! `callbacks/<day>/<key>`; its metadata (`state`, `due`) lets a run list
//! what is due without reading bodies, and a run reads only the days a
//! callback can still be pending in. Each attempt is claimed with a
//! conditional write before it is sent, so two runs at once send it once.
//! Delivery is at least once: a receiver that answered 2xx but whose answer
//! was lost gets the same body again, with the same `Idempotency-Key`.

pub mod policy;
pub mod send;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;
use url::Url;

use crate::{
    coordination::{
        CoordinationError,
        records::{Records, WriteIf, Written},
    },
    defender::{
        budget::Share,
        ids::{ActionId, MachineId},
        models::{ActionStatus, ActionType},
        timestamp::{Timestamp, lenient},
    },
    service::{jobs::Jobs, restrict::Restrictor},
};

pub use policy::CallbackPolicy;
use send::Attempt;

/// First pause after a failed attempt; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(60);
/// Longest pause between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// How long failed attempts are retried, from the first failure.
pub const RETRY_FOR: time::Duration = time::Duration::hours(24);
/// How long a callback waits for its action to be final. Defender ends an
/// action that never reaches its device with `TimeOut`; this only bounds a
/// record whose action Defender no longer lists.
pub const WAIT_FOR_FINAL: time::Duration = time::Duration::days(7);

const PREFIX: &str = "callbacks/";

/// What the callback reports on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    /// One device (`deviceId`): `action.finished`.
    Action { release: bool, device: Watched },
    /// `deviceIds`: `devices.finished` once every device's action is final.
    Devices {
        release: bool,
        devices: Vec<Watched>,
    },
    /// A job: `job.finished` once every device has its outcome and every
    /// action the job created or found pending is final.
    Job {
        job_id: String,
        /// The devices whose action the job waits on, taken from the job's
        /// records once every device has its outcome (`None` before).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<Vec<Watched>>,
    },
}

impl Subject {
    /// A job's callback, recorded when the job starts.
    pub fn job(job_id: String) -> Self {
        Self::Job {
            job_id,
            devices: None,
        }
    }
}

/// One device of a request and its action, as far as it is known.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Watched {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<MachineId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_dns_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<ActionId>,
    /// The action's final status once known (`already_in_state`: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// As Defender wrote it (`lastUpdateDateTimeUtc`).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<Timestamp>,
    /// The device failed before any action (its problem code and detail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Value>,
}

impl Watched {
    fn is_final(&self) -> bool {
        self.problem.is_some() || self.action_id.is_none() || self.status.is_some()
    }
}

/// A pending callback, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pending {
    /// Also the `Idempotency-Key` of every attempt.
    key: String,
    /// The callback URL: a secret, never logged.
    url: String,
    /// `scheme://host[:port]` the caller reached the app on, for `statusUrl`.
    #[serde(default)]
    origin: Option<String>,
    created: i64,
    subject: Subject,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    first_failed: Option<i64>,
    #[serde(default)]
    last_error: Option<String>,
}

/// What one [`Outbox::deliver_due`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryReport {
    /// Answered 2xx.
    pub delivered: usize,
    /// Failed; tried again after the backoff.
    pub retrying: usize,
    /// Given up: retried for 24 h, refused (private address), or the
    /// action never became final.
    pub abandoned: usize,
    /// Their action (or job) is not final yet.
    pub waiting: usize,
    /// Machines whose actions were read from Defender.
    pub machines_read: usize,
    /// Storage operations (lists, reads, writes).
    pub storage_operations: usize,
    /// Pending callbacks not handled because the deadline came first.
    pub left_for_next_run: usize,
}

/// The pending callbacks and their delivery. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    records: Arc<dyn Records>,
    policy: CallbackPolicy,
    restrictor: Restrictor,
    jobs: Option<Jobs>,
}

/// A callback URL that passed the request-time check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl(Url);

impl CallbackUrl {
    /// The host, which may be logged (the path and query carry the secret).
    pub fn host(&self) -> &str {
        self.0.host_str().unwrap_or("")
    }
}

impl Outbox {
    pub fn new(
        records: Arc<dyn Records>,
        policy: CallbackPolicy,
        restrictor: Restrictor,
        jobs: Option<Jobs>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                records,
                policy,
                restrictor,
                jobs,
            }),
        }
    }

    pub fn policy(&self) -> &CallbackPolicy {
        &self.inner.policy
    }

    /// The request-time check of a `callbackUrl` (no DNS lookup): the reason
    /// names what is wrong, never the URL.
    pub fn check(&self, raw: &str) -> Result<CallbackUrl, String> {
        self.inner.policy.check(raw).map(CallbackUrl)
    }

    /// Record a pending callback; `origin` is `scheme://host[:port]` the app
    /// was reached on. Answers the callback's key.
    pub async fn add(
        &self,
        url: &CallbackUrl,
        origin: Option<String>,
        subject: Subject,
    ) -> Result<String, CoordinationError> {
        let now = OffsetDateTime::now_utc();
        let key = uuid::Uuid::new_v4().to_string();
        let pending = Pending {
            key: key.clone(),
            url: url.0.to_string(),
            origin,
            created: now.unix_timestamp(),
            subject,
            attempts: 0,
            first_failed: None,
            last_error: None,
        };
        let name = format!("{PREFIX}{}/{key}", day(now));
        self.write(
            &name,
            &pending,
            "pending",
            now.unix_timestamp(),
            WriteIf::Absent,
        )
        .await?;
        tracing::info!(callback_key = %key, callback_host = %url.host(), "callback recorded");
        Ok(key)
    }

    /// Deliver every callback that is due at `now` and whose action or job
    /// is final; stop starting new work at `deadline`. The reconciler calls
    /// this on each run: it keeps nothing in memory between runs.
    pub async fn deliver_due(&self, now: OffsetDateTime, deadline: Instant) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        let due = match self.due(now, &mut report).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "listing the pending callbacks failed; trying again next run");
                return report;
            }
        };
        if due.is_empty() {
            return report;
        }
        let mut loaded = Vec::with_capacity(due.len());
        for name in due {
            if Instant::now() >= deadline {
                report.left_for_next_run += 1;
                continue;
            }
            report.storage_operations += 1;
            match self.inner.records.read(&name).await {
                // Claimed (or settled) by another run since the listing: the
                // claim's conditional write only guards against the etag read
                // here, so a record read after another run's claim must not
                // be claimed again.
                Ok(Some(record)) if !is_due(&record.metadata, now) => {}
                Ok(Some(record)) => match serde_json::from_slice::<Pending>(&record.body) {
                    Ok(pending) => loaded.push((name, record.etag, pending)),
                    Err(e) => {
                        tracing::warn!(record = %name, error = %e, "unreadable callback record skipped")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(record = %name, error = %e, "reading a callback record failed")
                }
            }
        }
        self.list_job_actions(&mut loaded).await;
        self.fill_statuses(&mut loaded, deadline, &mut report).await;
        for (name, etag, mut pending) in loaded {
            if Instant::now() >= deadline {
                report.left_for_next_run += 1;
                continue;
            }
            let age = now.unix_timestamp() - pending.created;
            let overdue = age > WAIT_FOR_FINAL.whole_seconds();
            let Some(body) = self.body(&pending, now, overdue).await else {
                if overdue {
                    pending.last_error = Some("the action never became final".into());
                    report.abandoned += 1;
                    report.storage_operations += 1;
                    let _ = self
                        .write(&name, &pending, "abandoned", 0, WriteIf::Matches(etag))
                        .await;
                    tracing::warn!(callback_key = %pending.key, "callback abandoned: its action never became final");
                } else {
                    report.waiting += 1;
                }
                continue;
            };
            self.attempt(&name, etag, pending, &body, now, &mut report)
                .await;
        }
        report
    }

    /// Names of the pending callbacks due at `now`, from listings only.
    async fn due(
        &self,
        now: OffsetDateTime,
        report: &mut DeliveryReport,
    ) -> Result<Vec<String>, CoordinationError> {
        let mut due = Vec::new();
        let days = WAIT_FOR_FINAL.whole_days() + RETRY_FOR.whole_days() + 1;
        for back in 0..=days {
            let prefix = format!("{PREFIX}{}/", day(now - time::Duration::days(back)));
            report.storage_operations += 1;
            for listed in self.inner.records.list_all(&prefix).await? {
                if is_due(&listed.metadata, now) {
                    due.push(listed.name);
                }
            }
        }
        Ok(due)
    }

    /// A job's callback waits for the job's actions, not only its outcomes:
    /// once every device has its outcome, the devices whose action the job
    /// created or found pending (`requested`, `already_pending`) become the
    /// callback's watched actions, read like those of `deviceIds`. Other
    /// outcomes have nothing left to finish.
    async fn list_job_actions(&self, loaded: &mut [(String, String, Pending)]) {
        let Some(jobs) = self.inner.jobs.as_ref() else {
            return;
        };
        for (_, _, pending) in loaded.iter_mut() {
            let Subject::Job { job_id, devices } = &mut pending.subject else {
                continue;
            };
            if devices.is_some() {
                continue;
            }
            let state = match jobs.status(job_id).await {
                Ok(state) if state.finished() => state,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(job_id = %job_id, error = %e, "reading the job for its callback failed");
                    continue;
                }
            };
            *devices = Some(
                state
                    .devices
                    .into_iter()
                    .filter(|d| {
                        matches!(d.outcome.outcome.as_str(), "requested" | "already_pending")
                    })
                    .map(|d| Watched {
                        device_id: d.entry.device_id,
                        machine_id: d.outcome.machine_id.map(MachineId::from),
                        computer_dns_name: d.outcome.computer_dns_name,
                        action_id: d.outcome.action_id.map(ActionId::from),
                        ..Watched::default()
                    })
                    .collect(),
            );
        }
    }

    /// Read the actions of every machine with an unfinished action among
    /// the loaded callbacks: one read per machine, through the shared state
    /// reads, which answer many machines with one tenant-wide read when the
    /// budget is tight.
    async fn fill_statuses(
        &self,
        loaded: &mut [(String, String, Pending)],
        deadline: Instant,
        report: &mut DeliveryReport,
    ) {
        let mut machines: Vec<MachineId> = loaded
            .iter()
            .flat_map(|(_, _, p)| watched(&p.subject))
            .filter(|w| !w.is_final())
            .filter_map(|w| w.machine_id.clone())
            .collect();
        machines.sort();
        machines.dedup();
        if machines.is_empty() {
            return;
        }
        // Reconciler priority: wait (within this run) for the reads' share of
        // the list-actions budget; otherwise leave them to the next run.
        match self.inner.restrictor.read_room(Share::RECONCILER).await {
            Ok(wait) if Instant::now() + wait < deadline => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            Ok(wait) => {
                tracing::info!(
                    wait_s = wait.as_secs(),
                    machines = machines.len(),
                    "no room in the list-actions budget for the callbacks' reads in this run"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the callbacks' reads cannot be budgeted now; trying again next run");
                return;
            }
        }
        report.machines_read = machines.len();
        let reads = machines.iter().map(|machine| {
            let restrictor = self.inner.restrictor.clone();
            async move {
                (
                    machine.clone(),
                    restrictor.machine_actions(machine, deadline).await,
                )
            }
        });
        let mut found: HashMap<ActionId, (String, Option<Timestamp>)> = HashMap::new();
        for (machine, read) in futures_util::future::join_all(reads).await {
            match read {
                Ok(actions) => {
                    for action in actions {
                        if action.status.known().is_some_and(ActionStatus::is_terminal) {
                            found.insert(
                                action.id,
                                (action.status.to_string(), action.last_update_date_time_utc),
                            );
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(machine_id = %machine, error = %e, "reading a machine's actions for its callbacks failed; trying again next run");
                }
            }
        }
        for (_, _, pending) in loaded.iter_mut() {
            for w in watched_mut(&mut pending.subject) {
                if w.is_final() {
                    continue;
                }
                if let Some(id) = &w.action_id
                    && let Some((status, at)) = found.get(id)
                {
                    w.status = Some(status.clone());
                    w.finished_at = *at;
                }
            }
        }
    }

    /// The JSON body to send, or `None` while not everything is final.
    /// `overdue`: the wait for final actions is over. A job's callback then
    /// goes anyway (the job itself ended; its actions still open are counted
    /// as `notFinal`), since a caller waiting on `job.finished` must hear
    /// of it; a single action's or `deviceIds`' callback is abandoned.
    async fn body(&self, pending: &Pending, now: OffsetDateTime, overdue: bool) -> Option<Vec<u8>> {
        let sent_at = rfc3339(now);
        let status_url = |action: &str| {
            pending
                .origin
                .as_ref()
                .map(|o| format!("{o}/api/restrict-code-execution/actions/{action}"))
        };
        let device = |release: bool, w: &Watched| {
            let mut value = json!({
                "deviceId": w.device_id,
                "actionId": w.action_id,
                "status": w.status.clone().or_else(|| w.problem.as_ref().map(|_| "Failed".to_owned())),
                "type": action_type(release).as_str(),
                "machineId": w.machine_id,
                "computerDnsName": w.computer_dns_name,
                "release": release,
                "statusUrl": w.action_id.as_deref().and_then(status_url),
                "finishedAt": w.finished_at,
            });
            if let (Some(problem), Value::Object(map)) = (&w.problem, &mut value) {
                map.insert("problem".into(), problem.clone());
            }
            value
        };
        let body = match &pending.subject {
            Subject::Action { release, device: w } => {
                if !w.is_final() {
                    return None;
                }
                let mut value = device(*release, w);
                if let Value::Object(map) = &mut value {
                    map.remove("deviceId");
                    map.insert("event".into(), json!("action.finished"));
                    map.insert("sentAt".into(), json!(sent_at));
                }
                value
            }
            Subject::Devices { release, devices } => {
                if !devices.iter().all(Watched::is_final) {
                    return None;
                }
                json!({
                    "event": "devices.finished",
                    "devices": devices.iter().map(|w| device(*release, w)).collect::<Vec<_>>(),
                    "sentAt": sent_at,
                })
            }
            Subject::Job { job_id, devices } => {
                // Every device has its outcome (`list_job_actions` filled
                // the list) and every action it waits on is final.
                let devices = devices.as_ref()?;
                if !overdue && !devices.iter().all(Watched::is_final) {
                    return None;
                }
                let jobs = self.inner.jobs.as_ref()?;
                let state = match jobs.status(job_id).await {
                    Ok(state) => state,
                    Err(e) => {
                        tracing::warn!(job_id = %job_id, error = %e, "reading the job for its callback failed");
                        return None;
                    }
                };
                let counts: BTreeMap<String, usize> = state.counts;
                let mut actions: BTreeMap<String, usize> = BTreeMap::new();
                for w in devices
                    .iter()
                    .filter(|w| w.action_id.is_some() && w.problem.is_none())
                {
                    let status = w.status.clone().unwrap_or_else(|| "notFinal".to_owned());
                    *actions.entry(status).or_default() += 1;
                }
                json!({
                    "event": "job.finished",
                    "jobId": job_id,
                    "status": state.status,
                    "counts": counts,
                    "actions": actions,
                    "statusUrl": pending.origin.as_ref().map(|o| format!("{o}/api/restrict-code-execution/jobs/{job_id}")),
                    "sentAt": sent_at,
                })
            }
        };
        serde_json::to_vec(&body).ok()
    }

    /// Claim the attempt (a conditional write that also sets the next try),
    /// send it, and record what came of it.
    async fn attempt(
        &self,
        name: &str,
        etag: String,
        mut pending: Pending,
        body: &[u8],
        now: OffsetDateTime,
        report: &mut DeliveryReport,
    ) {
        pending.attempts += 1;
        let retry_at = now.unix_timestamp()
            + i64::try_from(backoff(pending.attempts).as_secs()).unwrap_or(3600);
        report.storage_operations += 1;
        let claimed = match self
            .write(name, &pending, "pending", retry_at, WriteIf::Matches(etag))
            .await
        {
            Ok(Written::Done(etag)) => etag,
            // Another run claimed it first: that run sends it.
            Ok(Written::Lost) => return,
            Err(e) => {
                tracing::warn!(callback_key = %pending.key, error = %e, "claiming a callback failed; trying again next run");
                return;
            }
        };
        let Ok(url) = Url::parse(&pending.url) else {
            report.abandoned += 1;
            return;
        };
        let host = url.host_str().unwrap_or("").to_owned();
        let outcome = send::post(&self.inner.policy, &url, &pending.key, body).await;
        let (state, due) = match &outcome {
            Attempt::Delivered(status) => {
                tracing::info!(callback_key = %pending.key, callback_host = %host, status, attempts = pending.attempts, "callback delivered");
                report.delivered += 1;
                pending.last_error = None;
                ("delivered", 0)
            }
            Attempt::Refused(why) => {
                tracing::warn!(callback_key = %pending.key, callback_host = %host, reason = %why, "callback refused: not sent");
                report.abandoned += 1;
                pending.last_error = Some(why.clone());
                ("refused", 0)
            }
            Attempt::Failed(why) => {
                let first = *pending.first_failed.get_or_insert(now.unix_timestamp());
                pending.last_error = Some(why.clone());
                if now.unix_timestamp() - first >= RETRY_FOR.whole_seconds() {
                    tracing::warn!(callback_key = %pending.key, callback_host = %host, reason = %why, attempts = pending.attempts, "callback abandoned after retrying for 24 h");
                    report.abandoned += 1;
                    ("abandoned", 0)
                } else {
                    tracing::info!(callback_key = %pending.key, callback_host = %host, reason = %why, attempts = pending.attempts, retry_at, "callback failed; retrying later");
                    report.retrying += 1;
                    ("pending", retry_at)
                }
            }
        };
        report.storage_operations += 1;
        if let Err(e) = self
            .write(name, &pending, state, due, WriteIf::Matches(claimed))
            .await
        {
            // The claim stands: a delivered callback may be sent once more
            // at its retry time (at least once).
            tracing::warn!(callback_key = %pending.key, error = %e, "recording a callback attempt failed");
        }
    }

    async fn write(
        &self,
        name: &str,
        pending: &Pending,
        state: &str,
        due: i64,
        condition: WriteIf,
    ) -> Result<Written, CoordinationError> {
        let body = serde_json::to_vec(pending).unwrap_or_default();
        let metadata = HashMap::from([
            ("state".to_owned(), state.to_owned()),
            ("due".to_owned(), due.to_string()),
        ]);
        self.inner
            .records
            .write(name, body, metadata, condition)
            .await
    }
}

/// Whether a callback record's metadata says it is pending and due at `now`.
fn is_due(metadata: &HashMap<String, String>, now: OffsetDateTime) -> bool {
    let pending = metadata.get("state").is_some_and(|s| s == "pending");
    let at = metadata
        .get("due")
        .and_then(|d| d.parse::<i64>().ok())
        .unwrap_or(0);
    pending && at <= now.unix_timestamp()
}

/// The pause after the `attempts`th attempt failed: 1 min, doubling, at most 1 h.
pub fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

fn action_type(release: bool) -> ActionType {
    if release {
        ActionType::UnrestrictCodeExecution
    } else {
        ActionType::RestrictCodeExecution
    }
}

fn watched(subject: &Subject) -> Vec<&Watched> {
    match subject {
        Subject::Action { device, .. } => vec![device],
        Subject::Devices { devices, .. } => devices.iter().collect(),
        Subject::Job { devices, .. } => devices.iter().flatten().collect(),
    }
}

fn watched_mut(subject: &mut Subject) -> Vec<&mut Watched> {
    match subject {
        Subject::Action { device, .. } => vec![device],
        Subject::Devices { devices, .. } => devices.iter_mut().collect(),
        Subject::Job { devices, .. } => devices.iter_mut().flatten().collect(),
    }
}

fn day(t: OffsetDateTime) -> String {
    format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_minute_up_to_an_hour() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
