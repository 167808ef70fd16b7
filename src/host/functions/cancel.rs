//! `cancel-action`: `POST /api/restrict-code-execution/actions/{actionId}/cancel`
//! with an optional `{"comment": "..."}`.
//!
//! The cancel itself is [`crate::service::restrict::Restrictor::cancel`]: only
//! restrict and unrestrict actions, 409 for a finished one. The answer carries
//! the status Defender reports after the cancel, with `terminal: false` until
//! the action is final (a cancel need not take effect at once).

use http::StatusCode;
use tokio::time::Instant;

use crate::{
    defender::ActionRecord,
    host::{
        app_state::AppState,
        error::ApiError,
        functions::{Record, action_id, status::StatusBody},
        invocation::Invocation,
        reply::Reply,
    },
    service::runbook::{CallerName, Comment, parse_cancel_comment},
};

const DEFAULT_COMMENT: &str = "Cancelled through restrict-code-execution.";

pub async fn run(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let cancelled = cancel(state, invocation).await?;
    let body = StatusBody::new(&cancelled, &invocation.id);
    // Defender may take a while to apply a cancel: the answer carries
    // the status it reports, and says "requested" until it is final.
    let (headline, outcome) = if body.terminal {
        ("Cancelled.", "cancelled")
    } else {
        ("Cancellation requested.", "cancel_requested")
    };
    body.note(record, outcome);
    Ok(Reply::new(
        StatusCode::OK,
        invocation.format(),
        &body,
        || format!("{headline} {}\n", body.message),
        format!("{headline} {}", body.message),
    ))
}

async fn cancel(state: &AppState, invocation: &Invocation) -> Result<ActionRecord, ApiError> {
    let id = action_id(invocation.params.get("actionId"))?;
    let comment = parse_cancel_comment(&invocation.body)?;
    let caller = invocation.principal().and_then(|p| p.name).and_then(|n| {
        CallerName::parse(Some(&serde_json::Value::String(n)))
            .ok()
            .flatten()
    });
    let comment = comment.map_or_else(
        || Comment::parse(Some(&serde_json::json!(DEFAULT_COMMENT))),
        Ok,
    )?;
    let deadline = Instant::now() + state.request_timeout();
    Ok(state
        .restrictor()
        .cancel(&id, &comment, caller.as_ref(), deadline)
        .await?)
}
