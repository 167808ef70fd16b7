//! The HTTP surface the Functions host talks to.
//!
//! - `GET /`: the host's readiness probe (polled every 25 ms at start) and ping.
//! - Forwarded mode (`enableForwardingHttpRequest`, or the proxying
//!   `enableProxyingHttpRequest`: the same routes, see [`HttpMode`]), the
//!   caller's request as is: each [`Function`]'s method and
//!   [`Function::route`], such as `POST /api/restrict-code-execution`.
//! - Payload mode, the host's envelope: `POST /{FunctionName}` for each
//!   function folder ([`Function::payload_route`]).
//!
//! - Queue triggers (the containment jobs' worker and poison functions):
//!   payload mode only, `POST /job-worker` and `POST /job-poison`.
//!
//! Both modes build the same [`Invocation`] and run [`functions::invoke`].

use std::collections::BTreeMap;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{RawPathParams, Request, State},
    http::{HeaderMap, HeaderValue, Method, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{MethodFilter, MethodRouter, get, post},
};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_http::trace::TraceLayer;
use url::Url;

use crate::{
    host::{
        app_state::AppState,
        envelope,
        error::ApiError,
        functions::{self, Function, Record, answer, job_queue, job_queue::QueueFunction},
        http_mode::HttpMode,
        invocation::{self, Invocation},
        reply::{Format, Reply},
    },
    service::runbook::RunbookError,
};

/// The router, without a socket, so tests can drive it in-process.
pub fn router(state: AppState) -> Router {
    let mut router =
        Router::new().route("/", get(ready).fallback(not_allowed(Method::GET.as_str())));
    let mut routes: Vec<&'static str> = Function::ALL.iter().map(|f| f.route()).collect();
    routes.sort_unstable();
    routes.dedup();
    for route in routes {
        router = router.route(route, forwarded_route(route));
    }
    for function in Function::ALL {
        router = router.route(
            &function.payload_route(),
            post(move |state: State<AppState>, request: Request| {
                payload_mode(state, function, request)
            })
            .fallback(not_allowed(Method::POST.as_str())),
        );
    }
    // The queue-triggered functions: payload mode only.
    for function in QueueFunction::ALL {
        router = router.route(
            &format!("/{}", function.name()),
            post(move |state: State<AppState>, request: Request| async move {
                let (parts, body) = request.into_parts();
                let read = read_limited(
                    &parts,
                    body,
                    job_queue::MAX_ENVELOPE,
                    ApiError::InvalidEnvelope,
                )
                .await
                .map_err(|e| e.to_string());
                job_queue::invoke(state, function, parts, read).await
            })
            .fallback(not_allowed(Method::POST.as_str())),
        );
    }
    // The timer-triggered reconciler: payload mode only.
    router = router.route(
        &format!("/{}", functions::timer::NAME),
        post(functions::timer::invoke).fallback(not_allowed(Method::POST.as_str())),
    );
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

/// A forwarded-mode route: each function on `route` under its method (the
/// jobs' collection takes GET and POST), other methods answered with 405.
fn forwarded_route(route: &'static str) -> MethodRouter<AppState> {
    let mut router = MethodRouter::new();
    let mut allowed: Vec<Method> = Vec::new();
    for function in Function::ALL.into_iter().filter(|f| f.route() == route) {
        let handler = move |state: State<AppState>, params: RawPathParams, request: Request| {
            forwarded(state, function, params, request)
        };
        // Function methods are GET or POST, which always convert.
        let filter = MethodFilter::try_from(function.method()).unwrap_or(MethodFilter::POST);
        router = router.on(filter, handler);
        if !allowed.contains(&function.method()) {
            allowed.push(function.method());
        }
    }
    // One route can serve several functions (the jobs list and start).
    let allowed = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    // axum answers HEAD with the GET handler minus its body: the function
    // would run, Defender reads and all, for an answer nobody reads. The
    // triggers take GET only, so HEAD is a 405 like any other method.
    router
        .on(MethodFilter::HEAD, not_allowed(allowed.clone()))
        .fallback(not_allowed(allowed))
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
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let id = invocation::invocation_id(&parts.headers);
    let format = Format::from_accept(header_str(&parts.headers, header::ACCEPT));
    let body = match read_limited(&parts, body, function.max_body(), |reason| {
        ApiError::InvalidRequest(RunbookError::Unreadable(reason))
    })
    .await
    {
        Ok(body) => body,
        Err(error) => {
            let reply = answer::refuse(
                Some(function),
                &id,
                format,
                error,
                &Record::default(),
                started,
            );
            return closing(reply_response(reply, &id));
        }
    };
    let invocation = Invocation {
        id: id.clone(),
        method: parts.method.as_str().to_owned(),
        headers: headers(&parts.headers),
        query: query(&parts),
        params: params
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        body: body.to_vec(),
        url: caller_url(&parts, state.http_mode()),
    };
    let reply = functions::invoke(&state, function, invocation).await;
    reply_response(reply, &id)
}

async fn payload_mode(
    State(state): State<AppState>,
    function: Function,
    request: Request,
) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let id = invocation::invocation_id(&parts.headers);
    let read = read_limited(
        &parts,
        body,
        function.max_envelope(),
        ApiError::InvalidEnvelope,
    )
    .await;
    let body_unread = read.is_err();
    let invocation = read
        .and_then(|bytes| envelope::parse(&bytes, id.clone()))
        .and_then(|invocation| {
            // The host forwards whatever method the caller used when the
            // trigger allows it; anything else is refused as in forwarded mode.
            if invocation.method.is_empty() || invocation.method == function.method().as_str() {
                Ok(invocation)
            } else {
                Err(ApiError::MethodNotAllowed {
                    method: invocation.method,
                    allowed: function.method().to_string(),
                })
            }
        });
    let reply = match invocation {
        Ok(invocation) => functions::invoke(&state, function, invocation).await,
        Err(error) => answer::refuse(
            Some(function),
            &id,
            Format::Json,
            error,
            &Record::default(),
            started,
        ),
    };
    let response = envelope_response(reply, &id);
    if body_unread {
        closing(response)
    } else {
        response
    }
}

