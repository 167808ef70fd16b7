//! One delivery of a job message: run its devices through the per-device
//! protocol and record each outcome; and the poison queue's last word.
//!
//! What becomes of a device's failure:
//! - one that cannot succeed by trying again (not found, a conflicting
//!   action pending, Defender refusing it) is its outcome, `failed` with the
//!   problem a single request would have answered;
//! - a budget slot that is further away than this invocation can wait (the
//!   minute or the hour window is spent) is not a failure: the device and
//!   the rest of the message go into a new message that becomes visible when
//!   the slot comes, and this one completes. Failing would bring it back at
//!   once (`visibilityTimeout` 0) and poison it after five deliveries in
//!   seconds, long before the hour is over;
//! - anything transient (Defender 5xx or timeout, storage unavailable, an
//!   ambiguous write) fails the invocation so the host delivers the message
//!   again; the problem is recorded first, so that the poison function can
//!   name it if the retries run out.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    Jobs, model,
    model::{DeviceProblem, JobMessage, MessageDevice, OutcomeRecord, SelectorRecord, to_metadata},
    request, resolve, unix_ms,
};
use crate::{
    coordination::{CoordinationError, records::WriteIf},
    defender::{
        DefenderError, Endpoint, Prepaid,
        budget::Share,
        ids::MachineId,
        models::{ActionType, Machine},
    },
    service::{
        machine_directory::MAX_CACHE,
        restrict::{Intent, Outcome, made_by_job},
        runbook::{CallerName, Comment, DeviceRef, RunbookError},
        service_error::ServiceError,
    },
};

/// The problem (code and detail) a single request would have answered.
pub type Explain = dyn Fn(&ServiceError) -> DeviceProblem + Send + Sync;

/// The invocation failed: the host should deliver the message again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorkFailed(pub String);

/// Time a device needs at least, at most: with less left, the rest of the
/// message goes to a new one. A sixth of the invocation's time when that is
/// shorter (the first device of a message always runs).
const DEVICE_RESERVE: Duration = Duration::from_secs(20);
/// Most a deferred message is spread beyond its slot, so that messages
/// waiting for the same window do not all arrive at once.
const DEFER_SPREAD: Duration = Duration::from_secs(30);

/// Devices of a message run together, at most this many: the group's
/// state is one tenant-wide read (two calls) and its admission asks the
/// budget once. Ten keep the jobs' admissions, racing on three instances,
/// within the part of each minute left to interactive requests.
pub(super) const GROUP: usize = 10;

/// Whether a group of a job's devices may start.
enum Admission<'a> {
    Now(Admitted<'a>),
    /// Not within this invocation: its slots are this far away.
    Later(Duration),
}

/// A group admitted on this instance: counted by later admissions until it
/// is finished; its writes' slots, reserved ahead.
struct Admitted<'a> {
    jobs: &'a Jobs,
    devices: usize,
    unreserved: usize,
    _writes: Prepaid,
}

