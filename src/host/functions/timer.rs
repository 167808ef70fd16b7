//! `reconcile`: the timer-triggered function, in payload mode.
//!
//! The host POSTs `/reconcile` with `{"Data":{"timer":{"Schedule":{...},
//! "ScheduleStatus":{...}|null,"IsPastDue":false}},"Metadata":{"sys":{...}}}`
//! (the timer's `TimerInfo` arrives as a JSON object, not as an encoded
//! string, and the metadata holds only `sys`). The run ignores all of it:
//! it is level-triggered and reads what it needs. A 200 with a JSON object
//! completes the run; the host never retries a failed timer run, so a run
//! answers 200 even when some of its work failed (the next run tries again)
//! and the one log line says what happened. The host keeps a timer on one
//! instance at a time (a blob lease), but the run does not rely on it: two
//! runs at once release an expiry once (see `service::reconcile`).

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode},
    response::Response,
};
use serde_json::Value;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    host::{
        app_state::AppState, error::ApiError, functions::job_queue::payload_answer, invocation,
        routes::read_limited,
    },
    service::reconcile,
};

/// The function's name: its folder and payload-mode path.
pub const NAME: &str = "reconcile";
/// The timer trigger's binding name in `reconcile/function.json`.
pub const TRIGGER_BINDING: &str = "timer";
/// The app setting the schedule comes from.
pub const SCHEDULE_SETTING: &str = "RECONCILE_SCHEDULE";
/// A timer envelope is small.
const MAX_ENVELOPE: usize = 64 * 1024;

/// What the envelope says about this run, for the log line only.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TimerRun {
    pub is_past_due: bool,
}

/// Read the timer's `Data` from the host's envelope.
pub fn parse(envelope: &[u8]) -> Result<TimerRun, String> {
    let value: Value =
        serde_json::from_slice(envelope).map_err(|e| format!("the envelope is not JSON: {e}"))?;
    let info = value
        .get("Data")
        .and_then(|d| d.get(TRIGGER_BINDING))
        .ok_or("the envelope has no Data.timer")?;
    // An object as the host sends it; a JSON string of one is read too.
    let info = match info {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
        other => other.clone(),
    };
    Ok(TimerRun {
        is_past_due: info
            .get("IsPastDue")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// One timer invocation: one reconcile run, one log line, 200.
pub async fn invoke(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let id = invocation::invocation_id(&parts.headers);
    let span = tracing::info_span!("invocation", invocation_id = %id, function = NAME);
    async move {
        let read = read_limited(&parts, body, MAX_ENVELOPE, ApiError::InvalidEnvelope)
            .await
            .map_err(|e| e.to_string())
            .and_then(|bytes| parse(&bytes));
        let run = match read {
            Ok(run) => run,
            Err(reason) => {
                tracing::warn!(reason = %reason, "the timer invocation could not be read");
                return payload_answer(StatusCode::BAD_REQUEST, &id, format!("{NAME}: {reason}"));
            }
        };
        let Some(reconciler) = state.reconciler() else {
            return payload_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &id,
                format!("{NAME}: the reconciler is not configured in this process"),
            );
        };
        let report = reconciler.run(time::OffsetDateTime::now_utc()).await;
        let local = reconciler.restrictions().in_memory();
        reconcile::log(&report, started.elapsed(), local);
        let line = format!(
            "{NAME}: due {}, released {}, already released {}, ended {}, waiting {}, deferred {}, \
             failed {}, tags +{} -{}, callbacks delivered {}, {} Defender call(s){}",
            report.due,
            report.released,
            report.already_released,
            report.ended,
            report.waiting,
            report.deferred,
            report.failed,
            report.tags_added,
            report.tags_removed,
            report.callbacks.as_ref().map_or(0, |c| c.delivered),
            report.calls.total(),
            if run.is_past_due { " (past due)" } else { "" },
        );
        let mut response = payload_answer(StatusCode::OK, &id, line);
        if let Ok(value) = serde_json::to_string(&report)
            .ok()
            .map(HeaderValue::try_from)
            .transpose()
            && let Some(value) = value
        {
            response.headers_mut().insert("x-reconcile-report", value);
        }
        response
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_timer_info_is_an_object_and_is_past_due_is_read() {
        let envelope = json!({
            "Data": {"timer": {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": null,
                               "IsPastDue": true}},
            "Metadata": {"sys": {"MethodName": "reconcile"}}
        });
        assert_eq!(
            parse(envelope.to_string().as_bytes()).unwrap(),
            TimerRun { is_past_due: true }
        );
        assert!(parse(b"{\"Data\":{}}").is_err());
        assert!(parse(b"nope").is_err());
    }

    #[test]
    fn the_function_json_is_a_timer_on_the_schedule_setting() {
        let path = format!("{}/{NAME}/function.json", env!("CARGO_MANIFEST_DIR"));
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let trigger = &json["bindings"][0];
        assert_eq!(trigger["type"], "timerTrigger");
        assert_eq!(trigger["name"], TRIGGER_BINDING);
        assert_eq!(trigger["schedule"], format!("%{SCHEDULE_SETTING}%"));
        assert_eq!(json["bindings"].as_array().unwrap().len(), 1);
    }
}
