//! The containment jobs' HTTP functions:
//! - `start-job`: `POST /api/restrict-code-execution/jobs`, answered 202 with
//!   `Location` (the job's status) and `Retry-After`;
//! - `job-status`: `GET /api/restrict-code-execution/jobs/{jobId}`, 202 while
//!   any device is queued and 200 once every device has its outcome (what a
//!   Logic App's asynchronous polling waits on); `outcome=` filters the
//!   devices, `offset=`/`limit=` page them;
//! - `list-jobs`: `GET /api/restrict-code-execution/jobs`, newest first;
//! - `cancel-job`: `POST /api/restrict-code-execution/jobs/{jobId}/cancel`.

use std::collections::BTreeMap;

use http::StatusCode;
use maud::{DOCTYPE, html};
use serde::Serialize;
use tokio::time::Instant;

use super::{Function, Record};
use crate::{
    host::{
        app_state::AppState,
        error::ApiError,
        invocation::Invocation,
        reply::{self, Reply},
    },
    service::{
        jobs::{
            JobError, JobState, Jobs, ResolveError, SelectorRecord,
            model::OUTCOMES,
            request::{JobRequest, MAX_JOB_DEVICES},
        },
        runbook::RunbookError,
        shown_text,
    },
};

/// What a Logic App is told to wait between polls of a job.
const POLL_AFTER_SECONDS: u64 = 30;
/// Devices in one status answer unless `limit` says otherwise, and at most.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;
/// Jobs in the list unless `limit` says otherwise.
const DEFAULT_LIST: usize = 20;

/// Said in every answer in local mode: the job lives in this process only.
const IN_MEMORY_WARNING: &str = "this job runs in this process's memory (--simulate or \
     COORDINATION=local): it is lost when the process stops and other instances do not see it. \
     The deployed app keeps jobs in its storage account (COORDINATION=storage).";

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotFound(id) => Self::JobNotFound(id),
            JobError::KeyReused(key) => Self::IdempotencyKeyReused(key),
            JobError::Resolve(ResolveError::NoDevicesMatched { selector }) => {
                Self::NoDevicesMatched(selector)
            }
            JobError::Resolve(ResolveError::TooManyDevices { selector, count }) => {
                Self::TooManyDevices {
                    selector,
                    count,
                    max: MAX_JOB_DEVICES,
                }
            }
            JobError::Resolve(ResolveError::Defender(e)) => e.into(),
            JobError::Storage(e) => e.into(),
            e @ JobError::StillStarting => Self::CoordinationUnavailable {
                retry_after: std::time::Duration::from_secs(5),
                reason: e.to_string(),
            },
        }
    }
}

fn jobs(state: &AppState) -> Result<&Jobs, ApiError> {
    state
        .jobs()
        .ok_or_else(|| ApiError::CoordinationUnavailable {
            retry_after: std::time::Duration::from_secs(30),
            reason: "containment jobs are not configured in this process".into(),
        })
}

/// `jobId`: a GUID, checked before it names a record.
fn job_id(invocation: &Invocation) -> Result<String, ApiError> {
    let raw = invocation
        .params
        .get("jobId")
        .map(|s| s.trim())
        .unwrap_or("");
    match uuid::Uuid::try_parse(raw) {
        Ok(id) if raw.len() == 36 => Ok(id.hyphenated().to_string()),
        _ => Err(ApiError::InvalidRequest(RunbookError::Invalid {
            field: "jobId",
            reason: format!(
                "must be a job id (a GUID), got {:?}",
                raw.chars().take(64).collect::<String>()
            ),
        })),
    }
}

fn status_url(invocation: &Invocation, job_id: &str) -> Option<String> {
    invocation.url_for(&Function::JobStatus.route().replace("{jobId}", job_id))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StartedBody<'a> {
    job_id: &'a str,
    status: &'static str,
    devices: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_url: Option<String>,
    /// `releaseAfter` counted from the start: when the job's restrictions
    /// are released.
    #[serde(skip_serializing_if = "Option::is_none")]
    release_at: Option<&'a str>,
    /// The job an earlier request with the same `Idempotency-Key` started.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'static str>,
    invocation_id: &'a str,
}

