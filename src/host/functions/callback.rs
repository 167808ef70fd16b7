//! `callbackUrl` at the edge: checked before anything is sent to Defender
//! (a disallowed URL is a 400 naming the field), recorded once the request
//! knows its actions. Delivery is the reconciler's
//! ([`crate::service::callbacks::Outbox::deliver_due`]).

use crate::{
    host::{app_state::AppState, error::ApiError, invocation::Invocation},
    service::{
        callbacks::{CallbackUrl, Subject, Watched},
        restrict::{Outcome, Success},
        runbook::{DeviceRef, RunbookError, fields},
    },
};

/// Check `raw` against the callback settings. The reason never repeats the
/// URL: it carries the caller's secret.
pub fn check(state: &AppState, raw: Option<&str>) -> Result<Option<CallbackUrl>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    state.callbacks().check(raw).map(Some).map_err(|reason| {
        ApiError::InvalidRequest(RunbookError::Invalid {
            field: fields::CALLBACK_URL,
            reason,
        })
    })
}

/// `scheme://host[:port]` the caller reached the app on: a callback's
/// `statusUrl` is built on it, without the caller's function key.
pub fn origin(invocation: &Invocation) -> Option<String> {
    let url = invocation.url.as_ref()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

/// What a callback watches for one device of the request.
pub fn watched(device: &DeviceRef, result: Result<&Success, &ApiError>) -> Watched {
    match result {
        Ok(success) => {
            let action = &success.action.action;
            let done = success.terminal();
            Watched {
                device_id: device.to_string(),
                machine_id: Some(success.machine.id.clone()),
                computer_dns_name: success.machine.computer_dns_name.clone(),
                action_id: Some(action.id.clone()),
                // `already_in_state` and a finished `wait`: final already,
                // sent at the next run without reading Defender again.
                status: done.then(|| action.status.to_string()),
                finished_at: done.then_some(action.last_update_date_time_utc).flatten(),
                problem: None,
            }
        }
        Err(error) => Watched {
            device_id: device.to_string(),
            problem: Some(serde_json::json!({
                "code": error.code(),
                "detail": error.to_string(),
            })),
            ..Watched::default()
        },
    }
}

/// Record the pending callback. A failure does not undo the actions
/// already created: the answer's warning says no callback will come.
pub async fn record(
    state: &AppState,
    invocation: &Invocation,
    url: &CallbackUrl,
    subject: Subject,
) -> Option<String> {
    match state
        .callbacks()
        .add(url, origin(invocation), subject)
        .await
    {
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "recording the callback failed");
            Some(format!(
                "the action was handled, but its callback could not be recorded ({e}): no \
                 callback will be sent; poll the status instead"
            ))
        }
    }
}

/// Whether an outcome's action still has to finish before its callback.
pub fn waits(success: &Success) -> bool {
    success.outcome != Outcome::AlreadyInState && !success.terminal()
}
