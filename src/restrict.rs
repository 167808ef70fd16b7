//! Restrict or release one device: find its machine, read its recent actions,
//! decide (see [`crate::decision`]), and only then act.
//!
//! Safety rules, each with a test in `tests/api/safety.rs`:
//! - read before write, under a per-machine lock, so duplicates coalesce and
//!   opposite actions cannot finish out of order;
//! - a POST is never blindly re-sent: after an ambiguous failure the machine's
//!   actions are read again, and the POST is repeated only if no new action of
//!   that type appeared.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    decision::{self, Decision, Wanted},
    defender::{
        DefenderClient, DefenderError, Operation,
        models::{ActionType, Machine, MachineAction},
    },
    error::ApiError,
    machine_locks::MachineLocks,
    runbook::{CallerName, Comment, DeviceRef, RunbookRequest},
    selection::{self, NoChoice},
};

/// POSTs of one action per invocation at most: the first, and re-sends after
/// ambiguous failures that left no action behind.
const MAX_POSTS: usize = 3;
/// Pause before re-reading after an ambiguous POST, so that an action
/// Defender committed late is seen rather than duplicated.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Restricts and releases devices through one Defender client.
#[derive(Debug)]
pub struct Restrictor {
    client: DefenderClient,
    /// Append `(requested by <caller>)` to the comment (setting `COMMENT_INCLUDE_CALLER`).
    include_caller: bool,
    locks: MachineLocks,
}

/// What happened, as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A new machine action was created.
    Requested,
    /// A same-type action is still pending; it is returned, nothing was sent.
    AlreadyPending,
    /// The newest successful action already did what is asked; nothing was sent.
    AlreadyInState,
}

impl Outcome {
    /// The name used in answers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::AlreadyPending => "already_pending",
            Self::AlreadyInState => "already_in_state",
        }
    }
}

/// A successful invocation.
#[derive(Debug, Clone)]
pub struct Success {
    pub outcome: Outcome,
    pub machine: Machine,
    /// How many Defender records matched the device.
    pub candidates: usize,
    /// The machine action exactly as Defender returned it.
    pub action: Value,
    pub action_id: String,
    pub action_status: String,
    /// Pending opposite-type actions cancelled first (`cancelPending`).
    pub cancelled: Vec<String>,
}

impl Success {
    /// Whether the returned action is finished (Succeeded, Failed, TimeOut, Cancelled).
    pub fn terminal(&self) -> bool {
        crate::defender::models::ActionStatus::parse(&self.action_status)
            .is_some_and(|s| s.is_terminal())
    }

    /// Poll the action until it is finished or `until` passes; keep the last state.
    /// Polls every [`POLL_EVERY`]: reads draw from the same hourly budget.
    pub async fn wait_until_terminal(
        &mut self,
        client: &DefenderClient,
        until: Instant,
    ) -> Result<(), ApiError> {
        // The last poll is at `until`, so a wait shorter than the interval
        // still reads the action once more before answering.
        while !self.terminal() && Instant::now() < until {
            let next = (Instant::now() + POLL_EVERY).min(until);
            tokio::time::sleep_until(next).await;
            // Give the read a second past `until` to come back.
            let read_by = until + std::time::Duration::from_secs(1);
            match client.action(&self.action_id, read_by).await? {
                Some(latest) => {
                    self.action_status = latest.action.status.clone();
                    self.action = latest.raw;
                }
                None => break,
            }
        }
        Ok(())
    }
}

