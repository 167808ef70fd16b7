//! The one place an invocation's result becomes its answer and its log line.
//!
//! Functions return `Result<Reply, ApiError>` and note what they learn (the
//! device, the machine, the action, the caller) in a [`Record`]; [`finish`]
//! turns an error into its problem answer and writes the one structured line
//! per invocation: `function`, `status`, `code`, `outcome`, `duration_ms` and
//! the ids. Requests refused before a function ran (no such route, the wrong
//! method, an unreadable body or envelope, shutdown) get the same line
//! through [`refuse`]. Never a token: nothing here can hold one.

use std::sync::atomic::{AtomicUsize, Ordering};

use http::StatusCode;
use tokio::time::Instant;
use tracing::{Instrument, Level, Span};

use super::Function;
use crate::{
    host::{
        error::ApiError,
        reply::{Format, Reply},
    },
    service::restrict::{OrderResult, Sent},
};

/// What the invocation's log line says besides its function and status,
/// filled in by the function as it learns it.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub device_id: Option<String>,
    pub machine_id: Option<String>,
    pub release: Option<bool>,
    pub caller_name: Option<String>,
    /// What happened, on success (`requested`, `already_pending`, `read`, …);
    /// an error's outcome is its code.
    pub outcome: Option<&'static str>,
    pub action_id: Option<String>,
    pub action_status: Option<String>,
    /// Devices in a bulk answer or the fleet view.
    pub devices: Option<usize>,
    /// Devices of a bulk answer that failed.
    pub failed: Option<usize>,
    /// The fleet view: the actions it was built from, and the Defender calls
    /// that read them.
    pub actions: Option<usize>,
    pub defender_calls: Option<usize>,
    /// A request no function answered: its method and path.
    pub method: Option<String>,
    pub path: Option<String>,
    /// Put before an error answer's summary (payload mode's `Logs`), such as
    /// which device was being acted on.
    pub headline: Option<String>,
}

impl Record {
    /// A request no function answers (or not yet): its method and path.
    pub fn unserved(method: &http::Method, path: &str) -> Self {
        Self {
            method: Some(method.to_string()),
            path: Some(path.to_owned()),
            ..Self::default()
        }
    }
}

/// An invocation that has not answered yet. Dropped before
/// [`Unanswered::answered`], its caller went away (hung up, or the host gave
/// up on it): its line is written then, with outcome `abandoned`, as soon as
/// the machine rounds serving its orders are done, so that it says what was
/// sent.
pub struct Unanswered {
    pub record: Record,
    /// What its orders for machine rounds came to.
    pub sent: Sent,
    function: Function,
    span: Span,
    started: Instant,
    answered: bool,
}

impl Unanswered {
    pub fn new(function: Function, span: Span, started: Instant) -> Self {
        Self {
            record: Record::default(),
            sent: Sent::default(),
            function,
            span,
            started,
            answered: false,
        }
    }

    /// Its line was written with its answer.
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

/// Abandoned invocations' lines not written yet: the process waits for them
/// before it exits ([`abandoned_lines_written`]).
static UNWRITTEN: AtomicUsize = AtomicUsize::new(0);

/// Resolves once every abandoned invocation's line is written (or at `until`).
pub async fn abandoned_lines_written(until: Instant) {
    while UNWRITTEN.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// How long an abandoned invocation's line waits for the rounds seeing its
/// writes through: longer than any invocation lasts.
const ABANDONED_LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(240);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let line = Abandoned {
            function: self.function,
            record: std::mem::take(&mut self.record),
            sent: self.sent.clone(),
            started: self.started,
        };
        let span = self.span.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                UNWRITTEN.fetch_add(1, Ordering::AcqRel);
                runtime.spawn(
                    async move {
                        let _ =
                            tokio::time::timeout(ABANDONED_LINE_WAIT, line.sent.settled()).await;
                        line.write();
                        UNWRITTEN.fetch_sub(1, Ordering::AcqRel);
                    }
                    .instrument(span),
                );
            }
            Err(_) => span.in_scope(|| line.write()),
        }
    }
}

