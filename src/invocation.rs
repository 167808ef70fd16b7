//! One invocation, independent of how the host delivered it.
//!
//! Forwarded mode and payload mode both come here with the raw payload bytes
//! and the invocation id, and both get the same [`Reply`]: same status, same
//! headers, same body. Only the wrapping differs (see `routes` and `envelope`).

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, info_span};

use crate::{
    error::ApiError,
    restrict::{Outcome, Restrictor, Success},
    runbook::RunbookRequest,
};

/// The header the host puts on every call to the handler.
pub const INVOCATION_ID_HEADER: &str = "x-azure-functions-invocationid";

/// Shared by every invocation of the process.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    restrictor: Restrictor,
    /// Bound on one invocation, below the host's functionTimeout.
    request_timeout: Duration,
}

impl AppState {
    pub fn new(restrictor: Restrictor, request_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                restrictor,
                request_timeout,
            }),
        }
    }
}

/// The answer to the caller, before it is wrapped for the host.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub retry_after: Option<u64>,
    /// JSON text.
    pub body: String,
    /// One human line for the host's invocation log (payload mode `Logs`).
    pub summary: String,
}

impl Reply {
    /// Response headers, as the caller must receive them.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![("Content-Type", self.content_type.to_owned())];
        if let Some(seconds) = self.retry_after {
            headers.push(("Retry-After", seconds.to_string()));
        }
        headers
    }

    pub fn error(error: &ApiError, invocation_id: &str) -> Self {
        let problem = error.problem(invocation_id);
        let body = serde_json::to_string(&problem)
            .unwrap_or_else(|_| format!(r#"{{"code":"{}"}}"#, problem.code));
        Self {
            status: error.status(),
            content_type: "application/problem+json",
            retry_after: error.retry_after(),
            summary: format!("{} ({}): {}", problem.title, problem.code, problem.detail),
            body,
        }
    }
}

/// The invocation id from the host, or a fresh one for direct calls.
pub fn invocation_id(headers: &HeaderMap) -> String {
    headers
        .get(INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        // It goes into logs and bodies: only a sane token is taken as is.
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 100
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Run one invocation from its raw payload.
pub async fn invoke(state: &AppState, invocation_id: &str, payload: &[u8]) -> Reply {
    let span = info_span!("invocation", invocation_id = %invocation_id);
    run(state, invocation_id, payload).instrument(span).await
}

async fn run(state: &AppState, invocation_id: &str, payload: &[u8]) -> Reply {
    let started = Instant::now();
    let request = match RunbookRequest::parse(payload) {
        Ok(request) => request,
        Err(e) => {
            let error = ApiError::from(e);
            let reply = Reply::error(&error, invocation_id);
            log_invocation(None, &Err(&error), started, reply.status);
            return reply;
        }
    };

    let timeout = state.inner.request_timeout;
    let deadline = started + timeout;
    // The deadline bounds every wait inside; this outer bound is a backstop.
    let backstop = timeout + std::time::Duration::from_secs(1);
    let result = match tokio::time::timeout(
        backstop,
        state.inner.restrictor.run(&request, deadline),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout(format!(
            "the invocation did not finish within {} s (REQUEST_TIMEOUT_SECONDS). A machine \
             action may or may not have been created: check the device's action history in \
             Defender before retrying.",
            timeout.as_secs()
        ))),
    };
    let reply = match &result {
        Ok(success) => success_reply(&request, success, invocation_id),
        Err(error) => Reply::error(error, invocation_id),
    };
    log_invocation(Some(&request), &result.as_ref(), started, reply.status);
    reply
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SuccessBody<'a> {
    outcome: Outcome,
    message: &'a str,
    device_id: String,
    release: bool,
    machine: MachineSummary<'a>,
    candidates: usize,
    action: &'a Value,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    cancelled_action_ids: &'a [String],
    invocation_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MachineSummary<'a> {
    id: &'a str,
    computer_dns_name: Option<&'a str>,
    aad_device_id: Option<&'a str>,
    health_status: Option<&'a str>,
    last_seen: Option<&'a str>,
}

fn success_reply(request: &RunbookRequest, success: &Success, invocation_id: &str) -> Reply {
    let machine = &success.machine;
    let name = machine.computer_dns_name.as_deref().unwrap_or("(unnamed)");
    let what = if request.release {
        "Removal of the app execution restriction"
    } else {
        "App execution restriction"
    };
    let mut message = match success.outcome {
        Outcome::Requested => format!(
            "{what} requested for device {name} (machine {}); Defender action {} is {}.",
            machine.id, success.action_id, success.action_status
        ),
        Outcome::AlreadyPending => format!(
            "{what} was already requested for device {name} (machine {}); Defender action {} \
             is {}, so no new action was created.",
            machine.id, success.action_id, success.action_status
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
            success.action_id,
            success.action_status
        ),
    };
    if !success.cancelled.is_empty() {
        message.push_str(&format!(
            " Cancelled the pending opposite action(s) {} first.",
            success.cancelled.join(", ")
        ));
    }
    let body = SuccessBody {
        outcome: success.outcome,
        message: &message,
        device_id: request.device.to_string(),
        release: request.release,
        machine: MachineSummary {
            id: &machine.id,
            computer_dns_name: machine.computer_dns_name.as_deref(),
            aad_device_id: machine.aad_device_id.as_deref(),
            health_status: machine.health_status.as_deref(),
            last_seen: machine.last_seen.as_deref(),
        },
        candidates: success.candidates,
        action: &success.action,
        cancelled_action_ids: &success.cancelled,
        invocation_id,
    };
    let status = match success.outcome {
        Outcome::Requested => StatusCode::CREATED,
        Outcome::AlreadyPending | Outcome::AlreadyInState => StatusCode::OK,
    };
    Reply {
        status,
        content_type: "application/json",
        retry_after: None,
        body: serde_json::to_string(&body).unwrap_or_default(),
        summary: message,
    }
}

/// The one structured line per invocation. Never a token: nothing here can hold one.
fn log_invocation(
    request: Option<&RunbookRequest>,
    result: &Result<&Success, &ApiError>,
    started: Instant,
    status: StatusCode,
) {
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let device_id = request.map(|r| r.device.to_string());
    let release = request.map(|r| r.release);
    let caller_name = request.and_then(|r| r.caller.as_ref()).map(|c| c.as_str());
    match result {
        Ok(success) => tracing::info!(
            device_id,
            machine_id = %success.machine.id,
            release,
            outcome = ?success.outcome,
            action_id = %success.action_id,
            caller_name,
            status = status.as_u16(),
            duration_ms,
            "invocation succeeded"
        ),
        Err(error) => {
            let code = error.code();
            let detail = error.to_string();
            if status.is_server_error() {
                tracing::error!(device_id, release, outcome = code, caller_name, status = status.as_u16(), duration_ms, error = %detail, "invocation failed");
            } else {
                tracing::warn!(device_id, release, outcome = code, caller_name, status = status.as_u16(), duration_ms, error = %detail, "invocation rejected");
            }
        }
    }
}
