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

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    Jobs, model,
    model::{DeviceProblem, JobMessage, MessageDevice, OutcomeRecord, to_metadata},
    unix_ms,
};
use crate::{
    coordination::{CoordinationError, records::WriteIf},
    defender::{DefenderError, Endpoint, budget::Share, models::ActionType},
    service::{
        restrict::Intent,
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

/// Whether a job's device may start.
enum Admission {
    Now,
    /// Not within this invocation: its slot is this far away.
    Later(Duration),
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
        ServiceError::Coordination(CoordinationError::LockTimeout { .. })
        | ServiceError::QueuedPastDeadline { .. } => Later(Duration::ZERO),
        ServiceError::Coordination(CoordinationError::Unavailable { .. })
        | ServiceError::ShuttingDown
        | ServiceError::RoundStopped
        | ServiceError::ActingPastDeadline { .. } => Retry,
        _ => Failed,
    }
}

impl Jobs {
    /// Run one delivery of a message (its JSON text); `dequeue_count` is the
    /// host's (1 on the first delivery).
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
        for (k, device) in message.devices.iter().enumerate() {
            // Read before each device: a cancel stops the next one.
            let Some(job) = self.read_job(&job_id).await.map_err(storage)? else {
                tracing::warn!(job_id = %job_id, "a message names a job that has no record; dropped");
                return Ok(());
            };
            if job.cancelled_at.is_some() {
                return Ok(());
            }
            // A message delivered again may have run some devices already.
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
            let reserve = DEVICE_RESERVE.min(self.inner.work_time / 6);
            if k > 0 && Instant::now() + reserve > deadline {
                self.hand_on(&job_id, &message.devices[k..], Duration::ZERO)
                    .await
                    .map_err(storage)?;
                return Ok(());
            }
            // Both were checked when the job started.
            let target = match &device.m {
                Some(machine) => DeviceRef::parse(machine),
                None => DeviceRef::parse(&device.d),
            };
            let (target, intent) = match target.and_then(|t| Ok((t, intent(&job)?))) {
                Ok(checked) => checked,
                Err(e) => {
                    let problem = DeviceProblem {
                        code: "invalid_request".into(),
                        detail: e.to_string(),
                    };
                    self.record(&job_id, device, failed(device, problem))
                        .await
                        .map_err(storage)?;
                    continue;
                }
            };
            // Jobs come last: a device starts only once every API it uses
            // has room within the jobs' share of its windows, waited for here,
            // before the protocol takes the machine's lease or reads anything.
            match self.admission(&job, deadline, reserve).await {
                Ok(Admission::Now) => {}
                Ok(Admission::Later(wait)) => {
                    self.defer(&job_id, &message.devices[k..], wait)
                        .await
                        .map_err(storage)?;
                    return Ok(());
                }
                Err(e) => {
                    return Err(WorkFailed(format!(
                        "the budget could not be consulted for job {job_id}: {e}"
                    )));
                }
            }
            let restrictor = &self.inner.restrictor;
            let result = if job.dry_run {
                restrictor
                    .plan(&target, &intent, deadline)
                    .await
                    .map(|plan| {
                        (
                            plan.outcome.as_str(),
                            plan.machine,
                            plan.action.map(|a| a.action.id),
                        )
                    })
            } else {
                match restrictor.run(&target, &intent, deadline).await {
                    Ok(success) => {
                        // The restriction record, and the job's expiry; a
                        // storage failure fails the delivery (retried).
                        if let Some(restrictions) = self.inner.restrictions.get() {
                            let asked = intent.release_at.map(|at| {
                                crate::service::runbook::ReleaseAfter::After(
                                    at - OffsetDateTime::now_utc(),
                                )
                            });
                            restrictions
                                .after(&success, asked, intent.release_at)
                                .await
                                .map_err(storage)?;
                        }
                        Ok((
                            success.outcome.as_str(),
                            success.machine,
                            Some(success.action.action.id),
                        ))
                    }
                    Err(e) => Err(e),
                }
            };
            match result {
                Ok((outcome, machine, action_id)) => {
                    let record = OutcomeRecord {
                        outcome: outcome.to_owned(),
                        machine_id: Some(machine.id.to_string()),
                        computer_dns_name: machine.computer_dns_name.clone(),
                        action_id: action_id.map(|id| id.to_string()),
                        problem: None,
                        at: unix_ms(OffsetDateTime::now_utc()),
                    };
                    self.record(&job_id, device, record)
                        .await
                        .map_err(storage)?;
                }
                Err(error) => match disposition(&error) {
                    Disposition::Failed => {
                        let problem = (self.inner.explain)(&error);
                        self.record(&job_id, device, failed(device, problem))
                            .await
                            .map_err(storage)?;
                    }
                    Disposition::Later(wait) => {
                        self.defer(&job_id, &message.devices[k..], wait)
                            .await
                            .map_err(storage)?;
                        return Ok(());
                    }
                    Disposition::Retry => {
                        let problem = (self.inner.explain)(&error);
                        self.note_attempt(&job_id, device.i, &problem).await;
                        return Err(WorkFailed(format!(
                            "device {} of job {job_id}: {}",
                            device.d, problem.detail
                        )));
                    }
                },
            }
        }
        Ok(())
    }

    /// Whether a device of `job` may start now, waiting here (outside any
    /// lease) for the jobs' share of the budget when it comes within this
    /// invocation; or how long it would have to wait.
    async fn admission(
        &self,
        job: &model::JobRecord,
        deadline: Instant,
        reserve: Duration,
    ) -> Result<Admission, DefenderError> {
        let write = if job.release {
            Endpoint::Unrestrict
        } else {
            Endpoint::Restrict
        };
        let client = &self.inner.client;
        let (write, lookup, read) = tokio::try_join!(
            client.wait_for_share(write, Share::JOBS),
            client.wait_for_share(Endpoint::GetMachine, Share::JOBS),
            client.wait_for_share(Endpoint::ListActions, Share::JOBS),
        )?;
        let wait = write.max(lookup).max(read);
        if wait.is_zero() {
            return Ok(Admission::Now);
        }
        if Instant::now() + wait + reserve > deadline {
            return Ok(Admission::Later(wait));
        }
        tokio::time::sleep(wait).await;
        Ok(Admission::Now)
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
        let spread = Duration::from_millis(fastrand::u64(
            0..=u64::try_from(DEFER_SPREAD.min(wait / 10).as_millis()).unwrap_or(0),
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
    })
}