pub async fn start(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let deadline = Instant::now() + state.request_timeout();
    let mut request = JobRequest::parse(&invocation.body)?;
    request.caller = super::restrict::caller_or_principal(request.caller.take(), invocation);
    record.release = Some(request.release);
    record.caller_name = request.caller.as_ref().map(|c| c.as_str().to_owned());
    let key = idempotency_key(invocation)?;
    // Before anything reaches Defender: a callback that may not go where it
    // points is a 400.
    let callback = super::callback::check(state, request.callback_url.as_deref())?;
    let jobs = jobs(state)?;
    let started = jobs.start(&request, key.as_deref(), deadline).await?;
    let job = &started.job;
    // A replayed start answers the first request's job, whose callback (if
    // it asked for one) is already recorded.
    if let (Some(url), false) = (&callback, started.replayed) {
        let subject = crate::service::callbacks::Subject::job(job.job_id.clone());
        if let Some(warning) = super::callback::record(state, invocation, url, subject).await {
            tracing::warn!(%warning, "no callback for this job");
        }
    }
    record.devices = Some(job.devices);
    record.outcome = Some(if started.replayed {
        "replayed"
    } else {
        "started"
    });
    let url = status_url(invocation, &job.job_id);
    let body = StartedBody {
        job_id: &job.job_id,
        status: "running",
        devices: job.devices,
        status_url: url.clone(),
        release_at: job.release_at.as_deref(),
        replayed: started.replayed,
        warning: jobs.in_memory().then_some(IN_MEMORY_WARNING),
        invocation_id: &invocation.id,
    };
    let summary = format!(
        "Job {} {}: {} {} device(s).",
        job.job_id,
        if started.replayed {
            "was already started with this Idempotency-Key"
        } else {
            "started"
        },
        if job.release { "release" } else { "restrict" },
        job.devices
    );
    let mut reply = Reply::new(
        StatusCode::ACCEPTED,
        invocation.format(),
        &body,
        || {
            format!(
                "{summary}\nFollow it at {}\n",
                url.clone().unwrap_or_default()
            )
        },
        summary.clone(),
    )
    .with_header("Retry-After", POLL_AFTER_SECONDS.to_string());
    if let Some(url) = url {
        reply = reply.with_header("Location", url);
    }
    Ok(reply)
}

/// `Idempotency-Key`: printable ASCII, at most 255 characters.
fn idempotency_key(invocation: &Invocation) -> Result<Option<String>, ApiError> {
    let Some(value) = invocation.header("idempotency-key") else {
        return Ok(None);
    };
    let value = value.trim();
    if value.is_empty() || value.len() > 255 || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ApiError::InvalidRequest(RunbookError::Invalid {
            field: "Idempotency-Key",
            reason: "must be 1 to 255 printable ASCII characters".into(),
        }));
    }
    Ok(Some(value.to_owned()))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusBody<'a> {
    job_id: &'a str,
    status: &'static str,
    release: bool,
    selector: &'a SelectorRecord,
    comment: &'a str,
    caller_name: Option<&'a str>,
    created_at: &'a str,
    finished_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    release_at: Option<&'a str>,
    counts: BTreeMap<&'a str, usize>,
    devices: Vec<DeviceBody<'a>>,
    /// Devices matching `outcome=` (all, without it), before paging.
    matched: usize,
    offset: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
    invocation_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceBody<'a> {
    device_id: &'a str,
    machine_id: Option<&'a str>,
    computer_dns_name: Option<&'a str>,
    outcome: &'a str,
    action_id: Option<&'a str>,
    problem: Option<&'a crate::service::jobs::DeviceProblem>,
}

/// `outcome=`, `offset=`, `limit=`.
struct StatusQuery {
    outcomes: Vec<String>,
    offset: usize,
    limit: usize,
}