/// A payload-mode answer: the reply in the host's output envelope, always
/// 200 application/json (the host fails the invocation with an empty 500 on
/// anything else, and the caller would never see our answer).
pub(crate) fn envelope_response(reply: Reply, invocation_id: &str) -> Response {
    // The caller gets the invocation id as in forwarded mode.
    let reply = reply.with_header("x-invocation-id", invocation_id.to_owned());
    let mut response = envelope::render(&reply).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// An answer given without reading the whole request body (too large, cut
/// off, too slow): the connection cannot carry another request, so the
/// client is told not to reuse it, rather than finding it closed when it does.
pub(crate) fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The 405 fallback of a route that accepts only `allowed`.
fn not_allowed(
    allowed: impl Into<String>,
) -> impl Fn(HeaderMap, Request) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    let allowed: String = allowed.into();
    move |headers: HeaderMap, request: Request| {
        let error = ApiError::MethodNotAllowed {
            method: request.method().to_string(),
            allowed: allowed.clone(),
        };
        std::future::ready(unserved(&headers, &request, error))
    }
}

async fn route_not_found(headers: HeaderMap, request: Request) -> Response {
    let error = ApiError::RouteNotFound(request.uri().path().to_owned());
    unserved(&headers, &request, error)
}

/// The answer to a request no function serves (no such route or method),
/// with its per-invocation log line.
fn unserved(headers: &HeaderMap, request: &Request, error: ApiError) -> Response {
    let id = invocation::invocation_id(headers);
    let record = Record::unserved(request.method(), request.uri().path());
    let reply = answer::refuse(None, &id, Format::Json, error, &record, Instant::now());
    reply_response(reply, &id)
}

