//! The HTTP surface the Functions host talks to.
//!
//! - `GET /`: the host's readiness probe (polled every 25 ms at start) and ping.
//! - Forwarded mode (`enableForwardingHttpRequest`), the caller's request as is:
//!   `POST /api/restrict-code-execution`,
//!   `GET /api/restrict-code-execution/actions/{actionId}`,
//!   `POST /api/restrict-code-execution/actions/{actionId}/cancel`,
//!   `GET /api/restrict-code-execution/devices`,
//!   `GET /api/openapi.json`.
//! - Payload mode, the host's envelope: `POST /{FunctionName}` for each
//!   function folder (`restrict-code-execution`, `action-status`,
//!   `cancel-action`, `openapi`, `list-devices`).
//!
//! Both modes build the same [`Invocation`] and run [`invocation::invoke`].

use std::collections::BTreeMap;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{RawPathParams, Request, State},
    http::{HeaderMap, HeaderValue, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get, post},
};
use http_body_util::{BodyExt, Limited};
use tower_http::trace::TraceLayer;
use url::Url;

use crate::{
    envelope,
    error::ApiError,
    invocation::{self, AppState, Function, Invocation},
    reply::{Format, Reply},
    runbook::{MAX_PAYLOAD_BYTES, RunbookError},
};

/// The function's name: its folder, its route and its payload-mode path.
pub const FUNCTION_NAME: &str = "restrict-code-execution";

/// The router, without a socket, so tests can drive it in-process.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/", get(ready))
        .route(
            "/api/restrict-code-execution",
            forwarded_route(Function::Restrict),
        )
        .route(
            "/api/restrict-code-execution/actions/{actionId}",
            forwarded_route(Function::ActionStatus),
        )
        .route(
            "/api/restrict-code-execution/actions/{actionId}/cancel",
            forwarded_route(Function::CancelAction),
        )
        .route(
            "/api/restrict-code-execution/devices",
            forwarded_route(Function::ListDevices),
        )
        .route("/api/openapi.json", forwarded_route(Function::OpenApi));
    for function in Function::ALL {
        router = router.route(
            &format!("/{}", function.name()),
            post(move |state: State<AppState>, request: Request| {
                payload_mode(state, function, request)
            })
            .fallback(method_not_allowed),
        );
    }
    router
        .fallback(route_not_found)
        // The span records the path only: the query can hold the function key.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

/// Match routes as the Functions host does: case-insensitively and with or
/// without a trailing slash. The host forwards the caller's path as it was
/// sent, so `/api/Restrict-Code-Execution/` must reach the same function.
/// Runs before routing (a layer on the router would run after it).
pub fn normalize_path(mut request: Request) -> Request {
    let path = request.uri().path();
    let trimmed = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let normalized = trimmed.to_ascii_lowercase();
    if normalized != path {
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{normalized}?{query}"),
            None => normalized,
        };
        let mut parts = request.uri().clone().into_parts();
        if let Ok(pq) = path_and_query.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    request
}

/// A forwarded-mode route for `function`, answering other methods with 405.
fn forwarded_route(function: Function) -> MethodRouter<AppState> {
    let handler = move |state: State<AppState>, params: RawPathParams, request: Request| {
        forwarded(state, function, params, request)
    };
    match function {
        Function::ActionStatus | Function::OpenApi | Function::ListDevices => get(handler),
        Function::Restrict | Function::CancelAction => post(handler),
    }
    .fallback(method_not_allowed)
}

/// Answers at once: the host only needs a response to count us as ready.
async fn ready() -> &'static str {
    "ready"
}

async fn forwarded(
    State(state): State<AppState>,
    function: Function,
    params: RawPathParams,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let id = invocation::invocation_id(&parts.headers);
    let format = Format::from_accept(header_str(&parts.headers, header::ACCEPT));
    let body = match read_limited(body, MAX_PAYLOAD_BYTES).await {
        Ok(body) => body,
        Err(error) => return reply_response(Reply::error(&error, &id, format), &id),
    };
    let invocation = Invocation {
        id: id.clone(),
        function,
        method: parts.method.as_str().to_owned(),
        headers: headers(&parts.headers),
        query: query(&parts),
        params: params
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        body: body.to_vec(),
        url: caller_url(&parts),
    };
    let reply = invocation::invoke(&state, invocation).await;
    reply_response(reply, &id)
}

async fn payload_mode(
    State(state): State<AppState>,
    function: Function,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let id = invocation::invocation_id(&parts.headers);
    let reply = match read_limited(body, envelope::MAX_ENVELOPE_BYTES).await {
        Ok(bytes) => match envelope::parse(&bytes) {
            Ok(trigger) => {
                let invocation = Invocation {
                    id: id.clone(),
                    function,
                    method: trigger.method,
                    headers: trigger.headers,
                    query: trigger.query,
                    params: trigger.params,
                    body: trigger.body,
                    url: trigger.url,
                };
                invocation::invoke(&state, invocation).await
            }
            Err(e) => Reply::error(&e, &id, Format::Json),
        },
        Err(error) => Reply::error(&error, &id, Format::Json),
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
    let id = invocation::invocation_id(&headers);
    let error = ApiError::MethodNotAllowed(request.method().to_string());
    let allow = if request.uri().path().ends_with("/cancel")
        || request.uri().path() == "/api/restrict-code-execution"
        || !request.uri().path().starts_with("/api/")
    {
        "POST"
    } else {
        "GET"
    };
    let mut response = reply_response(Reply::error(&error, &id, Format::Json), &id);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

async fn route_not_found(headers: HeaderMap, request: Request) -> Response {
    let id = invocation::invocation_id(&headers);
    let error = ApiError::RouteNotFound(request.uri().path().to_owned());
    reply_response(Reply::error(&error, &id, Format::Json), &id)
}

/// Takes the reply: its body can be megabytes (the fleet view), not to be copied.
fn reply_response(reply: Reply, invocation_id: &str) -> Response {
    let reply_headers = reply.headers();
    let mut response = (reply.status, reply.body).into_response();
    let headers = response.headers_mut();
    for (name, value) in reply_headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    if let Ok(value) = HeaderValue::from_str(invocation_id) {
        headers.insert("x-invocation-id", value);
    }
    response
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Lowercase names, every value, as the payload-mode envelope has them.
fn headers(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Ok(value) = value.to_str() {
            map.entry(name.as_str().to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    map
}

fn query(parts: &Parts) -> Vec<(String, String)> {
    parts
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// The URL the caller used. The host forwards the original `Host`; TLS ends
/// at the platform's front end, which sets `X-Forwarded-Proto`.
fn caller_url(parts: &Parts) -> Option<Url> {
    let host = header_str(&parts.headers, header::HOST)?;
    let scheme = match header_str(
        &parts.headers,
        header::HeaderName::from_static("x-forwarded-proto"),
    ) {
        Some(proto) if proto.eq_ignore_ascii_case("http") => "http",
        Some(_) => "https",
        None if host.starts_with("localhost")
            || host.starts_with("127.0.0.1")
            || host.starts_with("[::1]") =>
        {
            "http"
        }
        None => "https",
    };
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    Url::parse(&format!("{scheme}://{host}{path_and_query}")).ok()
}

/// Read a body, refusing more than `limit` bytes without buffering them.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::InvalidRequest(RunbookError::TooLarge {
                limit: MAX_PAYLOAD_BYTES,
            }))
        }
        Err(e) => Err(ApiError::InvalidEnvelope(format!(
            "the request body could not be read: {e}"
        ))),
    }
}
