//! `restrict-code-execution`: restrict or release one device (`deviceId`) or
//! several (`deviceIds`), optionally waiting for the action to finish or
//! answering asynchronously (`Prefer: respond-async`).

use std::time::Duration;

use futures_util::{StreamExt, stream};
use http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;

use super::{
    Record, callback, dry_run,
    status::{POLL_AFTER_SECONDS, status_url},
};
use crate::{
    defender::{
        ids::{ActionId, MachineId},
        models::ActionType,
        timestamp::Timestamp,
    },
    host::{
        app_state::AppState,
        error::{ApiError, Problem},
        invocation::Invocation,
        reply::Reply,
    },
    service::{
        callbacks::{CallbackUrl, Subject, Watched},
        expiry::{ExpiryNote, rfc3339},
        restrict::{Intent, Outcome, Success},
        runbook::{CallerName, DeviceRef, RunbookRequest, Target},
    },
};

/// Devices acted on at the same time in a `deviceIds` call; the shared rate
/// budget paces them further.
const BULK_CONCURRENCY: usize = 8;
/// Time kept back from the invocation's budget to answer after `wait`.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// The caller named in the payload or else, for an authenticated caller who
/// did not name themselves, the principal's name: either way it is recorded.
pub(super) fn caller_or_principal(
    named: Option<CallerName>,
    invocation: &Invocation,
) -> Option<CallerName> {
    named.or_else(|| {
        let name = invocation.principal().and_then(|p| p.name)?;
        CallerName::parse(Some(&Value::String(name))).ok().flatten()
    })
}

pub async fn run(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let deadline = Instant::now() + state.request_timeout();
    let mut request = RunbookRequest::parse(&invocation.body)?;
    request.caller = caller_or_principal(request.caller.take(), invocation);
    record.release = Some(request.release);
    record.caller_name = request.caller.as_ref().map(|c| c.as_str().to_owned());
    // Before anything reaches Defender: a callback that may not go where it
    // points is a 400.
    let callback = callback::check(state, request.callback_url.as_deref())?;
    if request.dry_run {
        return dry_run::answer(state, invocation, &request, deadline, record).await;
    }

    match request.target.clone() {
        Target::One(device) => {
            let mut reply = single(state, invocation, &request, &device, deadline, record).await;
            if let (Some(url), Ok((_, success))) = (&callback, &mut reply) {
                let subject = Subject::Action {
                    release: request.release,
                    device: callback::watched(&device, Ok(success)),
                };
                if let Some(warning) = callback::record(state, invocation, url, subject).await {
                    tracing::warn!(%warning, "no callback for this request");
                }
            }
            reply.map(|(reply, _)| reply)
        }
        Target::Many(devices) => Ok(bulk(
            state,
            invocation,
            &request,
            &devices,
            deadline,
            record,
            callback.as_ref(),
        )
        .await),
    }
}

async fn single(
    state: &AppState,
    invocation: &Invocation,
    request: &RunbookRequest,
    device: &DeviceRef,
    deadline: Instant,
    record: &mut Record,
) -> Result<(Reply, Success), ApiError> {
    let format = invocation.format();
    record.device_id = Some(device.to_string());
    record.headline = Some(headline(request, device));
    let (mut success, expiry) = act(state, request, device, deadline).await?;
    wait_for(state, request, &mut success, deadline).await;
    record.machine_id = Some(success.machine.id.to_string());
    record.outcome = Some(success.outcome.as_str());
    record.action_id = Some(success.action.action.id.to_string());
    record.action_status = Some(success.action.action.status.to_string());
    let status = success_status(success.outcome);

    // Logic Apps' asynchronous pattern: 202 plus where to poll.
    let poll_at = if invocation.prefers_async() && !success.terminal() {
        status_url(invocation, success.action.action.id.as_str())
    } else {
        None
    };
    let status = if poll_at.is_some() {
        StatusCode::ACCEPTED
    } else {
        status
    };
    let mut body = SuccessBody::new(state, request, device, &success, &expiry, &invocation.id);
    // The body's status is the answer's, 202 included.
    body.status = status.as_u16();
    let mut reply = Reply::new(
        status,
        format,
        &body,
        || render_text(request, device, &success, body.warning.as_deref()),
        body.message.clone(),
    );
    if let Some(location) = poll_at {
        reply = reply
            .with_header("Location", location)
            .with_header("Retry-After", POLL_AFTER_SECONDS.to_string())
            .with_header("Preference-Applied", "respond-async".to_owned());
    }
    Ok((reply, success))
}