impl<'a> Admitted<'a> {
    fn new(jobs: &'a Jobs, devices: usize, unreserved: usize, writes: Prepaid) -> Self {
        let inner = &jobs.inner;
        inner.admitted.fetch_add(devices, Ordering::AcqRel);
        inner.admitted_groups.fetch_add(1, Ordering::AcqRel);
        inner
            .admitted_unreserved
            .fetch_add(unreserved, Ordering::AcqRel);
        Self {
            jobs,
            devices,
            unreserved,
            _writes: writes,
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let inner = &self.jobs.inner;
        inner.admitted.fetch_sub(self.devices, Ordering::AcqRel);
        inner.admitted_groups.fetch_sub(1, Ordering::AcqRel);
        inner
            .admitted_unreserved
            .fetch_sub(self.unreserved, Ordering::AcqRel);
    }
}

/// What running one device came to.
enum Ran {
    /// Its outcome.
    Done(OutcomeRecord),
    Failed(ServiceError),
}

/// A listing of a job's selector, and when it was read.
#[derive(Debug, Clone)]
pub(super) struct Listing {
    at: Instant,
    /// By lower-case machine id.
    machines: Arc<HashMap<String, Machine>>,
}

/// The filter that lists a tag job's or a device-group job's machines.
fn selector_filter(job: &model::JobRecord) -> Option<String> {
    match &job.selector {
        SelectorRecord::DeviceIds(_) => None,
        SelectorRecord::MachineTag(tag) => {
            resolve::filter(&request::Selector::MachineTag(tag.clone()))
        }
        SelectorRecord::DeviceGroupId(id) => resolve::filter(&request::Selector::DeviceGroup(*id)),
    }
}

fn done(outcome: &str, machine: &Machine, action_id: Option<String>) -> OutcomeRecord {
    OutcomeRecord {
        outcome: outcome.to_owned(),
        machine_id: Some(machine.id.to_string()),
        computer_dns_name: machine.computer_dns_name.clone(),
        action_id,
        problem: None,
        at: unix_ms(OffsetDateTime::now_utc()),
    }
}

/// What to do about a device's error.
enum Disposition {
    /// Its outcome: `failed` with this problem.
    Failed,
    /// A slot comes only after this long: a new message, visible then.
    Later(Duration),
    /// Deliver the message again.
    Retry,
}

fn disposition(error: &ServiceError) -> Disposition {
    use Disposition::*;
    match error {
        ServiceError::Defender(e) | ServiceError::NotCreated(e) => match e {
            DefenderError::OverBudget { wait, .. } => Later(*wait),
            DefenderError::Status {
                status: 429,
                retry_after,
                ..
            } => Later(retry_after.unwrap_or(Duration::from_secs(60))),
            DefenderError::OutOfTime { .. } => Later(Duration::ZERO),
            // Storage unavailable, or the lease lost before the send: nothing was
            // sent, and it may well work on the next delivery.
            DefenderError::Refused { .. } | DefenderError::Token(_) => Retry,
            DefenderError::Status { status: 401, .. } => Retry,
            e if e.is_transient() => Retry,
            _ => Failed,
        },
        ServiceError::Coordination(CoordinationError::OverBudget { wait, .. }) => Later(*wait),
        // Nothing was sent, and nothing is wrong with the device: a new
        // message (visible at once, to a running instance) takes it on
        // without spending a delivery, so instance recycles never poison it.
        ServiceError::Coordination(CoordinationError::LockTimeout { .. })
        | ServiceError::QueuedPastDeadline { .. }
        | ServiceError::ShuttingDown => Later(Duration::ZERO),
        ServiceError::Coordination(CoordinationError::Unavailable { .. })
        | ServiceError::RoundStopped
        | ServiceError::ActingPastDeadline { .. } => Retry,
        _ => Failed,
    }
}

impl Jobs {
    /// Run one delivery of a message (its JSON text); `dequeue_count` is the
    /// host's (1 on the first delivery).
    ///
    /// A message's devices run as a group: admitted together when the jobs'
    /// share of each window has room for all of them, their machines
    /// re-checked with one listing of the job's selector, their state read
    /// with one tenant-wide read once each holds its machine's lock, and
    /// then each through the per-device protocol at once.
    pub async fn work(&self, text: &str, dequeue_count: u32) -> Result<(), WorkFailed> {
        let started = Instant::now();
        let deadline = started + self.inner.work_time;
        let message: JobMessage = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(e) => {
                // Delivering it again cannot make it readable.
                tracing::warn!(error = %e, "a job message is not readable; dropped");
                return Ok(());
            }
        };
        let storage = |e: CoordinationError| WorkFailed(e.to_string());
        let job_id = message.job.clone();
        let reserve = DEVICE_RESERVE.min(self.inner.work_time / 6);
        let mut next = 0;
        while next < message.devices.len() {
            // Read before each group: a cancel stops the next one.
            let Some(job) = self.read_job(&job_id).await.map_err(storage)? else {
                tracing::warn!(job_id = %job_id, "a message names a job that has no record; dropped");
                return Ok(());
            };
            if job.cancelled_at.is_some() {
                return Ok(());
            }
            if next > 0 && Instant::now() + reserve > deadline {
                self.hand_on(&job_id, &message.devices[next..], Duration::ZERO)
                    .await
                    .map_err(storage)?;
                return Ok(());
            }
            let end = (next + self.inner.group.max(1)).min(message.devices.len());
            // A message delivered again may have run some devices already.
            let mut group = Vec::new();
            for device in &message.devices[next..end] {
                if dequeue_count > 1
                    && self
                        .inner
                        .records
                        .read(&model::outcome_name(&job_id, device.i))
                        .await
                        .map_err(storage)?
                        .is_some()
                {
                    continue;
                }
                group.push(device);
            }
            if group.is_empty() {
                next = end;
                continue;
            }
            // Jobs come last: the group starts only once every API it uses
            // has room for it within the jobs' share of its windows, waited
            // for here, before any lease is taken or anything is read.
            let admitted = match self.admission(&job, &group, deadline, reserve).await {
                Ok(Admission::Now(admitted)) => admitted,
                Ok(Admission::Later(wait)) => {
                    self.defer(&job_id, &message.devices[next..], wait)
                        .await
                        .map_err(storage)?;
                    return Ok(());
                }
                Err(e) => {
                    return Err(WorkFailed(format!(
                        "the budget could not be consulted for job {job_id}: {e}"
                    )));
                }
            };
            let results = futures_util::future::join_all(
                group
                    .iter()
                    .map(|device| self.run_device(&job, device, deadline)),
            )
            .await;
            drop(admitted);

            let mut later: Option<Duration> = None;
            let mut deferred = Vec::new();
            let mut retry: Option<WorkFailed> = None;
            for (device, result) in group.iter().copied().zip(results) {
                match result {
                    Ran::Done(record) => {
                        self.record(&job_id, device, record)
                            .await
                            .map_err(storage)?;
                    }
                    Ran::Failed(error) => match disposition(&error) {
                        Disposition::Failed => {
                            let problem = (self.inner.explain)(&error);
                            self.record(&job_id, device, failed(device, problem))
                                .await
                                .map_err(storage)?;
                        }
                        Disposition::Later(wait) => {
                            later = Some(later.map_or(wait, |l| l.max(wait)));
                            deferred.push(device.clone());
                        }
                        Disposition::Retry => {
                            let problem = (self.inner.explain)(&error);
                            self.note_attempt(&job_id, device.i, &problem).await;
                            retry.get_or_insert(WorkFailed(format!(
                                "device {} of job {job_id}: {}",
                                device.d, problem.detail
                            )));
                        }
                    },
                }
            }
            // Delivered again, the message brings every device without an
            // outcome back, the deferred ones included.
            if let Some(failed) = retry {
                return Err(failed);
            }
            if let Some(wait) = later {
                deferred.extend_from_slice(&message.devices[end..]);
                self.defer(&job_id, &deferred, wait)
                    .await
                    .map_err(storage)?;
                return Ok(());
            }
            next = end;
        }
        Ok(())
    }