impl StatusQuery {
    fn parse(query: &[(String, String)]) -> Result<Self, ApiError> {
        let mut parsed = Self {
            outcomes: Vec::new(),
            offset: 0,
            limit: DEFAULT_PAGE,
        };
        let invalid = |field: &'static str, reason: String| {
            ApiError::InvalidRequest(RunbookError::Invalid { field, reason })
        };
        for (key, value) in query {
            match key.to_ascii_lowercase().as_str() {
                "outcome" => {
                    for outcome in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                        let outcome = outcome.to_ascii_lowercase();
                        if outcome != "queued" && !OUTCOMES.contains(&outcome.as_str()) {
                            return Err(invalid(
                                "outcome",
                                format!(
                                    "must be one of queued, {}, got {outcome:?}",
                                    OUTCOMES.join(", ")
                                ),
                            ));
                        }
                        parsed.outcomes.push(outcome);
                    }
                }
                "offset" => {
                    parsed.offset = value
                        .trim()
                        .parse()
                        .map_err(|_| invalid("offset", "must be a whole number".into()))?;
                }
                "limit" => {
                    parsed.limit = value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|l| (1..=MAX_PAGE).contains(l))
                        .ok_or_else(|| {
                            invalid(
                                "limit",
                                format!("must be a whole number from 1 to {MAX_PAGE}"),
                            )
                        })?;
                }
                // The function key.
                "code" => {}
                other => {
                    return Err(ApiError::InvalidRequest(RunbookError::UnknownField {
                        field: shown_text::echoed_name(other),
                        accepted: "outcome, offset, limit".into(),
                    }));
                }
            }
        }
        Ok(parsed)
    }
}

pub async fn status(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let id = job_id(invocation)?;
    let query = StatusQuery::parse(&invocation.query)?;
    let jobs = jobs(state)?;
    let job = jobs.status(&id).await?;
    record.devices = Some(job.job.devices);
    record.release = Some(job.job.release);
    record.outcome = Some(job.status);
    let mut reply = render_status(invocation, &job, &query, jobs.in_memory(), None);
    if !job.finished() {
        if let Some(url) = status_url(invocation, &id) {
            reply = reply.with_header("Location", url);
        }
        reply = reply.with_header("Retry-After", POLL_AFTER_SECONDS.to_string());
    }
    Ok(reply)
}

fn render_status(
    invocation: &Invocation,
    job: &JobState,
    query: &StatusQuery,
    in_memory: bool,
    note: Option<String>,
) -> Reply {
    let matching: Vec<_> = job
        .devices
        .iter()
        .filter(|d| query.outcomes.is_empty() || query.outcomes.contains(&d.outcome.outcome))
        .collect();
    let page: Vec<DeviceBody<'_>> = matching
        .iter()
        .skip(query.offset)
        .take(query.limit)
        .map(|d| DeviceBody {
            device_id: &d.entry.device_id,
            machine_id: d
                .outcome
                .machine_id
                .as_deref()
                .or(d.entry.machine_id.as_deref()),
            computer_dns_name: d
                .outcome
                .computer_dns_name
                .as_deref()
                .or(d.entry.computer_dns_name.as_deref()),
            outcome: &d.outcome.outcome,
            action_id: d.outcome.action_id.as_deref(),
            problem: d.outcome.problem.as_ref(),
        })
        .collect();
    let mut warnings: Vec<String> = note.into_iter().collect();
    if in_memory {
        warnings.push(IN_MEMORY_WARNING.to_owned());
    }
    if job.repaired {
        warnings.push(
            "the job had shown no progress for a while; its queued devices were sent again"
                .to_owned(),
        );
    }
    let body = StatusBody {
        job_id: &job.job.job_id,
        status: job.status,
        release: job.job.release,
        selector: &job.job.selector,
        comment: &job.job.comment,
        caller_name: job.job.caller_name.as_deref(),
        created_at: &job.job.created_at,
        finished_at: job.finished_at.as_deref(),
        release_at: job.job.release_at.as_deref(),
        counts: job
            .counts
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .chain([("total", job.devices.len())])
            .collect(),
        devices: page,
        matched: matching.len(),
        offset: query.offset,
        warning: (!warnings.is_empty()).then(|| warnings.join(" ")),
        invocation_id: &invocation.id,
    };
    let summary = format!(
        "Job {} is {}: {}.",
        body.job_id,
        body.status,
        counts_line(&body.counts)
    );
    let status = if job.finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let accept = invocation.headers.get("accept").map(|v| v.join(", "));
    if reply::prefers_html(accept.as_deref()) {
        let page = html! {
            (DOCTYPE)
            html { head { meta charset="utf-8"; title { "Job " (body.job_id) } }
            body {
                h1 { "Job " (body.job_id) }
                p { (summary) }
                @if let Some(w) = &body.warning { p { strong { "Warning: " } (w) } }
                table {
                    tr { th { "Device" } th { "Machine" } th { "Name" } th { "Outcome" } th { "Action" } th { "Problem" } }
                    @for d in &body.devices {
                        tr {
                            td { (d.device_id) }
                            td { (d.machine_id.unwrap_or("")) }
                            td { bdi { (d.computer_dns_name.unwrap_or("")) } }
                            td { (d.outcome) }
                            td { (d.action_id.unwrap_or("")) }
                            td dir="auto" { (d.problem.map(|p| format!("{}: {}", p.code, p.detail)).unwrap_or_default()) }
                        }
                    }
                }
            } }
        };
        return Reply {
            status,
            content_type: "text/html; charset=utf-8",
            extra_headers: Vec::new(),
            body: page.into_string(),
            summary,
        }
        .with_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'".to_owned(),
        );
    }
    Reply::new(
        status,
        invocation.format(),
        &body,
        || {
            let mut text = format!("{summary}\n");
            for d in &body.devices {
                text.push_str(&format!(
                    "{} {} {}{}\n",
                    shown_text::one_line(d.device_id),
                    shown_text::one_line(d.computer_dns_name.unwrap_or("-")),
                    d.outcome,
                    d.problem
                        .map(|p| format!(" ({}: {})", p.code, shown_text::one_line(&p.detail)))
                        .or_else(|| d.action_id.map(|a| format!(" (action {a})")))
                        .unwrap_or_default()
                ));
            }
            if let Some(w) = &body.warning {
                text.push_str(&format!("Warning: {w}\n"));
            }
            text
        },
        summary.clone(),
    )
}

