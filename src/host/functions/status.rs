//! `action-status`: `GET /api/restrict-code-execution/actions/{actionId}`.
//!
//! The machine action as Defender has it, with `terminal`. While the action
//! is Pending or InProgress the answer is 202 with `Location` (this URL) and
//! `Retry-After`, and 200 once it is finished: exactly what a Logic Apps HTTP
//! action polls until it is done.

use http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    defender::{
        ActionRecord,
        ids::{ActionId, MachineId},
        models::{ActionStatus, ActionType, OrOther},
        timestamp::Timestamp,
    },
    host::{
        app_state::AppState,
        error::ApiError,
        functions::{Function, Record, action_id},
        invocation::Invocation,
        reply::Reply,
    },
};

/// What a Logic App is told to wait between polls of the status route: reads
/// of actions share Defender's 1500-per-hour budget with every other caller.
pub const POLL_AFTER_SECONDS: u64 = 10;

pub async fn run(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let (id, found) = read(state, invocation).await?;
    let body = StatusBody::new(&found, &invocation.id);
    body.note(record, "read");
    let terminal = body.terminal;
    let mut reply = Reply::new(
        if terminal {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        },
        invocation.format(),
        &body,
        || format!("{}\n", body.message),
        body.message.clone(),
    );
    if !terminal {
        if let Some(location) = status_url(invocation, &id) {
            reply = reply.with_header("Location", location);
        }
        reply = reply.with_header("Retry-After", POLL_AFTER_SECONDS.to_string());
    }
    Ok(reply)
}

/// The absolute URL of this function for `action_id`, where a Logic App polls.
pub(crate) fn status_url(invocation: &Invocation, action_id: &str) -> Option<String> {
    invocation.url_for(
        &Function::ActionStatus
            .route()
            .replace("{actionId}", action_id),
    )
}

async fn read(
    state: &AppState,
    invocation: &Invocation,
) -> Result<(String, ActionRecord), ApiError> {
    let id = action_id(invocation.params.get("actionId"))?;
    let deadline = Instant::now() + state.request_timeout();
    let found = state.restrictor().status(&id, deadline).await?;
    Ok((id, found))
}

/// The answer of the status and cancel functions.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusBody {
    pub action_id: ActionId,
    #[serde(rename = "type")]
    pub action_type: OrOther<ActionType>,
    pub status: OrOther<ActionStatus>,
    /// Succeeded, Failed, TimeOut and Cancelled are final.
    pub terminal: bool,
    pub machine_id: Option<MachineId>,
    pub computer_dns_name: Option<String>,
    pub requestor_comment: Option<String>,
    pub creation_date_time_utc: Option<Timestamp>,
    pub last_update_date_time_utc: Option<Timestamp>,
    pub message: String,
    /// The machine action exactly as Defender returned it (the status and
    /// cancel routes always read or cancel the one action).
    pub action: Value,
    pub invocation_id: String,
}

impl StatusBody {
    /// Notes the action in the invocation's log line.
    pub(crate) fn note(&self, record: &mut Record, outcome: &'static str) {
        record.outcome = Some(outcome);
        record.action_id = Some(self.action_id.to_string());
        record.action_status = Some(self.status.to_string());
        record.machine_id = self.machine_id.as_ref().map(MachineId::to_string);
    }

    pub fn new(found: &ActionRecord, invocation_id: &str) -> Self {
        let a = &found.action;
        let terminal = a.status.known().is_some_and(ActionStatus::is_terminal);
        let message = format!(
            "Action {} ({}) on machine {} is {}{}.",
            a.id,
            a.action_type,
            // Defender's free text, on the message's one line.
            crate::service::shown_text::one_line(
                a.computer_dns_name
                    .as_deref()
                    .or(a.machine_id.as_ref().map(MachineId::as_str))
                    .unwrap_or("(unknown)")
            ),
            a.status,
            if terminal {
                ", which is final"
            } else {
                "; poll again later"
            }
        );
        Self {
            action_id: a.id.clone(),
            action_type: a.action_type.clone(),
            status: a.status.clone(),
            terminal,
            machine_id: a.machine_id.clone(),
            computer_dns_name: a.computer_dns_name.clone(),
            requestor_comment: a.requestor_comment.clone(),
            creation_date_time_utc: a.creation_date_time_utc,
            last_update_date_time_utc: a.last_update_date_time_utc,
            message,
            action: found.to_json(),
            invocation_id: invocation_id.to_owned(),
        }
    }
}