    /// One device of a group through the protocol (or its dry run).
    async fn run_device(
        &self,
        job: &model::JobRecord,
        device: &MessageDevice,
        deadline: Instant,
    ) -> Ran {
        // Both were checked when the job started.
        let target = match &device.m {
            Some(machine) => DeviceRef::parse(machine),
            None => DeviceRef::parse(&device.d),
        };
        let (target, intent) = match target.and_then(|t| Ok((t, intent(job)?))) {
            Ok(checked) => checked,
            Err(e) => {
                let problem = DeviceProblem {
                    code: "invalid_request".into(),
                    detail: e.to_string(),
                };
                return Ran::Done(failed(device, problem));
            }
        };
        let restrictor = &self.inner.restrictor;
        if job.dry_run {
            return match restrictor.plan(&target, &intent, deadline).await {
                Ok(plan) => Ran::Done(done(
                    plan.outcome.as_str(),
                    &plan.machine,
                    plan.action.map(|a| a.action.id.to_string()),
                )),
                Err(e) => Ran::Failed(e),
            };
        }
        // The group's state read waits (briefly) for this machine to join.
        let _expected = device
            .m
            .as_deref()
            .map(|m| restrictor.expect_read(&MachineId::from(m)));
        let success = match restrictor
            .run_in_background(&target, &intent, deadline)
            .await
        {
            Ok(success) => success,
            Err(e) => return Ran::Failed(e),
        };
        // The restriction record, and the job's expiry; a storage failure
        // fails the delivery (retried).
        if let Some(restrictions) = self.inner.restrictions.get() {
            let asked = intent.release_at.map(|at| {
                crate::service::runbook::ReleaseAfter::After(at - OffsetDateTime::now_utc())
            });
            if let Err(e) = restrictions.after(&success, asked, intent.release_at).await {
                return Ran::Failed(ServiceError::Coordination(e));
            }
        }
        // An action this job requested on an earlier delivery (one that
        // died after its POST, before its outcome was written) is found
        // pending or done now: its comment names the job, so the outcome
        // is still the request this job made.
        let outcome = if success.outcome != Outcome::Requested
            && made_by_job(&success.action.action, &job.job_id)
        {
            Outcome::Requested
        } else {
            success.outcome
        };
        Ran::Done(done(
            outcome.as_str(),
            &success.machine,
            Some(success.action.action.id.to_string()),
        ))
    }