/// What the caller wants done to each device, for the domain service (a dry
/// run plans the same intent).
pub(super) fn intent(request: &RunbookRequest) -> Intent {
    Intent {
        action: if request.release {
            ActionType::UnrestrictCodeExecution
        } else {
            ActionType::RestrictCodeExecution
        },
        force: request.force,
        cancel_pending: request.cancel_pending,
        comment: request.comment.clone(),
        caller: request.caller.clone(),
        release_at: request.release_at,
        job_id: None,
    }
}

/// A device's action, and what became of its expiry.
type Acted = (Success, ExpiryNote);

/// Act on one device, and keep the record of what it did (the expiry of a
/// restriction this service creates).
async fn act(
    state: &AppState,
    request: &RunbookRequest,
    device: &DeviceRef,
    deadline: Instant,
) -> Result<Acted, ApiError> {
    let restrictor = state.restrictor();
    // The deadline bounds every wait inside; this outer bound is a backstop.
    let backstop = deadline + Duration::from_secs(1);
    let intent = intent(request);
    let success = tokio::time::timeout_at(backstop, restrictor.run(device, &intent, deadline))
        .await
        .map_err(|_| {
            ApiError::Timeout(format!(
                "the invocation did not finish within {} s (REQUEST_TIMEOUT_SECONDS). A machine \
                 action may or may not have been created: check the device's action history \
                 before retrying.",
                state.request_timeout().as_secs()
            ))
        })??;
    let expiry = match state.reconciler() {
        None => ExpiryNote::Untouched,
        Some(reconciler) => match reconciler
            .restrictions()
            .after(&success, request.release_after, request.release_at)
            .await
        {
            Ok(note) => note,
            Err(e) => {
                tracing::warn!(error = %e, machine_id = %success.machine.id, "the restriction record could not be written");
                match request.release_after {
                    Some(_) => ExpiryNote::Failed(e.to_string()),
                    None => ExpiryNote::Untouched,
                }
            }
        },
    };
    Ok((success, expiry))
}

/// Why `wait` stopped before the action finished and before the time asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CutShort {
    /// The invocation's time budget ran out first.
    Time,
    /// Polling failed (its problem code, such as `rate_limited` when the rate
    /// budget had no free slot for the read).
    Poll(&'static str),
}

/// `wait`: poll the action until it is finished, within the time asked for
/// and the invocation's budget. A failed poll leaves the answer as it was:
/// the action exists either way.
async fn wait_for(
    state: &AppState,
    request: &RunbookRequest,
    success: &mut Success,
    deadline: Instant,
) -> Option<CutShort> {
    let wait = request.wait?;
    let wanted = Instant::now().checked_add(wait);
    let limit = deadline.checked_sub(ANSWER_MARGIN).unwrap_or(deadline);
    let until = wanted.unwrap_or(deadline).min(limit);
    if let Err(e) = state.restrictor().wait(success, until).await {
        let e = ApiError::from(e);
        tracing::warn!(error = %e, "polling the action failed; answering with its last known state");
        return (!success.terminal()).then_some(CutShort::Poll(e.code()));
    }
    (!success.terminal() && wanted.is_none_or(|wanted| wanted > limit)).then_some(CutShort::Time)
}

/// The bulk answer's `warning` when `wait` was cut short for some actions.
fn cut_short_warning(
    cuts: &[CutShort],
    devices: usize,
    request_timeout: Duration,
) -> Option<String> {
    if cuts.is_empty() {
        return None;
    }
    let mut reasons = Vec::new();
    if cuts.contains(&CutShort::Time) {
        reasons.push(format!(
            "acting on {devices} device(s) used most of this invocation's time \
             (REQUEST_TIMEOUT_SECONDS, {} s)",
            request_timeout.as_secs()
        ));
    }
    let mut codes: Vec<&str> = cuts
        .iter()
        .filter_map(|c| match c {
            CutShort::Poll(code) => Some(*code),
            CutShort::Time => None,
        })
        .collect();
    codes.sort_unstable();
    codes.dedup();
    if !codes.is_empty() {
        reasons.push(format!(
            "polling Defender failed ({}; rate_limited means the rate budget had no free slot)",
            codes.join(", ")
        ));
    }
    Some(format!(
        "wait was cut short for {} action(s), which are not finished yet: {}. Poll them with the \
         action-status function.",
        cuts.len(),
        reasons.join("; ")
    ))
}

