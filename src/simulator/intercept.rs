//! Middleware around `/api/*` and `/_identity/*`: records every request and
//! applies injected faults.
//!
//! The test controls (`/_sim/*`) are routed around this layer, so reading the
//! log never shows up in the log and a fault can never break the controls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::conn::ConnControl;
use super::faults::FaultKind;
use super::requests::RecordedRequest;
use super::respond::{ApiError, code_for_status, envelope, odata_json};
use super::state::Sim;

/// Largest request or response body the simulator buffers.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

enum Outcome {
    Respond(Response),
    Drop,
}

pub(crate) async fn intercept(
    State(sim): State<Arc<Sim>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        let seq = sim.log_begin(RecordedRequest::from_request(&parts, b""));
        let response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "InvalidRequestBody",
            format!("The simulator reads request bodies up to {MAX_BODY} bytes"),
        )
        .into_response();
        sim.log_finish(
            seq,
            response.status().as_u16(),
            started.elapsed(),
            Duration::ZERO,
        );
        return response;
    };
    let seq = sim.log_begin(RecordedRequest::from_request(&parts, &bytes));
    let fault = sim.take_fault(parts.method.as_str(), parts.uri.path());
    let conn = parts
        .extensions
        .get::<ConnectInfo<ConnControl>>()
        .map(|ConnectInfo(c)| c.clone());
    let request = Request::from_parts(parts, Body::from(bytes));

    let mut handling = Duration::ZERO;
    let outcome = match fault {
        None => Outcome::Respond(timed(&mut handling, next.run(request)).await),
        Some(FaultKind::Status {
            status,
            retry_after,
            body,
        }) => Outcome::Respond(fault_response(status, retry_after, body)),
        Some(FaultKind::Delay { millis }) => {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Outcome::Respond(timed(&mut handling, next.run(request)).await)
        }
        Some(FaultKind::DelayAfterHandling { millis }) => {
            let response = timed(&mut handling, next.run(request)).await;
            // Buffer the body now, so the answer is the state at arrival.
            let (parts, body) = response.into_parts();
            let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Outcome::Respond(Response::from_parts(parts, Body::from(bytes)))
        }
        Some(FaultKind::MalformedBody) => {
            let response = timed(&mut handling, next.run(request)).await;
            Outcome::Respond(truncate_body(response).await)
        }
        Some(FaultKind::DropConnection) => Outcome::Drop,
        Some(FaultKind::DropAfterHandling) => {
            // Run the handler to completion (and drain its body) so every
            // state change happens before the connection goes away.
            let response = timed(&mut handling, next.run(request)).await;
            let _ = to_bytes(response.into_body(), MAX_BODY).await;
            Outcome::Drop
        }
    };

    match outcome {
        Outcome::Respond(response) => {
            sim.log_finish(seq, response.status().as_u16(), started.elapsed(), handling);
            response
        }
        Outcome::Drop => {
            sim.log_finish(seq, 0, started.elapsed(), handling);
            match conn {
                Some(conn) => {
                    conn.kill();
                    // Never sent: the connection fails before hyper writes it.
                    StatusCode::INTERNAL_SERVER_ERROR.into_response()
                }
                // Only without the simulator's own listener (e.g. a oneshot
                // router test): there is no socket to drop, so fail loudly.
                None => ApiError::not_implemented(
                    "Dropping a connection needs the simulator's own listener (Simulator::start)",
                )
                .into_response(),
            }
        }
    }
}

async fn timed(handling: &mut Duration, run: impl Future<Output = Response>) -> Response {
    let start = Instant::now();
    let response = run.await;
    *handling = start.elapsed();
    response
}

/// The response for a `Status` fault: the given body, or a Defender error
/// envelope for that status.
fn fault_response(
    status: u16,
    retry_after: Option<u64>,
    body: Option<serde_json::Value>,
) -> Response {
    let Ok(status) = StatusCode::from_u16(status) else {
        return ApiError::not_implemented(format!(
            "Injected fault status {status} is not a valid HTTP status"
        ))
        .into_response();
    };
    let mut response = match body {
        Some(body) => odata_json(status, &body),
        None if status == StatusCode::TOO_MANY_REQUESTS => {
            let secs = retry_after.unwrap_or(1);
            odata_json(
                status,
                &envelope(
                    "TooManyRequests",
                    format!("Rate limit is exceeded. Try again in {secs} seconds."),
                ),
            )
        }
        None => odata_json(
            status,
            &envelope(
                &code_for_status(status),
                format!("Injected fault: {status}"),
            ),
        ),
    };
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.into());
    }
    response
}

/// Keeps status and headers but cuts the JSON body in half, so it no longer
/// parses (an empty body becomes a lone `{`).
async fn truncate_body(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = to_bytes(body, MAX_BODY).await.unwrap_or_default();
    let cut = if bytes.len() < 2 {
        Bytes::from_static(b"{")
    } else {
        bytes.slice(..bytes.len() / 2)
    };
    // The length changed; let hyper compute the new one.
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(cut))
}