fn counts_line(counts: &BTreeMap<&str, usize>) -> String {
    counts
        .iter()
        .filter(|(k, v)| **v > 0 || **k == "total")
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    jobs: Vec<ListedJob<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'static str>,
    invocation_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListedJob<'a> {
    #[serde(flatten)]
    entry: &'a crate::service::jobs::IndexEntry,
    status_url: Option<String>,
}

pub async fn list(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let mut limit = DEFAULT_LIST;
    for (key, value) in &invocation.query {
        match key.to_ascii_lowercase().as_str() {
            "limit" => {
                limit = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| {
                        ApiError::InvalidRequest(RunbookError::Invalid {
                            field: "limit",
                            reason: "must be a whole number from 1 to 1000".into(),
                        })
                    })?;
            }
            "code" => {}
            other => {
                return Err(ApiError::InvalidRequest(RunbookError::UnknownField {
                    field: shown_text::echoed_name(other),
                    accepted: "limit".into(),
                }));
            }
        }
    }
    let jobs = jobs(state)?;
    let entries = jobs.list(limit).await?;
    record.devices = Some(entries.len());
    record.outcome = Some("listed");
    let body = ListBody {
        jobs: entries
            .iter()
            .map(|entry| ListedJob {
                entry,
                status_url: status_url(invocation, &entry.job_id),
            })
            .collect(),
        warning: jobs.in_memory().then_some(IN_MEMORY_WARNING),
        invocation_id: &invocation.id,
    };
    let summary = format!("{} recent job(s).", entries.len());
    Ok(Reply::new(
        StatusCode::OK,
        invocation.format(),
        &body,
        || {
            let mut text = format!("{summary}\n");
            for e in &entries {
                text.push_str(&format!(
                    "{} {} {} {} device(s), {}\n",
                    e.created_at,
                    e.job_id,
                    if e.release { "release" } else { "restrict" },
                    e.devices,
                    e.caller_name.as_deref().unwrap_or("-")
                ));
            }
            text
        },
        summary.clone(),
    ))
}

pub async fn cancel(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let id = job_id(invocation)?;
    let jobs = jobs(state)?;
    let cancelled = jobs.cancel(&id).await?;
    record.outcome = Some("cancelled");
    record.devices = Some(cancelled.state.job.devices);
    let note = format!(
        "Cancelled: {} device(s) not sent are skipped; {} action(s) already created stand (cancel \
         or release them separately if needed). A device being acted on at this moment may still \
         get its action.",
        cancelled.skipped, cancelled.actions_created
    );
    let query = StatusQuery {
        outcomes: Vec::new(),
        offset: 0,
        limit: DEFAULT_PAGE,
    };
    Ok(render_status(
        invocation,
        &cancelled.state,
        &query,
        jobs.in_memory(),
        Some(note),
    ))
}