async fn bulk(
    state: &AppState,
    invocation: &Invocation,
    request: &RunbookRequest,
    devices: &[DeviceRef],
    deadline: Instant,
    record: &mut Record,
    callback_url: Option<&CallbackUrl>,
) -> Reply {
    let format = invocation.format();
    // Act on every device first (eight at a time), then wait for all of
    // them together: waiting inside each slot would hold back the devices
    // still queued behind it.
    let mut acted: Vec<(usize, DeviceRef, Instant, Result<Acted, ApiError>)> =
        stream::iter(devices.iter().cloned().enumerate())
            .map(|(index, device)| async move {
                let device_started = Instant::now();
                let result = act(state, request, &device, deadline).await;
                (index, device, device_started, result)
            })
            .buffer_unordered(BULK_CONCURRENCY)
            .collect()
            .await;
    let cuts: Vec<CutShort> =
        futures_util::future::join_all(acted.iter_mut().filter_map(|(_, _, _, result)| {
            result
                .as_mut()
                .ok()
                .map(|(success, _)| wait_for(state, request, success, deadline))
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
    let warning = cut_short_warning(&cuts, devices.len(), state.request_timeout());
    if let Some(url) = callback_url {
        let mut watched: Vec<(usize, Watched)> = acted
            .iter()
            .map(|(index, device, _, result)| {
                (
                    *index,
                    callback::watched(device, result.as_ref().map(|(success, _)| success)),
                )
            })
            .collect();
        watched.sort_by_key(|(index, _)| *index);
        let subject = Subject::Devices {
            release: request.release,
            devices: watched.into_iter().map(|(_, w)| w).collect(),
        };
        if let Some(warning) = callback::record(state, invocation, url, subject).await {
            tracing::warn!(%warning, "no callback for this request");
        }
    }
    let mut results: Vec<(usize, DeviceResult)> = acted
        .into_iter()
        .map(|(index, device, device_started, result)| {
            log_device(&device, &result, device_started);
            let item = match result {
                Ok((success, expiry)) => DeviceResult::Ok(Box::new(SuccessBody::new(
                    state,
                    request,
                    &device,
                    &success,
                    &expiry,
                    &invocation.id,
                ))),
                Err(error) => DeviceResult::Failed {
                    device_id: device.to_string(),
                    status: error.status().as_u16(),
                    problem: Box::new(error.problem(&invocation.id)),
                },
            };
            (index, item)
        })
        .collect();
    results.sort_by_key(|(index, _)| *index);
    let results: Vec<DeviceResult> = results.into_iter().map(|(_, r)| r).collect();

    let failed = results
        .iter()
        .filter(|r| matches!(r, DeviceResult::Failed { .. }))
        .count();
    let status = if failed == 0 {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    let summary = format!(
        "{} {} device(s): {} succeeded, {failed} failed.",
        if request.release {
            "Released"
        } else {
            "Restricted"
        },
        results.len(),
        results.len() - failed
    );
    record.outcome = Some(if failed == 0 { "done" } else { "partly_failed" });
    record.devices = Some(results.len());
    record.failed = Some(failed);
    let body = BulkBody {
        release: request.release,
        succeeded: results.len() - failed,
        failed,
        results: &results,
        warning: warning.as_deref(),
        invocation_id: &invocation.id,
    };
    Reply::new(
        status,
        format,
        &body,
        || {
            let mut text = render_bulk_text(request, &results, &summary);
            if let Some(warning) = &warning {
                text.push_str(&format!("Warning: {warning}\n"));
            }
            text
        },
        summary.clone(),
    )
}

fn success_status(outcome: Outcome) -> StatusCode {
    match outcome {
        Outcome::Requested => StatusCode::CREATED,
        Outcome::AlreadyPending | Outcome::AlreadyInState => StatusCode::OK,
    }
}

/// The JSON answer for one device.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SuccessBody {
    outcome: Outcome,
    status: u16,
    message: String,
    device_id: String,
    release: bool,
    machine: MachineSummary,
    candidates: usize,
    /// Whether the action is finished (Succeeded, Failed, TimeOut, Cancelled).
    terminal: bool,
    /// [`crate::defender::ActionRecord::to_json`]: Defender's own JSON when
    /// it answered with this one action.
    action: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cancelled_action_ids: Vec<ActionId>,
    /// When the restriction is released automatically (`releaseAfter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    release_at: Option<String>,
    /// A hazard the caller should know about (see [`warning`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
    invocation_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MachineSummary {
    id: MachineId,
    computer_dns_name: Option<String>,
    aad_device_id: Option<String>,
    health_status: Option<String>,
    last_seen: Option<Timestamp>,
}

/// What the caller should know beyond the outcome: with `force`, that a
/// repeated action can stay pending and finish after a later opposite one;
/// for an `already_pending` action pending longer than `stale_after`, that
/// it may be stuck and how to cancel it.
fn warning(success: &Success, force: bool, stale_after: Duration) -> Option<String> {
    if success.outcome == Outcome::Requested && force {
        return Some(
            "\"force\" sent a repeated action: on a device already in this state, Defender has \
             been seen to keep such an action Pending and finish it after a later opposite \
             action, leaving the device in the wrong state (microsoft-365-docs#5903). Follow it \
             with the status route, and cancel it if it is still pending before you send the \
             opposite request."
                .to_owned(),
        );
    }
    let created = success.pending_since()?;
    let age = OffsetDateTime::now_utc() - created;
    let stale = time::Duration::try_from(stale_after).unwrap_or(time::Duration::MAX);
    (age > stale).then(|| {
        let id = &success.action.action.id;
        format!(
            "Action {id} has been {} since {} (more than {} h): it may be stuck \
             (microsoft-365-docs#5903). Cancel it with POST \
             /api/restrict-code-execution/actions/{id}/cancel, then send this request again.",
            success.action.action.status,
            created
                .format(&Rfc3339)
                .unwrap_or_else(|_| created.to_string()),
            stale_after.as_secs() / 3600,
        )
    })
}

impl SuccessBody {
    fn new(
        state: &AppState,
        request: &RunbookRequest,
        device: &DeviceRef,
        success: &Success,
        expiry: &ExpiryNote,
        invocation_id: &str,
    ) -> Self {
        let machine = &success.machine;
        let in_memory = state
            .reconciler()
            .is_some_and(|r| r.restrictions().in_memory());
        let warning = [
            warning(success, request.force, state.stale_pending()),
            expiry.warning(in_memory),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<String>>();
        Self {
            outcome: success.outcome,
            status: success_status(success.outcome).as_u16(),
            message: message(request, success),
            device_id: device.to_string(),
            release: request.release,
            machine: MachineSummary {
                id: machine.id.clone(),
                computer_dns_name: machine.computer_dns_name.clone(),
                aad_device_id: machine.aad_device_id.clone(),
                health_status: machine.health_status.clone(),
                last_seen: machine.last_seen,
            },
            candidates: success.candidates,
            terminal: success.terminal(),
            action: success.action.to_json(),
            cancelled_action_ids: success.cancelled.clone(),
            release_at: expiry.release_at().map(rfc3339),
            warning: (!warning.is_empty()).then(|| warning.join(" ")),
            invocation_id: invocation_id.to_owned(),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum DeviceResult {
    Ok(Box<SuccessBody>),
    #[serde(rename_all = "camelCase")]
    Failed {
        device_id: String,
        status: u16,
        problem: Box<Problem>,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BulkBody<'a> {
    release: bool,
    succeeded: usize,
    failed: usize,
    results: &'a [DeviceResult],
    /// Set when the invocation's time budget ended `wait` early.
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'a str>,
    invocation_id: &'a str,
}

fn what(request: &RunbookRequest) -> &'static str {
    if request.release {
        "Removal of the app execution restriction"
    } else {
        "App execution restriction"
    }
}

fn message(request: &RunbookRequest, success: &Success) -> String {
    let machine = &success.machine;
    // Defender's free text, on the message's one line and in its order.
    let name = crate::service::shown_text::one_line(
        machine.computer_dns_name.as_deref().unwrap_or("(unnamed)"),
    );
    let what = what(request);
    let mut message = match success.outcome {
        Outcome::Requested => format!(
            "{what} requested for device {name} (machine {}); Defender action {} is {}.",
            machine.id, success.action.action.id, success.action.action.status
        ),
        Outcome::AlreadyPending => format!(
            "{what} was already requested for device {name} (machine {}); Defender action {} \
             is {}, so no new action was created.",
            machine.id, success.action.action.id, success.action.action.status
        ),
        Outcome::AlreadyInState => format!(
            "Device {name} (machine {}) is already {}: Defender action {} {}. Nothing was sent; \
             send \"force\": true to act anyway.",
            machine.id,
            if request.release {
                "without the app execution restriction"
            } else {
                "restricted to Microsoft-signed apps"
            },
            success.action.action.id,
            success.action.action.status
        ),
    };
    if !success.cancelled.is_empty() {
        message.push_str(&format!(
            " Cancelled the pending opposite action(s) {} first.",
            success
                .cancelled
                .iter()
                .map(ActionId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    message
}

/// The runbook's first line: what is being done to which device.
fn headline(request: &RunbookRequest, device: &DeviceRef) -> String {
    let verb = if request.release {
        "Releasing"
    } else {
        "Restricting"
    };
    let kind = match device {
        DeviceRef::AadDevice(_) => "DeviceId",
        DeviceRef::Machine(_) => "MachineId",
    };
    format!("{verb} code execution on device ({kind} {device})")
}

/// Runbook-console lines, as RealmJoin's runbook printed them.
fn render_text(
    request: &RunbookRequest,
    device: &DeviceRef,
    success: &Success,
    warning: Option<&str>,
) -> String {
    let machine = &success.machine;
    // Defender's free text, on the message's one line and in its order.
    let name = crate::service::shown_text::one_line(
        machine.computer_dns_name.as_deref().unwrap_or("(unnamed)"),
    );
    let verb = if request.release {
        "Releasing"
    } else {
        "Restricting"
    };
    let mut lines = vec![
        format!("{verb} code execution on device {name} (DeviceId {device})"),
        format!(
            "Defender machine {} ({} matching record{})",
            machine.id,
            success.candidates,
            if success.candidates == 1 { "" } else { "s" }
        ),
    ];
    for id in &success.cancelled {
        lines.push(format!("Cancelled pending opposite action {id}"));
    }
    lines.push(match success.outcome {
        Outcome::Requested => format!(
            "Successfully requested: action {} is {}.",
            success.action.action.id, success.action.action.status
        ),
        Outcome::AlreadyPending => format!(
            "Already requested: action {} is {}; nothing new was sent.",
            success.action.action.id, success.action.action.status
        ),
        Outcome::AlreadyInState => format!(
            "Already done: action {} {}; nothing was sent (use force to act anyway).",
            success.action.action.id, success.action.action.status
        ),
    });
    if let Some(warning) = warning {
        lines.push(format!("Warning: {warning}"));
    }
    lines.join("\n") + "\n"
}

fn render_bulk_text(request: &RunbookRequest, results: &[DeviceResult], summary: &str) -> String {
    let verb = if request.release {
        "Releasing"
    } else {
        "Restricting"
    };
    let mut out = String::new();
    for result in results {
        match result {
            DeviceResult::Ok(body) => {
                out.push_str(&format!(
                    "{verb} code execution on device {}: {}\n",
                    body.device_id, body.message
                ));
                if let Some(warning) = &body.warning {
                    out.push_str(&format!("  Warning: {warning}\n"));
                }
            }
            DeviceResult::Failed {
                device_id, problem, ..
            } => {
                out.push_str(&format!(
                    "{verb} code execution on device {device_id}: Error ({}, HTTP {}): {}\n",
                    problem.code, problem.status, problem.detail
                ));
            }
        }
    }
    out.push_str(summary);
    out.push('\n');
    out
}

/// A bulk invocation's line per device; the invocation's own line (see
/// [`super::answer`]) has the totals and the caller.
fn log_device(device: &DeviceRef, result: &Result<Acted, ApiError>, started: Instant) {
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok((success, _)) => tracing::info!(
            device_id = %device,
            machine_id = %success.machine.id,
            outcome = success.outcome.as_str(),
            action_id = %success.action.action.id,
            action_status = %success.action.action.status,
            status = success_status(success.outcome).as_u16(),
            duration_ms,
            "device done"
        ),
        Err(error) => tracing::warn!(
            device_id = %device,
            outcome = error.code(),
            status = error.status().as_u16(),
            duration_ms,
            error = %error,
            "device not done"
        ),
    }
}