/// The line of an invocation whose caller went away.
struct Abandoned {
    function: Function,
    record: Record,
    sent: Sent,
    started: Instant,
}

impl Abandoned {
    /// Written as a warning: nobody got the answer. `status` is 499, the
    /// code web servers log for a client that closed the request; `result`
    /// is what its last order came to (an outcome, or a problem code), with
    /// the action it acted with in `action_id`.
    fn write(&self) {
        let record = &self.record;
        let results = self.sent.results();
        let last = results.last();
        let (result, error) = match last {
            Some(OrderResult::Acted { outcome, .. }) => (Some(outcome.as_str()), None),
            Some(OrderResult::Failed(e)) => {
                let e = ApiError::from(e.clone());
                (Some(e.code()), Some(e.to_string()))
            }
            None => (None, None),
        };
        let action_id = self
            .sent
            .last_action()
            .map(|(_, id)| id.to_string())
            .or_else(|| record.action_id.clone());
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::warn!(
            function = self.function.name(),
            status = 499_u16,
            outcome = "abandoned",
            result,
            duration_ms,
            device_id = record.device_id,
            machine_id = record.machine_id,
            release = record.release,
            action_id,
            caller_name = record.caller_name,
            orders = results.len(),
            error,
            "invocation abandoned"
        );
    }
}

/// The span every line of an invocation is logged in.
pub fn span(invocation_id: &str, function: Option<Function>) -> Span {
    tracing::info_span!(
        "invocation",
        invocation_id = %invocation_id,
        function = function.map_or("none", Function::name)
    )
}

/// The answer to a function's result, after writing its log line.
pub fn finish(
    function: Option<Function>,
    invocation_id: &str,
    format: Format,
    result: Result<Reply, ApiError>,
    record: &Record,
    started: Instant,
) -> Reply {
    let (reply, error) = match result {
        Ok(reply) => (reply, None),
        Err(error) => {
            let mut reply = Reply::error(&error, invocation_id, format);
            if let Some(headline) = &record.headline {
                reply.summary = format!("{headline}: {}", reply.summary);
            }
            (reply, Some(error))
        }
    };
    write(function, reply.status, error.as_ref(), record, started);
    reply
}

/// The answer to a request refused before its function ran (or with no
/// function at all), in the invocation's span.
pub fn refuse(
    function: Option<Function>,
    invocation_id: &str,
    format: Format,
    error: ApiError,
    record: &Record,
    started: Instant,
) -> Reply {
    span(invocation_id, function)
        .in_scope(|| finish(function, invocation_id, format, Err(error), record, started))
}

/// The one structured line per invocation: info when it succeeded, warn when
/// the caller's request was refused (4xx) or arrived during shutdown (a
/// routine 503 the platform retries elsewhere), error when it failed (5xx).
fn write(
    function: Option<Function>,
    status: StatusCode,
    error: Option<&ApiError>,
    record: &Record,
    started: Instant,
) {
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let function = function.map_or("none", Function::name);
    let code = error.map(ApiError::code);
    let outcome = code.or(record.outcome);
    let detail = error.map(ToString::to_string);
    macro_rules! line {
        ($level:expr, $message:literal) => {
            tracing::event!(
                $level,
                function,
                status = status.as_u16(),
                code,
                outcome,
                duration_ms,
                device_id = record.device_id,
                machine_id = record.machine_id,
                release = record.release,
                action_id = record.action_id,
                action_status = record.action_status,
                caller_name = record.caller_name,
                devices = record.devices,
                failed = record.failed,
                actions = record.actions,
                defender_calls = record.defender_calls,
                method = record.method,
                path = record.path,
                error = detail,
                $message
            )
        };
    }
    let shutting_down = matches!(error, Some(ApiError::ShuttingDown));
    if status.is_server_error() && !shutting_down {
        line!(Level::ERROR, "invocation failed");
    } else if status.is_client_error() || shutting_down {
        line!(Level::WARN, "invocation rejected");
    } else {
        line!(Level::INFO, "invocation succeeded");
    }
}
