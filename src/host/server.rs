//! Serving the host's connections: HTTP/1.1 with read timeouts, idle
//! keep-alive connections closed, and a shutdown that never waits for a
//! connection that is not running an invocation.
//!
//! `axum::serve` has no read timeouts and, at shutdown, waits for every
//! connection that is not idle in hyper's sense, including one that sent half
//! a request and stopped: the handler then outlives SIGTERM indefinitely. So
//! connections are served here with hyper's own HTTP/1 builder:
//!
//! - hyper's `header_read_timeout` closes a connection that has not sent a
//!   complete request head within `read_timeout` of opening, or of its last
//!   answer: a partial head and an idle keep-alive connection alike;
//! - a request body must arrive completely within `read_timeout` of its head
//!   (a slower one is an error to the route reading it, answered as a 400);
//! - after the shutdown signal the listener is closed; an idle connection is
//!   closed at once, one still receiving a request body is dropped at once
//!   (its invocation has not started), one with half a request head within
//!   [`SHUTDOWN_GRACE`]; one running an invocation finishes it (bounded by
//!   `REQUEST_TIMEOUT_SECONDS`), answers, and is closed. A request that
//!   arrives on a connection during shutdown (one queued behind an in-flight
//!   invocation, or whose head completes as shutdown begins) is answered 503
//!   `shutting_down` with `Connection: close`, and nothing is sent to Defender.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, header},
    response::Response,
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::JoinSet,
    time::{Instant, Sleep},
};
use tower::ServiceExt;

use crate::host::{
    error::ApiError,
    functions::{Function, Record, answer},
    invocation,
    reply::Format,
    routes,
};

/// Default of `HTTP_READ_TIMEOUT_SECONDS`: above the one or two minutes a
/// .NET client (the Functions host) keeps an idle pooled connection, so the
/// host, not the handler, closes idle connections in normal operation.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a connection with no request in service is given at shutdown to
/// finish writing an answer, or to complete a request head (which is then
/// answered 503), before it is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What one connection is doing, for the shutdown decision.
#[derive(Debug, Clone, Copy, Default)]
struct Activity {
    /// Requests handed to the service and not answered yet.
    in_service: usize,
    /// Of those, requests whose body has not been read to its end.
    receiving: usize,
}

impl Activity {
    /// Nothing would be lost by closing the connection now: no invocation
    /// runs on it (an invocation starts once its request is fully read).
    fn closable(self) -> bool {
        self.in_service == 0 || self.receiving > 0
    }
}

/// Serve `app` on `listener` until `shutdown` completes, then drain as the
/// module docs describe.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let (draining_tx, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the
                    // connections we have, and try again shortly.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        connections.spawn(connection(
            stream,
            app.clone(),
            read_timeout,
            draining.clone(),
        ));
    }
    drop(listener);
    let _ = draining_tx.send(true);
    tracing::info!(
        connections = connections.len(),
        "not accepting connections; closing idle ones and finishing in-flight invocations"
    );
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn connection<S>(
    stream: tokio::net::TcpStream,
    app: S,
    read_timeout: Duration,
    mut draining: watch::Receiver<bool>,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let (activity_tx, mut activity) = watch::channel(Activity::default());
    let activity_tx = std::sync::Arc::new(activity_tx);
    let service = {
        let draining = draining.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let app = app.clone();
            let activity = activity_tx.clone();
            let shutting_down = *draining.borrow();
            async move {
                if shutting_down {
                    return Ok::<_, Infallible>(unavailable(&request));
                }
                if let Some(error) = oversized_head(&request) {
                    return Ok(refused_head(&request, error));
                }
                let _in_service = InService::enter(activity.clone());
                let (parts, body) = request.into_parts();
                let body = TrackedBody::new(body, activity, read_timeout);
                let request = Request::from_parts(parts, Body::new(body));
                app.oneshot(request).await
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        // Above our own limit, so that a request with more fields than we
        // take gets our problem answer (`oversized_head`), not hyper's bare 431.
        .max_headers(HYPER_MAX_HEADERS);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);

    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                log_connection_error(&e);
            }
            return;
        }
        _ = draining.wait_for(|d| *d) => {}
    }
    // Shutting down. An invocation running on the connection finishes first.
    if !activity.borrow().closable() {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = activity.wait_for(|a| a.closable()) => {}
        }
    }
    // A request still receiving its body has no invocation yet: dropping the
    // connection closes it, and none can start.
    if activity.borrow().receiving > 0 {
        return;
    }
    // No request in service. hyper closes an idle connection at once, and
    // one it is writing an answer on once the answer is out; a request head
    // that completes meanwhile is answered 503 (see `unavailable`). Whatever
    // is left after the grace (half a request head) is dropped.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
}

