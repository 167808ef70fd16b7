//! The HTTP surface the Functions host talks to.
//!
//! - `GET /`: the host's readiness probe (polled every 25 ms at start) and ping.
//! - `POST /api/restrict-code-execution`: forwarded mode
//!   (`enableForwardingHttpRequest`), the caller's request as is.
//! - `POST /restrict-code-execution`: payload mode, the host's envelope.
//!
//! Both POST routes run the same [`invocation::invoke`].

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt, Limited};
use tower_http::trace::TraceLayer;

use crate::{
    envelope,
    error::ApiError,
    invocation::{self, AppState, Reply},
    runbook::MAX_PAYLOAD_BYTES,
};

/// The function's name: its folder, its route and its payload-mode path.
pub const FUNCTION_NAME: &str = "restrict-code-execution";

/// The router, without a socket, so tests can drive it in-process.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route(
            &format!("/api/{FUNCTION_NAME}"),
            post(forwarded).fallback(method_not_allowed),
        )
        .route(
            &format!("/{FUNCTION_NAME}"),
            post(payload_mode).fallback(method_not_allowed),
        )
        .fallback(route_not_found)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Answers at once: the host only needs a response to count us as ready.
async fn ready() -> &'static str {
    "ready"
}

async fn forwarded(State(state): State<AppState>, request: Request) -> Response {
    let invocation_id = invocation::invocation_id(request.headers());
    let reply = match read_limited(request.into_body(), MAX_PAYLOAD_BYTES).await {
        Ok(body) => invocation::invoke(&state, &invocation_id, &body).await,
        Err(BodyError::TooLarge) => Reply::error(
            &ApiError::InvalidRequest(crate::runbook::RunbookError::TooLarge {
                limit: MAX_PAYLOAD_BYTES,
            }),
            &invocation_id,
        ),
        Err(BodyError::Read(e)) => Reply::error(
            &ApiError::InvalidEnvelope(format!("the request body could not be read: {e}")),
            &invocation_id,
        ),
    };
    reply_response(&reply, &invocation_id)
}

async fn payload_mode(State(state): State<AppState>, request: Request) -> Response {
    let invocation_id = invocation::invocation_id(request.headers());
    let reply = match read_limited(request.into_body(), envelope::MAX_ENVELOPE_BYTES).await {
        Ok(bytes) => match envelope::parse(&bytes) {
            Ok(trigger) => invocation::invoke(&state, &invocation_id, &trigger.body).await,
            Err(e) => Reply::error(&e, &invocation_id),
        },
        Err(BodyError::TooLarge) => Reply::error(
            &ApiError::InvalidRequest(crate::runbook::RunbookError::TooLarge {
                limit: MAX_PAYLOAD_BYTES,
            }),
            &invocation_id,
        ),
        Err(BodyError::Read(e)) => Reply::error(
            &ApiError::InvalidEnvelope(format!("the envelope could not be read: {e}")),
            &invocation_id,
        ),
    };
    // Always 200 application/json: the host fails the invocation with an empty
    // 500 on anything else and the caller would never see our answer.
    let mut response = envelope::render(&reply).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

async fn method_not_allowed(headers: HeaderMap, request: Request) -> Response {
    let invocation_id = invocation::invocation_id(&headers);
    let error = ApiError::MethodNotAllowed(request.method().to_string());
    let mut response = reply_response(&Reply::error(&error, &invocation_id), &invocation_id);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

async fn route_not_found(headers: HeaderMap, request: Request) -> Response {
    let invocation_id = invocation::invocation_id(&headers);
    let error = ApiError::RouteNotFound(request.uri().path().to_owned());
    reply_response(&Reply::error(&error, &invocation_id), &invocation_id)
}

fn reply_response(reply: &Reply, invocation_id: &str) -> Response {
    let mut response = (reply.status, reply.body.clone()).into_response();
    let headers = response.headers_mut();
    for (name, value) in reply.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    if let Ok(value) = HeaderValue::from_str(invocation_id) {
        headers.insert("x-invocation-id", value);
    }
    response
}

enum BodyError {
    TooLarge,
    Read(String),
}

/// Read a body, refusing more than `limit` bytes without buffering them.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}
