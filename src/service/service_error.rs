//! What can go wrong in the domain service ([`super::restrict::Restrictor`]),
//! as facts about the device and its actions. `From<ServiceError> for
//! ApiError` (in [`crate::host::error`]) turns each into its problem answer,
//! with all the prose a caller reads.

use thiserror::Error;

use crate::{
    coordination::CoordinationError,
    defender::{
        DefenderError,
        models::{ActionStatus, ActionType, MachineAction, OrOther},
    },
};

/// A call the coordination refused to let go out (the shared budget or the
/// machine's lease could not be used) is a coordination failure, not
/// Defender's.
impl From<DefenderError> for ServiceError {
    fn from(e: DefenderError) -> Self {
        match &e {
            DefenderError::Refused { refusal, .. } => {
                match refusal.downcast_ref::<CoordinationError>() {
                    Some(coordination) => Self::Coordination(coordination.clone()),
                    None => Self::Defender(e),
                }
            }
            _ => Self::Defender(e),
        }
    }
}

/// Why the service did not do what was asked. `Clone`, because one failed
/// round answers every job queued in it.
#[derive(Debug, Clone, Error)]
pub enum ServiceError {
    /// No Defender machine can be acted on for the device; says why.
    #[error("{0}")]
    DeviceNotFound(String),
    #[error(transparent)]
    Defender(DefenderError),
    /// The machine's `osPlatform` is known not to support the action:
    /// nothing was sent ([`super::platform`]).
    #[error("machine {machine_id} runs {os_platform}, which cannot restrict app execution")]
    UnsupportedPlatform {
        machine_id: String,
        os_platform: String,
    },
    /// The instances' coordination through storage failed: nothing was sent.
    #[error(transparent)]
    Coordination(#[from] CoordinationError),
    /// A pending action on the machine stands in the way of the one asked
    /// for; `created_meanwhile` when another request created it after this
    /// one arrived (which `cancelPending` does not cancel).
    #[error("machine {machine_id} has a conflicting action {} pending", action.id)]
    ConflictingActionPending {
        machine_id: String,
        action: Box<MachineAction>,
        created_meanwhile: bool,
    },
    /// `cancelPending` cancelled `action`, but no read showed it final in time.
    #[error("the cancelled action {} on machine {machine_id} is not final yet", action.id)]
    CancelNotFinal {
        machine_id: String,
        action: Box<MachineAction>,
    },
    #[error("Defender has no machine action with id {0}")]
    ActionNotFound(String),
    /// The action to cancel is already final.
    #[error("action {action_id} is {status}, which is final")]
    ActionNotPending {
        action_id: String,
        status: OrOther<ActionStatus>,
    },
    /// Defender answered 400 to the cancel of an action a read still shows
    /// as pending.
    #[error("Defender refused to cancel action {action_id}: {message}")]
    CancelRefused {
        action_id: String,
        status: OrOther<ActionStatus>,
        message: String,
    },
    /// Only restrict and unrestrict actions are cancelled here.
    #[error("action {action_id} is of type {action_type}")]
    UnsupportedActionType {
        action_id: String,
        action_type: OrOther<ActionType>,
    },
    /// Defender answered the read of one action with another.
    #[error("Defender answered the read of action {asked} with action {answered}")]
    OtherActionAnswered { asked: String, answered: String },
    /// Defender answered a POST for `action` on `machine_id` with an action
    /// for another machine or of another type. It is not taken as this
    /// request's action.
    #[error("Defender answered the {} for machine {machine_id} with {} action {}", action.as_str(), answered.action_type, answered.id)]
    OtherActionCreated {
        machine_id: String,
        action: ActionType,
        answered: Box<MachineAction>,
    },
    /// The handler is shutting down and this invocation had sent nothing yet:
    /// it is refused rather than started.
    #[error("the handler is shutting down; nothing was sent")]
    ShuttingDown,
    /// Defender refused a duplicate as "already in progress", but lists no
    /// pending action of that type for the machine. Nothing was created.
    #[error("Defender lists no pending {} on machine {machine_id}", action.as_str())]
    InProgressNoneListed {
        machine_id: String,
        action: ActionType,
    },
    /// A POST failed without a clear answer, and re-reading the machine's
    /// actions showed it created nothing.
    #[error("{0}; no action was created")]
    NotCreated(DefenderError),
    /// The round serving the machine stopped without answering.
    #[error("the round serving this machine stopped unexpectedly")]
    RoundStopped,
    /// Other invocations held the machine until the deadline; nothing was sent.
    #[error("other invocations held machine {machine_id} until the deadline")]
    QueuedPastDeadline { machine_id: String },
    /// The deadline passed while acting: an action may or may not exist.
    #[error("the deadline passed while acting on machine {machine_id}")]
    ActingPastDeadline { machine_id: String },
}