/// The 503 for a request that arrived during shutdown, in the request's
/// invocation mode, with its per-invocation log line.
fn unavailable(request: &Request<Incoming>) -> Response {
    let id = invocation::invocation_id(request.headers());
    let path = request
        .uri()
        .path()
        .trim_end_matches('/')
        .to_ascii_lowercase();
    let function = Function::from_payload_path(&path);
    let format = match function {
        Some(_) => Format::Json,
        None => Format::from_accept(
            request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        ),
    };
    let record = Record::unserved(request.method(), request.uri().path());
    let reply = answer::refuse(
        function,
        &id,
        format,
        ApiError::ShuttingDown,
        &record,
        Instant::now(),
    );
    let mut response = match function {
        Some(_) => routes::envelope_response(reply, &id),
        None => routes::reply_response(reply, &id),
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-invocation-id", value);
    }
    routes::closing(response)
}

/// Longest request target (path and query) taken, and largest request head
/// and most header fields: twice the limits of the Functions host's own
/// server (Kestrel's `MaxRequestLineSize` 8 KiB, `MaxRequestHeadersTotalSize`
/// 32 KiB), and room for the fields the host adds to Kestrel's 100, so no
/// call the host forwards (with a query it re-encoded) is refused here.
pub const MAX_URI_BYTES: usize = 16 * 1024;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const MAX_HEADER_FIELDS: usize = 128;
/// hyper's own field limit (its default is 100), set above ours.
const HYPER_MAX_HEADERS: usize = 2 * MAX_HEADER_FIELDS;

/// A request head over our limits: answered with a problem and its log line
/// before it reaches any function. hyper answers heads beyond its own
/// limits (a URI over 64 KiB, a head over about 400 KiB) with a bare
/// 414/431 before we see them; [`log_connection_error`] logs those.
fn oversized_head(request: &Request<Incoming>) -> Option<ApiError> {
    let uri = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri > MAX_URI_BYTES {
        return Some(ApiError::UriTooLong {
            limit: MAX_URI_BYTES,
        });
    }
    let headers = request.headers();
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (headers.len() > MAX_HEADER_FIELDS || size > MAX_HEADER_BYTES).then_some(
        ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
            count: MAX_HEADER_FIELDS,
        },
    )
}

/// The problem answer to an oversized head, with its per-invocation log
/// line (the path cut, as it may be the oversized part).
fn refused_head(request: &Request<Incoming>, error: ApiError) -> Response {
    let id = invocation::invocation_id(request.headers());
    let format = Format::from_accept(
        request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let path = crate::service::shown_text::echoed_name(request.uri().path());
    let record = Record::unserved(request.method(), &path);
    let reply = answer::refuse(None, &id, format, error, &record, Instant::now());
    routes::reply_response(reply, &id)
}

/// A connection hyper ended with an error. A request head beyond hyper's
/// limits was answered 414 or 431 by hyper itself, without a body and
/// without reaching us: log it as the refused request it is.
fn log_connection_error(error: &hyper::Error) {
    if error.is_parse_too_large() {
        // hyper tells the two apart only in its message.
        let status = if error.to_string().contains("URI") {
            414
        } else {
            431
        };
        tracing::warn!(
            status,
            error = %error,
            "request head refused by the HTTP server before routing"
        );
    } else {
        tracing::debug!(error = %error, "connection ended with an error");
    }
}

/// Counts a request as in service until its answer is produced.
struct InService(std::sync::Arc<watch::Sender<Activity>>);

impl InService {
    fn enter(activity: std::sync::Arc<watch::Sender<Activity>>) -> Self {
        activity.send_modify(|a| a.in_service += 1);
        Self(activity)
    }
}

impl Drop for InService {
    fn drop(&mut self) {
        self.0.send_modify(|a| a.in_service -= 1);
    }
}

/// The request body `read_timeout` did not see the end of.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s (HTTP_READ_TIMEOUT_SECONDS)", .0.as_secs())]
pub struct BodyTimeout(Duration);

/// A request body with a deadline, that tells the connection when it has
/// been read to its end (the invocation can only start after that).
struct TrackedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    read_timeout: Duration,
    /// Set while the body is still being received.
    receiving: Option<std::sync::Arc<watch::Sender<Activity>>>,
}

impl TrackedBody {
    fn new(
        inner: Incoming,
        activity: std::sync::Arc<watch::Sender<Activity>>,
        read_timeout: Duration,
    ) -> Self {
        let receiving = if inner.is_end_stream() {
            None
        } else {
            activity.send_modify(|a| a.receiving += 1);
            Some(activity)
        };
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(read_timeout)),
            read_timeout,
            receiving,
        }
    }

    fn received(&mut self) {
        if let Some(activity) = self.receiving.take() {
            activity.send_modify(|a| a.receiving -= 1);
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.received();
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.received();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.received();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.received();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if this.receiving.is_some() && this.deadline.as_mut().poll(cx).is_ready() {
                    this.received();
                    return Poll::Ready(Some(Err(BodyTimeout(this.read_timeout).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