/// How often `wait` polls the action (Defender allows 100 reads a minute).
pub const POLL_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Restrictor {
    pub fn new(client: DefenderClient, include_caller: bool) -> Self {
        Self {
            client,
            include_caller,
            locks: MachineLocks::default(),
        }
    }

    /// The Defender client, for the status and cancel functions.
    pub fn client(&self) -> &DefenderClient {
        &self.client
    }

    /// Whether the caller's name is appended to comments sent to Defender.
    pub fn include_caller(&self) -> bool {
        self.include_caller
    }

    /// Restrict or release `device` as `request` asks.
    pub async fn run(
        &self,
        device: &DeviceRef,
        request: &RunbookRequest,
        deadline: Instant,
    ) -> Result<Success, ApiError> {
        let (machine, candidates) = self.find_machine(device, deadline).await?;
        let wanted = Wanted {
            action: action_type(request.release),
            force: request.force,
            cancel_pending: request.cancel_pending,
        };
        let comment = comment_for_defender(
            &request.comment,
            request.caller.as_ref(),
            self.include_caller,
        );

        let _one_decision_at_a_time = tokio::time::timeout_at(
            deadline,
            self.locks.lock(&machine.id),
        )
        .await
        .map_err(|_| {
            ApiError::Timeout(format!(
                "another invocation for machine {} held it until the time budget ran out. No \
                     action was created by this invocation.",
                machine.id
            ))
        })?;

        let mut cancelled = Vec::new();
        // Cancel at most once: a second round that still sees a pending
        // opposite action reports the conflict.
        let mut cancel_round_done = false;
        let mut actions = self
            .client
            .machine_actions(&machine.id, deadline, None)
            .await?
            .actions;
        loop {
            let decision = decision::decide(
                &machine.id,
                &actions,
                Wanted {
                    cancel_pending: wanted.cancel_pending && !cancel_round_done,
                    ..wanted
                },
            );
            let found = |outcome, action: MachineAction, cancelled| {
                Ok(Success::from_listed(
                    outcome,
                    machine.clone(),
                    candidates,
                    action,
                    cancelled,
                ))
            };
            match decision {
                Decision::Conflict(action) => {
                    return Err(ApiError::ConflictingActionPending {
                        machine_id: machine.id.clone(),
                        action_id: action.id,
                        action_type: action.action_type,
                        status: action.status,
                    });
                }
                Decision::AlreadyPending(action) => {
                    return found(Outcome::AlreadyPending, action, cancelled);
                }
                Decision::AlreadyInState(action) => {
                    return found(Outcome::AlreadyInState, action, cancelled);
                }
                Decision::Act => {
                    let ids: HashSet<String> = actions.into_iter().map(|a| a.id).collect();
                    return self
                        .act(&machine, candidates, wanted.action, &comment, ids, deadline)
                        .await
                        .map(|mut success| {
                            success.cancelled = cancelled;
                            success
                        });
                }
                Decision::Cancel(pending) => {
                    let why = format!("Cancelled to apply {}: {comment}", wanted.action.as_str());
                    for action in pending {
                        // `false`: it finished meanwhile; the re-read decides.
                        if self.cancel(&action, &why, deadline).await? {
                            cancelled.push(action.id);
                        }
                    }
                    cancel_round_done = true;
                    // The state may have moved while cancelling: read it again.
                    actions = self
                        .client
                        .machine_actions(&machine.id, deadline, None)
                        .await?
                        .actions;
                }
            }
        }
    }

    /// Create the action. After an ambiguous failure, look for the action it
    /// may have created; re-send only when there is none.
    async fn act(
        &self,
        machine: &Machine,
        candidates: usize,
        action_type: ActionType,
        comment: &str,
        mut known: HashSet<String>,
        deadline: Instant,
    ) -> Result<Success, ApiError> {
        let mut posts = 0;
        loop {
            posts += 1;
            let error = match self
                .client
                .create_action(&machine.id, action_type, comment, deadline)
                .await
            {
                Ok(created) => {
                    return Ok(Success {
                        outcome: Outcome::Requested,
                        machine: machine.clone(),
                        candidates,
                        action_id: created.action.id.clone(),
                        action_status: created.action.status.clone(),
                        action: created.raw,
                        cancelled: Vec::new(),
                    });
                }
                Err(e) => e,
            };

            if error.is_already_in_progress() {
                return self
                    .already_pending(machine, candidates, action_type, deadline)
                    .await;
            }
            if !error.is_ambiguous() {
                return Err(error.into());
            }

            // Did the POST land? Give Defender a moment to record it, then
            // read the actions again (GETs are retried).
            tracing::warn!(error = %error, "creating the action failed ambiguously; checking whether it exists");
            let settle = Instant::now() + SETTLE;
            if settle < deadline {
                tokio::time::sleep_until(settle).await;
            }
            let actions = match self
                .client
                .machine_actions(&machine.id, deadline, None)
                .await
            {
                Ok(listing) => listing.actions,
                Err(reread) => {
                    tracing::warn!(error = %reread, "could not re-read the machine's actions");
                    return Err(error.into());
                }
            };
            if let Some(landed) = actions
                .iter()
                .find(|a| a.typed_type() == Some(action_type) && !known.contains(&a.id))
            {
                tracing::info!(action_id = %landed.id, "the action was created despite the failed answer");
                return Ok(Success::from_listed(
                    Outcome::Requested,
                    machine.clone(),
                    candidates,
                    landed.clone(),
                    Vec::new(),
                ));
            }
            if posts >= MAX_POSTS || Instant::now() >= deadline {
                return Err(not_created(&error));
            }
            known.extend(actions.into_iter().map(|a| a.id));
        }
    }

    /// Defender refused a duplicate: find the same-type action it says is pending.
    async fn already_pending(
        &self,
        machine: &Machine,
        candidates: usize,
        action_type: ActionType,
        deadline: Instant,
    ) -> Result<Success, ApiError> {
        let actions = self
            .client
            .machine_actions(&machine.id, deadline, None)
            .await?
            .actions;
        let pending = actions.into_iter().find(|a| {
            a.typed_type() == Some(action_type)
                && a.typed_status().is_some_and(|s| !s.is_terminal())
        });
        match pending {
            Some(action) => Ok(Success::from_listed(
                Outcome::AlreadyPending,
                machine.clone(),
                candidates,
                action,
                Vec::new(),
            )),
            None => Err(ApiError::Defender(format!(
                "Defender answered \"Action is already in progress\" for {} on machine {}, but \
                 lists no pending {} action for it. No action was created; retry in a minute.",
                action_type.as_str(),
                machine.id,
                action_type.as_str()
            ))),
        }
    }

    /// Cancel one action; `false` when it had reached a final state meanwhile
    /// (the re-read that follows decides what now).
    async fn cancel(
        &self,
        action: &MachineAction,
        comment: &str,
        deadline: Instant,
    ) -> Result<bool, ApiError> {
        match self
            .client
            .cancel_action(&action.id, comment, deadline)
            .await
        {
            Ok(cancelled) => {
                tracing::info!(action_id = %cancelled.action.id, status = %cancelled.action.status, "cancelled a pending opposite action");
                Ok(true)
            }
            Err(DefenderError::Status { status: 400, .. }) => Ok(false),
            Err(e) => Err(ApiError::from(e)),
        }
    }

    async fn find_machine(
        &self,
        device: &DeviceRef,
        deadline: Instant,
    ) -> Result<(Machine, usize), ApiError> {
        match device {
            DeviceRef::AadDevice(id) => {
                let records = self.client.machines_by_aad_device(*id, deadline).await?;
                match selection::choose(*id, records) {
                    Ok(choice) => Ok((choice.machine, choice.candidates)),
                    Err(NoChoice::NoRecords) => Err(ApiError::DeviceNotFound(format!(
                        "Defender has no machine whose aadDeviceId is {id}. The device may not be \
                         onboarded to Defender for Endpoint, may be outside the data retention, or \
                         may not report its Entra device id; pass its 40-character Defender \
                         machine id as deviceId instead."
                    ))),
                    Err(NoChoice::AllMerged { merged_into }) => {
                        Err(ApiError::DeviceNotFound(format!(
                            "every Defender record for aadDeviceId {id} was merged into another \
                             machine ({}); pass the surviving machine id as deviceId.",
                            merged_into.join(", ")
                        )))
                    }
                }
            }
            DeviceRef::Machine(id) => match self.client.machine(id, deadline).await? {
                None => Err(ApiError::DeviceNotFound(format!(
                    "Defender has no machine with id {id}."
                ))),
                // GET /machines/{id} also matches computer names; insist on the id.
                Some(m) if !m.id.eq_ignore_ascii_case(id) => Err(DefenderError::Protocol {
                    operation: Operation::GetMachine,
                    reason: format!("asked for machine {id}, got machine {}", m.id),
                }
                .into()),
                // A merged record is stale: acting on it would not reach the device.
                Some(m)
                    if m.merged_into_machine_id
                        .as_deref()
                        .is_some_and(|s| !s.trim().is_empty()) =>
                {
                    Err(ApiError::DeviceNotFound(format!(
                        "Defender machine {id} was merged into machine {}; pass that id as \
                         deviceId.",
                        m.merged_into_machine_id.unwrap_or_default()
                    )))
                }
                Some(m) => Ok((m, 1)),
            },
        }
    }
}

