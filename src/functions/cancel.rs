//! `cancel-action`: `POST /api/restrict-code-execution/actions/{actionId}/cancel`
//! with an optional `{"comment": "..."}`.
//!
//! Only restrict and unrestrict actions are cancelled here (the permission
//! would allow cancelling any type; this tool does not). A finished action
//! gives 409 with its status. The answer carries the status Defender reports
//! after the cancel, with `terminal: false` until the action is final (a
//! cancel need not take effect at once).

use http::StatusCode;
use tokio::time::Instant;

use crate::{
    app_state::AppState,
    defender::{ActionRecord, DefenderError, models::ActionStatus},
    error::ApiError,
    functions::{Record, action_id, status::StatusBody},
    invocation::Invocation,
    reply::Reply,
    restrict::comment_for_defender,
    runbook::{CallerName, Comment, parse_cancel_comment},
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
    let restrictor = state.restrictor();
    let comment = comment_for_defender(&comment, caller.as_ref(), restrictor.include_caller());
    let client = restrictor.client();
    let deadline = Instant::now() + state.request_timeout();

    let current = client
        .action(&id, deadline)
        .await?
        .ok_or_else(|| ApiError::ActionNotFound(id.clone()))?;
    if current.action.typed_type().is_none() {
        return Err(ApiError::UnsupportedActionType {
            action_id: id,
            action_type: current.action.action_type,
        });
    }
    check_pending(&current)?;

    match client.cancel_action(&id, &comment, deadline).await {
        Ok(cancelled) => Ok(cancelled),
        // Finished meanwhile (400), or the answer was lost: read the action again.
        Err(e) if e.is_ambiguous() || matches!(e, DefenderError::Status { status: 400, .. }) => {
            let latest = client
                .action(&id, deadline)
                .await?
                .ok_or_else(|| ApiError::ActionNotFound(id.clone()))?;
            if latest.action.status == ActionStatus::Cancelled.as_str() {
                return Ok(latest);
            }
            check_pending(&latest)?;
            match e {
                // Defender says it cannot be cancelled, while the read still
                // shows it pending: it is being finished (reads lag behind).
                DefenderError::Status {
                    status: 400,
                    message,
                    ..
                } => Err(ApiError::CancelRefused {
                    action_id: id,
                    status: latest.action.status,
                    message,
                }),
                e => Err(ApiError::from(e)),
            }
        }
        Err(e) => Err(ApiError::from(e)),
    }
}

fn check_pending(found: &ActionRecord) -> Result<(), ApiError> {
    match ActionStatus::parse(&found.action.status) {
        Some(status) if status.is_terminal() => Err(ApiError::ActionNotPending {
            action_id: found.action.id.clone(),
            status: found.action.status.clone(),
        }),
        _ => Ok(()),
    }
}
