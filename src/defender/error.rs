//! What can go wrong talking to Defender, before it is mapped to an HTTP answer.

use std::time::Duration;

use thiserror::Error;

use super::{api::Endpoint, auth::TokenError};

impl DefenderError {
    /// Defender's "Action is already in progress" answer to a duplicate request.
    /// The code is undocumented; peers match either the code or the message.
    pub fn is_already_in_progress(&self) -> bool {
        matches!(self, Self::Status { status: 400, code, message, .. }
            if code == "ActiveRequestAlreadyExists"
                || message.to_ascii_lowercase().contains("already in progress"))
    }

    /// Failures after which the same request may well succeed: 5xx, a timeout,
    /// a dropped connection, an unreadable body.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500,
            Self::Timeout { .. } | Self::Transport { .. } | Self::Decode { .. } => true,
            _ => false,
        }
    }

    /// A failure after which a POST may or may not have been executed.
    pub fn is_ambiguous(&self) -> bool {
        self.is_transient()
    }
}

/// A failed Defender call. `Clone`, because one shared read can fail many
/// invocations at once.
#[derive(Debug, Clone, Error)]
pub enum DefenderError {
    /// Defender answered with a non-success status.
    #[error("Defender answered {status} while {}: {code} {message}", endpoint.describe())]
    Status {
        endpoint: Endpoint,
        status: u16,
        /// `error.code` from Defender's envelope, empty when there was none.
        code: String,
        message: String,
        /// Defender's correlation id, for Microsoft support.
        target: Option<String>,
        retry_after: Option<Duration>,
    },
    /// No answer within the call's timeout.
    #[error("Defender did not answer within {} s while {}", timeout.as_secs(), endpoint.describe())]
    Timeout {
        endpoint: Endpoint,
        timeout: Duration,
    },
    /// The connection failed or was dropped.
    #[error("the connection to Defender failed while {}: {reason}", endpoint.describe())]
    Transport { endpoint: Endpoint, reason: String },
    /// Defender answered success with a body we cannot read.
    #[error("Defender's answer could not be read while {}: {reason}", endpoint.describe())]
    Decode { endpoint: Endpoint, reason: String },
    /// Defender answered something that breaks its own contract.
    #[error("Defender's answer was unexpected while {}: {reason}", endpoint.describe())]
    Protocol { endpoint: Endpoint, reason: String },
    /// No token, so nothing was sent.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The client-side rate budget has no slot before the invocation's deadline.
    #[error("the rate budget for {} has no free slot for {} s", endpoint.describe(), wait.as_secs())]
    OverBudget { endpoint: Endpoint, wait: Duration },
    /// The budget shared by every instance (`COORDINATION=storage`) could not
    /// be consulted, so the call was not sent.
    #[error("the shared Defender budget could not be consulted before {}: {reason}", endpoint.describe())]
    CoordinationUnavailable {
        endpoint: Endpoint,
        retry_after: Duration,
        reason: String,
    },
    /// The invocation's deadline passed before the call could be made.
    #[error("the invocation ran out of time before {}", endpoint.describe())]
    OutOfTime { endpoint: Endpoint },
}