impl Success {
    fn from_listed(
        outcome: Outcome,
        machine: Machine,
        candidates: usize,
        action: MachineAction,
        cancelled: Vec<String>,
    ) -> Self {
        Self {
            outcome,
            machine,
            candidates,
            action_id: action.id.clone(),
            action_status: action.status.clone(),
            // The typed action keeps every field it was given (`extra`), so
            // this is the record as Defender listed it.
            action: serde_json::to_value(&action).unwrap_or(Value::Null),
            cancelled,
        }
    }
}

/// The POST failed ambiguously, and re-reading showed it created nothing.
fn not_created(error: &DefenderError) -> ApiError {
    let detail = format!(
        "{error}. Re-reading the machine's actions showed that no action was created; it is \
         safe to retry."
    );
    match error {
        DefenderError::Timeout { .. } => ApiError::Timeout(detail),
        _ => ApiError::Defender(detail),
    }
}

pub fn action_type(release: bool) -> ActionType {
    if release {
        ActionType::UnrestrictCodeExecution
    } else {
        ActionType::RestrictCodeExecution
    }
}

/// Defender records the app, not the person, as requestor; the comment is the
/// only place the human caller can be kept.
pub fn comment_for_defender(
    comment: &Comment,
    caller: Option<&CallerName>,
    include_caller: bool,
) -> String {
    match caller {
        Some(caller) if include_caller => {
            format!("{} (requested by {})", comment.as_str(), caller.as_str())
        }
        _ => comment.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn caller_is_appended_unless_turned_off() {
        let comment = Comment::parse(Some(&json!("Ticket 42"))).unwrap();
        let caller = CallerName::parse(Some(&json!("alice@contoso.com"))).unwrap();
        assert_eq!(
            comment_for_defender(&comment, caller.as_ref(), true),
            "Ticket 42 (requested by alice@contoso.com)"
        );
        assert_eq!(
            comment_for_defender(&comment, caller.as_ref(), false),
            "Ticket 42"
        );
        assert_eq!(comment_for_defender(&comment, None, true), "Ticket 42");
    }
}