/// A forwarded-mode answer. Takes the reply: its body can be megabytes (the
/// fleet view), not to be copied.
pub(crate) fn reply_response(reply: Reply, invocation_id: &str) -> Response {
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

/// The URL the caller used (for `Location` and `statusUrl`, which carry the
/// caller's function key). Forwarding mode keeps the caller's `Host`, and an
/// `X-Forwarded-Host` there is whatever the caller sent: ignored. Proxying
/// mode sends `Host: 127.0.0.1:<port>` and sets `X-Forwarded-Host` itself,
/// replacing the caller's ([`HttpMode`]). The forwarded host is taken only
/// when `Host` is that address too: should the host's real mode differ
/// from what `host.json` says (an app setting can override it), a
/// forwarded request carries the caller's public `Host` (the platform's
/// front end routes on it), never `127.0.0.1`, and a caller's
/// `X-Forwarded-Host` is then ignored as in forwarding mode. TLS ends at the platform's front end: `http` is used only for a
/// loopback host (a local run), so a key never goes into an `http` URL for
/// a public name, whatever `X-Forwarded-Proto` says.
fn caller_url(parts: &Parts, mode: HttpMode) -> Option<Url> {
    let host_header = header_str(&parts.headers, header::HOST)?;
    let forwarded_host = match mode {
        HttpMode::Proxying if host_header.split(':').next() == Some("127.0.0.1") => header_str(
            &parts.headers,
            header::HeaderName::from_static("x-forwarded-host"),
        )
        // One value: the host sets it; should a list come, the last was
        // added nearest to us.
        .and_then(|v| v.rsplit(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty()),
        HttpMode::Proxying | HttpMode::Forwarding => None,
    };
    let host = forwarded_host.unwrap_or(host_header);
    let https = match header_str(
        &parts.headers,
        header::HeaderName::from_static("x-forwarded-proto"),
    ) {
        Some(proto) => !proto.eq_ignore_ascii_case("http") || !is_loopback(host),
        None => !is_loopback(host),
    };
    let scheme = if https { "https" } else { "http" };
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let url = Url::parse(&format!("{scheme}://{host}{path_and_query}")).ok()?;
    // A host with user info or a path in it is not a host name.
    (url.username().is_empty() && url.password().is_none() && !host.contains(['/', '@']))
        .then_some(url)
}

/// `localhost`, `127.0.0.1` or `[::1]`, with or without a port.
fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "::1"
}

/// Read a body, refusing more than `limit` bytes without buffering them.
/// A body that cannot be read (cut off, or slower than the read timeout) is
/// `unreadable`: the caller's fault in forwarded mode, the envelope's in
/// payload mode.
///
/// A `Content-Length` over the limit is refused before the body is touched:
/// hyper sends `100 Continue` only once the body is read, so a client that
/// asked for it (`Expect: 100-continue`) gets the 413 without sending the body.
pub(crate) async fn read_limited(
    parts: &Parts,
    body: Body,
    limit: usize,
    unreadable: fn(String) -> ApiError,
) -> Result<Bytes, ApiError> {
    let declared = header_str(&parts.headers, header::CONTENT_LENGTH)
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|length| length > u64::try_from(limit).unwrap_or(u64::MAX)) {
        // A client waiting for `100 Continue` has sent no body: answer at
        // once. One that is sending it gets its 413 after the body is drained.
        let expects_continue = header_str(&parts.headers, header::EXPECT)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
        if !expects_continue {
            drain(&mut body, tokio::time::Instant::now() + DRAIN_TIME).await;
        }
        return Err(ApiError::InvalidRequest(RunbookError::TooLarge { limit }));
    }
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            unreadable(format!(
                "the request body could not be read: {}",
                root_cause(&e)
            ))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if kept.len() + data.len() > limit {
            drain(&mut body, tokio::time::Instant::now() + DRAIN_TIME).await;
            return Err(ApiError::InvalidRequest(RunbookError::TooLarge { limit }));
        }
        kept.extend_from_slice(&data);
    }
    Ok(Bytes::from(kept))
}

/// Read and drop the rest of a body that is over the limit, for a moment and
/// up to a bound: a client still sending when the connection closes would
/// see a broken pipe instead of the 413.
async fn drain(body: &mut Body, until: tokio::time::Instant) {
    let mut drained = 0usize;
    while drained <= DRAIN_MAX {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                drained = drained.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
            }
            _ => return,
        }
    }
}

/// How long, and how much, of a body past the limit is read and dropped.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const DRAIN_MAX: usize = 4 * 1024 * 1024;

/// The innermost error: axum wraps the body's own error.
fn root_cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut error = error;
    while let Some(source) = error.source() {
        error = source;
    }
    error
}
