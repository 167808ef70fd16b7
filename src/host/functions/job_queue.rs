//! The containment jobs' queue-triggered functions, in payload mode:
//! `job-worker` (`restrict-jobs`) and `job-poison` (`restrict-jobs-poison`).
//!
//! The host POSTs `/{FunctionName}` with `{"Data":{"message":"<JSON string
//! of the message text>"},"Metadata":{"DequeueCount":"1","Id":"\"…\"",…}}`:
//! the message (already base64-decoded by the host) arrives as a string
//! encoded as JSON once more, and metadata strings and numbers arrive
//! encoded as strings. A 200 with a JSON object completes the message (the
//! host deletes it); any other status fails the invocation, and the host
//! makes the message visible again (after `visibilityTimeout`) or, on its
//! last delivery, moves it to the poison queue. See docs/jobs.md.

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::request::Parts,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::Instrument;

use crate::host::{app_state::AppState, invocation};

/// The queue trigger's binding name in each folder's `function.json`.
pub const TRIGGER_BINDING: &str = "message";
/// The largest envelope read: a message is at most 64 KiB, and metadata
/// repeats its top-level fields.
pub const MAX_ENVELOPE: usize = 512 * 1024;

/// The queue-triggered functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFunction {
    /// `job-worker`: runs a message's devices.
    Worker,
    /// `job-poison`: records the devices of a message that kept failing.
    Poison,
}

impl QueueFunction {
    pub const ALL: [Self; 2] = [Self::Worker, Self::Poison];

    pub fn name(self) -> &'static str {
        match self {
            Self::Worker => "job-worker",
            Self::Poison => "job-poison",
        }
    }

    /// The queue its trigger reads.
    pub fn queue(self) -> &'static str {
        match self {
            Self::Worker => crate::service::jobs::QUEUE_NAME,
            Self::Poison => crate::service::jobs::POISON_QUEUE_NAME,
        }
    }
}

/// A delivery as the envelope gives it.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueDelivery {
    pub text: String,
    pub dequeue_count: u32,
    pub message_id: Option<String>,
}

/// Read the trigger's message and metadata from the host's envelope.
pub fn parse(envelope: &[u8]) -> Result<QueueDelivery, String> {
    let value: Value =
        serde_json::from_slice(envelope).map_err(|e| format!("the envelope is not JSON: {e}"))?;
    let data = value
        .get("Data")
        .and_then(|d| d.get(TRIGGER_BINDING))
        .ok_or("the envelope has no Data.message")?;
    let text = match data {
        // A string-typed trigger: the text, encoded as a JSON string once more.
        Value::String(encoded) => match serde_json::from_str::<String>(encoded) {
            Ok(text) => text,
            Err(_) => encoded.clone(),
        },
        // The host turns a JSON-object value into an object (not for
        // strings, but kept readable either way).
        other => other.to_string(),
    };
    let metadata = value.get("Metadata");
    let string = |key: &str| -> Option<String> {
        match metadata?.get(key)? {
            Value::String(s) => {
                Some(serde_json::from_str::<String>(s).unwrap_or_else(|_| s.clone()))
            }
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let dequeue_count = string("DequeueCount")
        .and_then(|c| c.trim().parse::<u32>().ok())
        .unwrap_or(1);
    Ok(QueueDelivery {
        text,
        dequeue_count,
        message_id: string("Id"),
    })
}

/// One invocation: 200 completes the message, 500 fails it. The routes
/// read the envelope (at most [`MAX_ENVELOPE`] bytes) and hand it over, or
/// why it could not be read.
pub async fn invoke(
    State(state): State<AppState>,
    function: QueueFunction,
    parts: Parts,
    body: Result<Bytes, String>,
) -> Response {
    let started = Instant::now();
    let id = invocation::invocation_id(&parts.headers);
    let span = tracing::info_span!("invocation", invocation_id = %id, function = function.name());
    async move {
        let read = body.and_then(|bytes| parse(&bytes));
        let delivery = match read {
            Ok(delivery) => delivery,
            Err(reason) => return finish(function, &id, started, Err(reason), None),
        };
        let result = match state.jobs() {
            None => Err("containment jobs are not configured in this process".to_owned()),
            Some(jobs) => match function {
                QueueFunction::Worker => jobs
                    .work(&delivery.text, delivery.dequeue_count)
                    .await
                    .map_err(|e| e.0),
                QueueFunction::Poison => jobs.poison(&delivery.text).await.map_err(|e| e.0),
            },
        };
        finish(function, &id, started, result, Some(&delivery))
    }
    .instrument(span)
    .await
}

fn finish(
    function: QueueFunction,
    invocation_id: &str,
    started: Instant,
    result: Result<(), String>,
    delivery: Option<&QueueDelivery>,
) -> Response {
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let message_id = delivery.and_then(|d| d.message_id.as_deref()).unwrap_or("");
    let dequeue_count = delivery.map_or(0, |d| d.dequeue_count);
    let (status, log) = match &result {
        Ok(()) => {
            tracing::info!(
                function = function.name(),
                message_id,
                dequeue_count,
                duration_ms,
                "message done"
            );
            (StatusCode::OK, format!("{} done", function.name()))
        }
        Err(reason) => {
            tracing::warn!(function = function.name(), message_id, dequeue_count, duration_ms, reason = %reason, "message failed; the host delivers it again");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} failed: {reason}", function.name()),
            )
        }
    };
    payload_answer(status, invocation_id, log)
}

/// A non-HTTP function's payload-mode answer: a JSON object whose `Logs`
/// carry the invocation's line. The host reads a 2xx as success (a queue
/// message is deleted) and anything else as failure.
pub(super) fn payload_answer(status: StatusCode, invocation_id: &str, log: String) -> Response {
    let body = json!({"Outputs": {}, "Logs": [log], "ReturnValue": null});
    let mut response = (status, Body::from(body.to_string())).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Ok(value) = HeaderValue::from_str(invocation_id) {
        response.headers_mut().insert("x-invocation-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_decoded_twice_and_metadata_strings_once_more() {
        let envelope = json!({
            "Data": {"message": "\"{\\\"job\\\":\\\"j\\\",\\\"devices\\\":[]}\""},
            "Metadata": {"DequeueCount": "3", "Id": "\"b2f8c6e4\"", "job": "\"j\"",
                         "sys": {"MethodName": "job-worker"}}
        });
        let delivery = parse(envelope.to_string().as_bytes()).unwrap();
        assert_eq!(delivery.text, r#"{"job":"j","devices":[]}"#);
        assert_eq!(delivery.dequeue_count, 3);
        assert_eq!(delivery.message_id.as_deref(), Some("b2f8c6e4"));
        assert!(parse(b"{}").is_err());
    }

    #[test]
    fn each_queue_function_matches_its_function_json() {
        for function in QueueFunction::ALL {
            let path = format!(
                "{}/{}/function.json",
                env!("CARGO_MANIFEST_DIR"),
                function.name()
            );
            let json: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let trigger = &json["bindings"][0];
            assert_eq!(trigger["type"], "queueTrigger", "{path}");
            assert_eq!(trigger["name"], TRIGGER_BINDING, "{path}");
            assert_eq!(trigger["queueName"], function.queue(), "{path}");
            assert_eq!(trigger["connection"], "AzureWebJobsStorage", "{path}");
            assert_eq!(json["bindings"].as_array().unwrap().len(), 1, "{path}");
        }
    }
}