    /// Whether a group of `job` may start now, waiting here (outside any
    /// lease) for the jobs' share of the budget when it comes within this
    /// invocation; or how long it would have to wait.
    async fn admission(
        &self,
        job: &model::JobRecord,
        group: &[&MessageDevice],
        deadline: Instant,
        reserve: Duration,
    ) -> Result<Admission<'_>, DefenderError> {
        let write = if job.release {
            Endpoint::Unrestrict
        } else {
            Endpoint::Restrict
        };
        let n = group.len();
        let client = &self.inner.client;
        // The writes reserved ahead: one per machine chosen when the job
        // started. A device still to be looked up (an Entra id with no
        // record then) asks the budget at its write like any call.
        // A dry run writes nothing.
        let machines: Vec<String> = if job.dry_run {
            Vec::new()
        } else {
            group.iter().filter_map(|d| d.m.clone()).collect()
        };
        let unknown = if job.dry_run { 0 } else { n - machines.len() };
        loop {
            // The machines first, outside the gate (a page per 10,000
            // machines, shared by the job's groups on this instance while it
            // is younger than the machine cache): the listing must not stand
            // between the writes' slots and the writes, or the POSTs reach
            // Defender later than their slots say.
            self.check_machines(job, group, deadline).await;
            let gate = self.inner.admission.lock().await;
            // Admitted here and not finished: their reads and lookups may
            // not be reserved yet, so they count as if they were about to be.
            let groups = self.inner.admitted_groups.load(Ordering::Acquire);
            let devices = self.inner.admitted.load(Ordering::Acquire);
            let unreserved = self.inner.admitted_unreserved.load(Ordering::Acquire);
            let share = |calls: usize| Share::JOBS.for_calls(calls);
            // One state read for the group (two calls: one per action
            // type); the machines re-checked with one listing of a tag or
            // group, or looked up one by one.
            let reads = share(n.min(2) + 2 * groups);
            // A tag or group job's machines were listed above (its one
            // listing call a minute per instance is not held to the share).
            let (read, list, get, writes) = if selector_filter(job).is_some() {
                tokio::try_join!(
                    client.wait_for_share(Endpoint::ListActions, reads),
                    async { Ok(Duration::ZERO) },
                    async { Ok(Duration::ZERO) },
                    async { Ok(Duration::ZERO) },
                )?
            } else {
                tokio::try_join!(
                    client.wait_for_share(Endpoint::ListActions, reads),
                    client.wait_for_share(Endpoint::ListMachines, share(n + devices)),
                    client.wait_for_share(Endpoint::GetMachine, share(n + devices)),
                    async {
                        if unknown == 0 {
                            Ok(Duration::ZERO)
                        } else {
                            client
                                .wait_for_share(write, share(unknown + unreserved))
                                .await
                        }
                    },
                )?
            };
            let mut wait = read.max(list).max(get).max(writes);
            if wait.is_zero() {
                let latest = deadline.checked_sub(reserve).unwrap_or(deadline);
                match client.prepay(write, &machines, Share::JOBS, latest).await {
                    // Storage was slow: too little time is left for the
                    // group (its slots are given back).
                    Ok(_) if Instant::now() > latest => {
                        return Ok(Admission::Later(Duration::ZERO));
                    }
                    Ok(prepaid) => {
                        return Ok(Admission::Now(Admitted::new(self, n, unknown, prepaid)));
                    }
                    // Another instance took the room first.
                    Err(DefenderError::OverBudget { wait: w, .. }) => {
                        wait = w.max(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            }
            drop(gate);
            if Instant::now() + wait + reserve > deadline {
                return Ok(Admission::Later(wait));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Re-check the group's machines before anything is sent to them: one
    /// listing of the job's tag or device group (shared by the job's
    /// messages on this instance while it is younger than the machine
    /// cache), whose records the protocol then uses instead of a lookup per
    /// device, under the machine directory's rule (only an Active record
    /// not merged into another; a POST answering 404 looks it up again). A
    /// machine missing from the listing (it left the tag since the job
    /// started), or not Active, or any device of an id-list job, is looked
    /// up by the protocol as a single request's would be. A failed listing
    /// only costs those lookups.
    async fn check_machines(
        &self,
        job: &model::JobRecord,
        group: &[&MessageDevice],
        deadline: Instant,
    ) {
        let Some(filter) = selector_filter(job) else {
            return;
        };
        let listing = {
            let mut listings = self.inner.listings.lock().await;
            listings.retain(|_, l| l.at.elapsed() < MAX_CACHE);
            match listings.get(&job.job_id) {
                Some(listing) => listing.clone(),
                None => {
                    let at = Instant::now();
                    match self.inner.client.machines_matching(&filter, deadline).await {
                        Ok(machines) => {
                            let listing = Listing {
                                at,
                                machines: Arc::new(
                                    machines
                                        .into_iter()
                                        .map(|m| (m.id.as_str().to_ascii_lowercase(), m))
                                        .collect(),
                                ),
                            };
                            listings.insert(job.job_id.clone(), listing.clone());
                            listing
                        }
                        Err(e) => {
                            tracing::warn!(job_id = %job.job_id, error = %e, "the job's selector could not be listed; its machines are looked up one by one");
                            return;
                        }
                    }
                }
            }
        };
        for device in group {
            let Some(m) = device.m.as_deref() else {
                continue;
            };
            let Ok(target) = DeviceRef::parse(m) else {
                continue;
            };
            if let Some(machine) = listing.machines.get(&m.to_ascii_lowercase()) {
                self.inner
                    .restrictor
                    .remember_machine(&target, machine.clone(), listing.at);
            }
        }
    }

    /// Hand `devices` on to a message that becomes visible when the budget
    /// has a slot for them (`wait`, spread a little), and note the wait in
    /// the job's progress so that the repair does not mistake it for a stall.
    async fn defer(
        &self,
        job_id: &str,
        devices: &[MessageDevice],
        wait: Duration,
    ) -> Result<(), CoordinationError> {
        // The spread is real time on Defender's clock: with the budget's
        // clock sped up (benchmarks), it shrinks with the windows.
        let most = DEFER_SPREAD.div_f64(self.inner.clock_speed).min(wait / 10);
        let spread = Duration::from_millis(fastrand::u64(
            0..=u64::try_from(most.as_millis()).unwrap_or(0),
        ));
        let delay = wait + spread;
        tracing::info!(job_id = %job_id, devices = devices.len(), wait_s = delay.as_secs(), "no budget slot within this invocation; the devices wait in a delayed message");
        self.hand_on(job_id, devices, delay).await?;
        let quiet = OffsetDateTime::now_utc()
            + time::Duration::try_from(delay).unwrap_or(time::Duration::ZERO);
        self.mark_progress(job_id, Some(quiet)).await;
        Ok(())
    }

    /// The poison queue's delivery: every device of the message without an
    /// outcome is `failed` with the problem of its last attempt.
    pub async fn poison(&self, text: &str) -> Result<(), WorkFailed> {
        let Ok(message) = serde_json::from_str::<JobMessage>(text) else {
            tracing::warn!("a poisoned job message is not readable; dropped");
            return Ok(());
        };
        let storage = |e: CoordinationError| WorkFailed(e.to_string());
        // A cancelled job's devices without an outcome are skipped, not failed.
        let job = self.read_job(&message.job).await.map_err(storage)?;
        if job.is_none_or(|job| job.cancelled_at.is_some()) {
            return Ok(());
        }
        for device in &message.devices {
            let last = self
                .inner
                .records
                .read(&model::attempt_name(&message.job, device.i))
                .await
                .map_err(storage)?
                .and_then(|r| model::from_metadata::<DeviceProblem>(&r.metadata));
            let problem = last.unwrap_or_else(|| DeviceProblem {
                code: "job_message_failed".into(),
                detail: "the job's message failed on every delivery, with no problem recorded \
                         (the handler may have stopped or timed out while running it)"
                    .into(),
            });
            self.record(&message.job, device, failed(device, problem))
                .await
                .map_err(storage)?;
        }
        tracing::warn!(job_id = %message.job, devices = message.devices.len(), "a job message reached the poison queue; its devices without an outcome are failed");
        Ok(())
    }

    /// Record a device's outcome, unless it has one already (the first stands).
    async fn record(
        &self,
        job_id: &str,
        device: &MessageDevice,
        record: OutcomeRecord,
    ) -> Result<(), CoordinationError> {
        let metadata = to_metadata(&record, &[("outcome", record.outcome.clone())]);
        let written = self
            .inner
            .records
            .write(
                &model::outcome_name(job_id, device.i),
                Vec::new(),
                metadata,
                WriteIf::Absent,
            )
            .await?;
        tracing::info!(
            job_id = %job_id,
            device_id = %device.d,
            outcome = %record.outcome,
            action_id = record.action_id.as_deref().unwrap_or(""),
            first = matches!(written, crate::coordination::records::Written::Done(_)),
            "job device done"
        );
        Ok(())
    }

    async fn note_attempt(&self, job_id: &str, index: usize, problem: &DeviceProblem) {
        if let Err(e) = self
            .inner
            .records
            .write(
                &model::attempt_name(job_id, index),
                Vec::new(),
                to_metadata(problem, &[]),
                WriteIf::Always,
            )
            .await
        {
            tracing::warn!(job_id = %job_id, error = %e, "a device's failed attempt could not be recorded");
        }
    }

    /// Send `devices` on in a new message, visible after `delay`.
    async fn hand_on(
        &self,
        job_id: &str,
        devices: &[MessageDevice],
        delay: Duration,
    ) -> Result<(), CoordinationError> {
        let message = JobMessage {
            job: job_id.to_owned(),
            devices: devices.to_vec(),
        };
        let text = serde_json::to_string(&message).unwrap_or_default();
        self.inner.queue.send(&text, delay).await
    }
}

fn failed(device: &MessageDevice, problem: DeviceProblem) -> OutcomeRecord {
    OutcomeRecord {
        outcome: "failed".into(),
        machine_id: device.m.clone(),
        computer_dns_name: None,
        action_id: None,
        problem: Some(problem),
        at: unix_ms(OffsetDateTime::now_utc()),
    }
}

/// The job's options as the protocol's intent, from the record (the
/// message carries only devices).
fn intent(job: &model::JobRecord) -> Result<Intent, RunbookError> {
    Ok(Intent {
        action: if job.release {
            ActionType::UnrestrictCodeExecution
        } else {
            ActionType::RestrictCodeExecution
        },
        force: job.force,
        cancel_pending: false,
        comment: Comment::parse(Some(&serde_json::Value::String(job.comment.clone())))?,
        caller: job
            .caller_name
            .as_ref()
            .and_then(|c| CallerName::parse(Some(&serde_json::Value::String(c.clone()))).ok())
            .flatten(),
        release_at: job.release_at.as_deref().and_then(|at| {
            OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
        }),
        job_id: Some(job.job_id.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance stopping refuses the device before anything is sent: it
    /// goes on in a new message, not as a failed delivery that counts
    /// towards the poison queue.
    #[test]
    fn a_device_refused_at_shutdown_waits_in_a_new_message_without_spending_a_delivery() {
        assert!(matches!(
            disposition(&ServiceError::ShuttingDown),
            Disposition::Later(wait) if wait.is_zero()
        ));
    }
}
