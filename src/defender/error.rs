//! What can go wrong talking to Defender, before it is mapped to an HTTP answer.

use std::{error::Error as StdError, sync::Arc, time::Duration};

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
    /// The caller's hook, or the rate budget, refused to let the call go
    /// out ([`super::client::BeforeSend`]): nothing was sent. The refusal is
    /// the caller's own error, for the caller to map.
    #[error("{refusal} (before {})", endpoint.describe())]
    Refused {
        endpoint: Endpoint,
        refusal: Refusal,
    },
    /// The invocation's deadline passed before the call could be made.
    #[error("the invocation ran out of time before {}", endpoint.describe())]
    OutOfTime { endpoint: Endpoint },
}

/// Why a call was not sent: the error of the layer that refused it (its
/// hook, or a budget shared through it), carried through the client
/// untouched. The client neither reads nor words it; the layer that
/// refused gets its own error back with [`Refusal::downcast_ref`].
#[derive(Debug, Clone, Error)]
#[error(transparent)]
pub struct Refusal(Arc<dyn StdError + Send + Sync>);

impl Refusal {
    pub fn new(cause: impl StdError + Send + Sync + 'static) -> Self {
        Self(Arc::new(cause))
    }

    /// The refusing layer's error, if it is an `E`.
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}
