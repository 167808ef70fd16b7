//! The functions this handler serves, one module each, and the one way an
//! invocation runs: [`invoke`] checks the caller, dispatches to the function,
//! and turns its result into the answer and the one log line ([`answer`]).
//!
//! Each [`Function`] knows its name (its folder and payload-mode path), its
//! method and its forwarded route; the router and the `Allow` header derive
//! from it, and a test checks them against each `function.json`.

pub mod answer;
pub mod callback;
pub mod cancel;
pub mod devices;
pub mod dry_run;
pub mod job_queue;
pub mod jobs;
pub mod openapi;
pub mod restrict;
pub mod status;
pub mod timer;

use http::Method;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    host::{app_state::AppState, error::ApiError, invocation::Invocation, principal, reply::Reply},
    service::{runbook::RunbookError, shown_text},
};

pub use answer::Record;

/// The functions this handler serves; each has a folder with a `function.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `restrict-code-execution`: restrict or release devices.
    Restrict,
    /// `action-status`: read a machine action.
    ActionStatus,
    /// `cancel-action`: cancel a pending machine action.
    CancelAction,
    /// `openapi`: the Swagger 2.0 document.
    OpenApi,
    /// `list-devices`: the fleet view, every machine's restrict state.
    ListDevices,
    /// `start-job`: restrict or release a group of devices as a job.
    StartJob,
    /// `job-status`: a job's state and its devices' outcomes.
    JobStatus,
    /// `list-jobs`: recent jobs, newest first.
    ListJobs,
    /// `cancel-job`: stop sending a job's devices.
    CancelJob,
}

impl Function {
    pub const ALL: [Self; 9] = [
        Self::Restrict,
        Self::ActionStatus,
        Self::CancelAction,
        Self::OpenApi,
        Self::ListDevices,
        Self::StartJob,
        Self::JobStatus,
        Self::ListJobs,
        Self::CancelJob,
    ];

