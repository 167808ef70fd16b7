//! What can go wrong talking to Defender, before it is mapped to an HTTP answer.

use std::time::Duration;

use thiserror::Error;

use crate::auth::TokenError;

/// The Defender call an error came from. It decides whether an action may exist
/// after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ListMachines,
    GetMachine,
    CreateAction,
    ListActions,
}

impl Operation {
    pub fn describe(self) -> &'static str {
        match self {
            Self::ListMachines => "listing machines",
            Self::GetMachine => "reading the machine",
            Self::CreateAction => "creating the machine action",
            Self::ListActions => "listing the machine's actions",
        }
    }

    /// A POST that failed without a clear answer may still have created an action.
    pub fn may_have_acted(self) -> bool {
        matches!(self, Self::CreateAction)
    }
}

impl DefenderError {
    /// Defender's "Action is already in progress" answer to a duplicate request.
    /// The code is undocumented; peers match either the code or the message.
    pub fn is_already_in_progress(&self) -> bool {
        matches!(self, Self::Status { status: 400, code, message, .. }
            if code == "ActiveRequestAlreadyExists"
                || message.to_ascii_lowercase().contains("already in progress"))
    }
}

/// A failed Defender call.
#[derive(Debug, Error)]
pub enum DefenderError {
    /// Defender answered with a non-success status.
    #[error("Defender answered {status} while {}: {code} {message}", operation.describe())]
    Status {
        operation: Operation,
        status: u16,
        /// `error.code` from Defender's envelope, empty when there was none.
        code: String,
        message: String,
        /// Defender's correlation id, for Microsoft support.
        target: Option<String>,
        retry_after: Option<Duration>,
    },
    /// No answer within the call's timeout.
    #[error("Defender did not answer within {} s while {}", timeout.as_secs(), operation.describe())]
    Timeout {
        operation: Operation,
        timeout: Duration,
    },
    /// The connection failed or was dropped.
    #[error("the connection to Defender failed while {}: {reason}", operation.describe())]
    Transport {
        operation: Operation,
        reason: String,
    },
    /// Defender answered success with a body we cannot read.
    #[error("Defender's answer could not be read while {}: {reason}", operation.describe())]
    Decode {
        operation: Operation,
        reason: String,
    },
    /// Defender answered something that breaks its own contract.
    #[error("Defender's answer was unexpected while {}: {reason}", operation.describe())]
    Protocol {
        operation: Operation,
        reason: String,
    },
    /// No token, so nothing was sent.
    #[error(transparent)]
    Token(#[from] TokenError),
}
