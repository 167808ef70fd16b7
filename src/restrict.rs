//! Restrict or release one device: find its machine, then ask Defender to act.

use serde::Serialize;
use serde_json::Value;

use crate::{
    defender::{
        DefenderClient, DefenderError,
        models::{ActionType, Machine},
    },
    error::ApiError,
    runbook::{CallerName, Comment, DeviceRef, RunbookRequest},
    selection::{self, NoChoice},
};

/// Restricts and releases devices through one Defender client.
#[derive(Debug, Clone)]
pub struct Restrictor {
    client: DefenderClient,
    /// Append `(requested by <caller>)` to the comment (setting `COMMENT_INCLUDE_CALLER`).
    include_caller: bool,
}

/// What happened, as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A new machine action was created.
    Requested,
    /// Defender refused a duplicate ("Action is already in progress"); the
    /// pending action of the same type is returned instead.
    AlreadyPending,
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
}

impl Restrictor {
    pub fn new(client: DefenderClient, include_caller: bool) -> Self {
        Self {
            client,
            include_caller,
        }
    }

    pub async fn run(&self, request: &RunbookRequest) -> Result<Success, ApiError> {
        let (machine, candidates) = self.find_machine(&request.device).await?;
        let action_type = action_type(request.release);
        let comment = comment_for_defender(
            &request.comment,
            request.caller.as_ref(),
            self.include_caller,
        );
        match self
            .client
            .create_action(&machine.id, action_type, &comment)
            .await
        {
            Ok(created) => Ok(Success {
                outcome: Outcome::Requested,
                machine,
                candidates,
                action_id: created.action.id.clone(),
                action_status: created.action.status.clone(),
                action: created.raw,
            }),
            Err(e) if e.is_already_in_progress() => {
                self.pending_action(machine, candidates, action_type).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Find the same-type action Defender says is already in progress.
    async fn pending_action(
        &self,
        machine: Machine,
        candidates: usize,
        action_type: ActionType,
    ) -> Result<Success, ApiError> {
        let actions = self
            .client
            .machine_actions(&machine.id, action_type)
            .await?;
        let pending = actions.iter().find(|a| {
            a.typed_type() == Some(action_type)
                && a.typed_status().is_some_and(|s| !s.is_terminal())
                && a.machine_id
                    .as_deref()
                    .is_none_or(|id| id.eq_ignore_ascii_case(&machine.id))
        });
        let Some(pending) = pending else {
            return Err(ApiError::Defender(format!(
                "Defender answered \"Action is already in progress\" for {} on machine {}, but \
                 lists no pending {} action for it. No action was created; retry in a minute.",
                action_type.as_str(),
                machine.id,
                action_type.as_str()
            )));
        };
        let raw = serde_json::to_value(pending).unwrap_or(Value::Null);
        Ok(Success {
            outcome: Outcome::AlreadyPending,
            machine,
            candidates,
            action_id: pending.id.clone(),
            action_status: pending.status.clone(),
            action: raw,
        })
    }

    async fn find_machine(&self, device: &DeviceRef) -> Result<(Machine, usize), ApiError> {
        match device {
            DeviceRef::AadDevice(id) => {
                let records = self.client.machines_by_aad_device(*id).await?;
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
            DeviceRef::Machine(id) => match self.client.machine(id).await? {
                None => Err(ApiError::DeviceNotFound(format!(
                    "Defender has no machine with id {id}."
                ))),
                // GET /machines/{id} also matches computer names; insist on the id.
                Some(m) if !m.id.eq_ignore_ascii_case(id) => Err(DefenderError::Protocol {
                    operation: crate::defender::Operation::GetMachine,
                    reason: format!("asked for machine {id}, got machine {}", m.id),
                }
                .into()),
                Some(m) => Ok((m, 1)),
            },
        }
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