    /// The function's name: its folder and its payload-mode path.
    pub fn name(self) -> &'static str {
        match self {
            Self::Restrict => "restrict-code-execution",
            Self::ActionStatus => "action-status",
            Self::CancelAction => "cancel-action",
            Self::OpenApi => "openapi",
            Self::ListDevices => "list-devices",
            Self::StartJob => "start-job",
            Self::JobStatus => "job-status",
            Self::ListJobs => "list-jobs",
            Self::CancelJob => "cancel-job",
        }
    }

    /// The one method its trigger accepts (`methods` in its `function.json`).
    pub fn method(self) -> Method {
        match self {
            Self::ActionStatus
            | Self::OpenApi
            | Self::ListDevices
            | Self::JobStatus
            | Self::ListJobs => Method::GET,
            Self::Restrict | Self::CancelAction | Self::StartJob | Self::CancelJob => Method::POST,
        }
    }

    /// Its forwarded-mode path: `/api/` and the `route` of its `function.json`.
    pub fn route(self) -> &'static str {
        match self {
            Self::Restrict => "/api/restrict-code-execution",
            Self::ActionStatus => "/api/restrict-code-execution/actions/{actionId}",
            Self::CancelAction => "/api/restrict-code-execution/actions/{actionId}/cancel",
            Self::OpenApi => "/api/openapi.json",
            Self::ListDevices => "/api/restrict-code-execution/devices",
            Self::StartJob | Self::ListJobs => "/api/restrict-code-execution/jobs",
            Self::JobStatus => "/api/restrict-code-execution/jobs/{jobId}",
            Self::CancelJob => "/api/restrict-code-execution/jobs/{jobId}/cancel",
        }
    }

    /// The query parameters it reads, spelled exactly so. Any other (a typo,
    /// `State` for `state`) is refused rather than ignored: a filter that is
    /// silently dropped shows the wrong devices. `code`, the function key the
    /// host checks, is always allowed, in any case as the host reads it.
    pub fn query_params(self) -> &'static [&'static str] {
        match self {
            Self::ListDevices => &["state", "pageSize", "continuation"],
            Self::JobStatus => &["outcome", "offset", "limit"],
            Self::ListJobs => &["limit"],
            Self::Restrict
            | Self::ActionStatus
            | Self::CancelAction
            | Self::OpenApi
            | Self::StartJob
            | Self::CancelJob => &[],
        }
    }

    /// The largest request body it reads: a job's list of up to 10,000 ids
    /// needs more than a runbook payload.
    pub fn max_body(self) -> usize {
        match self {
            Self::StartJob => crate::service::jobs::request::MAX_JOB_BODY_BYTES,
            _ => crate::service::runbook::MAX_PAYLOAD_BYTES,
        }
    }

    /// The largest payload-mode envelope it reads: the body travels as a JSON
    /// string, whose escaping can make it up to six times longer.
    pub fn max_envelope(self) -> usize {
        match self {
            Self::StartJob => 8 * crate::service::jobs::request::MAX_JOB_BODY_BYTES,
            _ => crate::host::envelope::MAX_ENVELOPE_BYTES,
        }
    }

    /// Its payload-mode path: `/{name}`.
    pub fn payload_route(self) -> String {
        format!("/{}", self.name())
    }

    /// The function whose payload-mode path this is (lowercase, no trailing slash).
    pub fn from_payload_path(path: &str) -> Option<Self> {
        let name = path.strip_prefix('/')?;
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Run one invocation of `function`: the answer, and its one log line.
///
/// The caller may hang up before the answer (the invocation's future is then
/// dropped): its line is still written, with outcome `abandoned` and what
/// its orders came to, once the rounds seeing its writes through are done.
pub async fn invoke(state: &AppState, function: Function, invocation: Invocation) -> Reply {
    let started = Instant::now();
    let span = answer::span(&invocation.id, Some(function));
    let mut unanswered = answer::Unanswered::new(function, span.clone(), started);
    async {
        let sent = unanswered.sent.clone();
        let result = sent
            .scope(run(state, function, &invocation, &mut unanswered.record))
            .await;
        let format = match function {
            Function::ListDevices | Function::JobStatus => devices::error_format(&invocation),
            _ => invocation.format(),
        };
        let reply = answer::finish(
            Some(function),
            &invocation.id,
            format,
            result,
            &unanswered.record,
            started,
        );
        unanswered.answered();
        reply
    }
    .instrument(span)
    .await
}

async fn run(
    state: &AppState,
    function: Function,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    if function == Function::OpenApi {
        check_query(function, invocation)?;
        return Ok(openapi::run(invocation, record));
    }
    // Restrict and cancel read the principal again, for the caller's name.
    let principal = invocation.principal();
    if let Err(error) = principal::authorize(state.allowed_roles(), principal.as_ref()) {
        record.caller_name = principal.and_then(|p| p.name);
        return Err(error);
    }
    check_query(function, invocation)?;
    match function {
        Function::Restrict => restrict::run(state, invocation, record).await,
        Function::ActionStatus => status::run(state, invocation, record).await,
        Function::CancelAction => cancel::run(state, invocation, record).await,
        Function::OpenApi => Ok(openapi::run(invocation, record)),
        Function::ListDevices => devices::run(state, invocation, record).await,
        Function::StartJob => jobs::start(state, invocation, record).await,
        Function::JobStatus => jobs::status(state, invocation, record).await,
        Function::ListJobs => jobs::list(state, invocation, record).await,
        Function::CancelJob => jobs::cancel(state, invocation, record).await,
    }
}

/// Refuse a query parameter `function` does not read, naming it (escaped
/// and cut, as any name the caller sent).
fn check_query(function: Function, invocation: &Invocation) -> Result<(), ApiError> {
    let accepted = function.query_params();
    let unknown = invocation
        .query
        .iter()
        .map(|(name, _)| name)
        .find(|name| !name.eq_ignore_ascii_case("code") && !accepted.contains(&name.as_str()));
    match unknown {
        None => Ok(()),
        Some(name) => {
            let accepted = if accepted.is_empty() {
                "none (only the function key, code)".to_owned()
            } else {
                accepted.join(", ")
            };
            Err(ApiError::InvalidRequest(RunbookError::UnknownQuery {
                name: shown_text::echoed_name(name),
                accepted,
            }))
        }
    }
}

/// A Defender machine action id: a GUID. Checked before it goes into a URL.
pub(crate) fn action_id(raw: Option<&String>) -> Result<String, RunbookError> {
    let value = raw.map(|s| s.trim()).unwrap_or("");
    match uuid::Uuid::try_parse(value) {
        Ok(id) if value.len() == 36 => Ok(id.hyphenated().to_string()),
        _ => Err(RunbookError::Invalid {
            field: "actionId",
            reason: format!(
                "must be a Defender machine action id (a GUID), got {:?}",
                value.chars().take(64).collect::<String>()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route table and the `Allow` header derive from [`Function`]: it
    /// must say what the host is told in each folder's `function.json`.
    #[test]
    fn each_function_matches_its_function_json() {
        for function in Function::ALL {
            let path = format!(
                "{}/{}/function.json",
                env!("CARGO_MANIFEST_DIR"),
                function.name()
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let trigger = &json["bindings"][0];
            assert_eq!(trigger["type"], "httpTrigger", "{path}");
            assert_eq!(
                trigger["methods"],
                serde_json::json!([function.method().as_str().to_ascii_lowercase()]),
                "{path}"
            );
            assert_eq!(
                format!("/api/{}", trigger["route"].as_str().unwrap()),
                function.route(),
                "{path}"
            );
            assert_eq!(
                Function::from_payload_path(&function.payload_route()),
                Some(function)
            );
        }
    }
}
