//! Why coordination could not give an invocation what it asked for.
//!
//! Every storage failure fails closed: the caller gets an error and sends
//! nothing to Defender. The texts name what happened (status, storage error
//! code, "timed out", "connection refused") and never carry a key, a SAS or a
//! token: they are built here from parts, never from the SDK's own error text,
//! which can quote the request URL and with it a SAS.

use std::time::Duration;

use thiserror::Error;

/// A coordination call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoordinationError {
    /// Storage could not be used: unreachable, timing out, throttling (429,
    /// 503), failing (5xx) or refusing our credentials. Nothing may be sent to
    /// Defender; the caller answers 503 `coordination_unavailable` with
    /// `Retry-After: retry_after`.
    #[error(
        "coordination storage is unavailable ({reason}); nothing was sent to Defender. Retry \
         after {} s",
        retry_after.as_secs()
    )]
    Unavailable {
        retry_after: Duration,
        reason: String,
    },
    /// Another invocation (on this or another instance) held the machine's
    /// lease until the caller's deadline.
    #[error(
        "another invocation for machine {machine_id} held its lease until the time budget ran \
         out; nothing was sent to Defender"
    )]
    LockTimeout { machine_id: String },
    /// The shared budget's next free slot for the endpoint is later than the
    /// caller's deadline. Nothing was reserved.
    #[error("the shared Defender budget for {bucket} is spent; the next slot is in {} s", wait.as_secs())]
    OverBudget { bucket: String, wait: Duration },
}

impl CoordinationError {
    /// How long the caller should tell its client to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => Some(*retry_after),
            Self::OverBudget { wait, .. } => Some(*wait),
            Self::LockTimeout { .. } => None,
        }
    }
}
