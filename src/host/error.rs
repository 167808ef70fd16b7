//! Every way an invocation can fail, mapped once to an HTTP problem answer.
//!
//! Answers are RFC 9457 `application/problem+json` with a stable `code` that
//! scripts and Logic Apps can branch on; the README's troubleshooting table
//! lists every code. The `detail` says what happened and what to do; it never
//! carries a token.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;
use thiserror::Error;

use crate::{
    coordination::CoordinationError,
    defender::{
        DefenderError, Endpoint,
        auth::TokenError,
        models::{ActionStatus, ActionType, OrOther},
    },
    service::{runbook::RunbookError, service_error::ServiceError},
};

/// The two app roles the identity needs on WindowsDefenderATP.
pub const REQUIRED_ROLES: &str = "Machine.Read.All and Machine.RestrictExecution";

/// Every `code` an answer can carry (the OpenAPI document and the README's
/// troubleshooting table list the same; a test checks they agree).
pub const CODES: &[&str] = &[
    "invalid_request",
    "payload_too_large",
    "invalid_envelope",
    "device_not_found",
    "conflicting_action_pending",
    "unsupported_device",
    "rate_limited",
    "defender_forbidden",
    "defender_feature_disabled",
    "authentication_failed",
    "defender_error",
    "defender_timeout",
    "action_not_found",
    "action_not_pending",
    "unsupported_action_type",
    "caller_forbidden",
    "route_not_found",
    "method_not_allowed",
    "shutting_down",
    "job_not_found",
    "too_many_devices",
    "no_devices_matched",
];

/// An invocation that did not succeed.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidRequest(#[from] RunbookError),
    #[error("the host's invocation envelope is malformed: {0}")]
    InvalidEnvelope(String),
    #[error("{0}")]
    DeviceNotFound(String),
    #[error("{}", conflict_detail(machine_id, action_id, action_type, status, *created_meanwhile))]
    ConflictingActionPending {
        machine_id: String,
        action_id: String,
        action_type: OrOther<ActionType>,
        status: OrOther<ActionStatus>,
        /// The action was created by another request after this one arrived,
        /// which `cancelPending` does not cancel.
        created_meanwhile: bool,
    },
    /// `cancelPending` cancelled the opposite action, but no read showed it
    /// final before the invocation's time ran out.
    #[error(
        "the {action_type} action {action_id} on machine {machine_id} was cancelled, but Defender \
         still reports it {status}: a cancel is not final until Defender says so. No action was \
         created; send the request again once the action is Cancelled (the status route shows it)."
    )]
    CancelNotFinal {
        machine_id: String,
        action_id: String,
        action_type: OrOther<ActionType>,
        status: OrOther<ActionStatus>,
    },
    #[error("Defender does not support this action on the device: {message}")]
    UnsupportedDevice { code: String, message: String },
    #[error("Defender is rate limiting this app; retry after {} s", retry_after.as_secs())]
    RateLimited {
        retry_after: Duration,
        detail: String,
    },
    /// `COORDINATION=storage` and the storage account cannot be used: fail
    /// closed, nothing is sent to Defender.
    #[error(
        "the storage account that coordinates this app's instances cannot be used ({reason}), so \
         nothing was sent to Defender: a late restrict is better than a duplicate or out-of-order \
         one. Retry after {} s.",
        retry_after.as_secs().max(1)
    )]
    CoordinationUnavailable {
        retry_after: Duration,
        reason: String,
    },
    #[error("Defender refused the call (403): {message}")]
    DefenderForbidden { message: String },
    /// A 403 that is not about permissions (`DisabledFeature`,
    /// `DisallowedOperation`): roles would not help.
    #[error("Defender refused the call with {code} (403): {message}")]
    DefenderFeatureDisabled { code: String, message: String },
    #[error(transparent)]
    AuthenticationFailed(TokenError),
    #[error("Defender rejected the token (401): {message}")]
    TokenRejected { message: String },
    #[error("{0}")]
    Defender(String),
    #[error("{0}")]
    Timeout(String),
    #[error("Defender has no machine action with id {0}")]
    ActionNotFound(String),
    #[error("action {action_id} is {status}, which is final; there is nothing to cancel")]
    ActionNotPending {
        action_id: String,
        status: OrOther<ActionStatus>,
    },
    /// Defender answered 400 to the cancel of an action a read still shows
    /// as pending.
    #[error(
        "Defender refused to cancel action {action_id} (400: {message}); it read as {status} just \
         before, so it is most likely finishing. Read it again with the status function; to undo a \
         finished action, send the opposite request."
    )]
    CancelRefused {
        action_id: String,
        status: OrOther<ActionStatus>,
        message: String,
    },
    #[error(
        "action {action_id} is of type {action_type}; only RestrictCodeExecution and \
         UnrestrictCodeExecution actions can be cancelled here"
    )]
    UnsupportedActionType {
        action_id: String,
        action_type: OrOther<ActionType>,
    },
    #[error("{0}")]
    CallerForbidden(String),
    #[error("no route {0}")]
    RouteNotFound(String),
    #[error("method {method} is not allowed here; use {allowed}")]
    MethodNotAllowed {
        method: String,
        allowed: http::Method,
    },
    #[error(
        "the handler is shutting down (the instance is being stopped or recycled) and takes no \
         new invocations; nothing was sent to Defender. Retry: the platform sends the retry to a \
         running instance."
    )]
    ShuttingDown,
    #[error("no containment job with id {0}")]
    JobNotFound(String),
    #[error(
        "{selector} matched {count} devices; a job takes at most {max}. Split it (for example by \
         device group) and start one job for each part. Nothing was sent to Defender."
    )]
    TooManyDevices {
        selector: String,
        count: usize,
        max: usize,
    },
    #[error(
        "{0} matched no Defender machine: check the spelling (tags are matched exactly) and that \
         the machines are onboarded. Nothing was sent to Defender."
    )]
    NoDevicesMatched(String),
}

fn conflict_detail(
    machine_id: &str,
    action_id: &str,
    action_type: &OrOther<ActionType>,
    status: &OrOther<ActionStatus>,
    created_meanwhile: bool,
) -> String {
    if created_meanwhile {
        format!(
            "a {action_type} action ({action_id}) was created on machine {machine_id} by another \
             request after this one arrived, and is still {status}. \"cancelPending\" cancels only \
             actions that existed when the request arrived, so that concurrent opposite requests \
             do not cancel each other's actions in turn. No action was created; send the request \
             again if you still want it."
        )
    } else {
        format!(
            "a {action_type} action ({action_id}) is still {status} on machine {machine_id}; acting \
             now could finish out of order. Wait until it is finished, or send \"cancelPending\": \
             true to cancel it first. No action was created."
        )
    }
}

impl ApiError {
    /// Code, status and title, decided in one place.
    fn kind(&self) -> (&'static str, StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Self::InvalidRequest(RunbookError::TooLarge { .. }) => (
                "payload_too_large",
                S::PAYLOAD_TOO_LARGE,
                "Payload too large",
            ),
            Self::InvalidRequest(_) => ("invalid_request", S::BAD_REQUEST, "Invalid request"),
            Self::InvalidEnvelope(_) => (
                "invalid_envelope",
                S::BAD_REQUEST,
                "Invalid invocation envelope",
            ),
            Self::DeviceNotFound(_) => (
                "device_not_found",
                S::NOT_FOUND,
                "Device not found in Defender",
            ),
            Self::ConflictingActionPending { .. } | Self::CancelNotFinal { .. } => (
                "conflicting_action_pending",
                S::CONFLICT,
                "Opposite action pending",
            ),
            Self::UnsupportedDevice { .. } => (
                "unsupported_device",
                S::UNPROCESSABLE_ENTITY,
                "Device does not support restricting app execution",
            ),
            Self::RateLimited { .. } => (
                "rate_limited",
                S::TOO_MANY_REQUESTS,
                "Rate limited by Defender",
            ),
            Self::CoordinationUnavailable { .. } => (
                "coordination_unavailable",
                S::SERVICE_UNAVAILABLE,
                "Coordination storage unavailable",
            ),
            // Upstream failures are a bad gateway: the caller's request was fine.
            Self::DefenderForbidden { .. } => (
                "defender_forbidden",
                S::BAD_GATEWAY,
                "Defender permission missing",
            ),
            Self::DefenderFeatureDisabled { .. } => (
                "defender_feature_disabled",
                S::BAD_GATEWAY,
                "Defender feature disabled or operation disallowed",
            ),
            Self::AuthenticationFailed(_) | Self::TokenRejected { .. } => (
                "authentication_failed",
                S::BAD_GATEWAY,
                "Authentication failed",
            ),
            Self::Defender(_) => ("defender_error", S::BAD_GATEWAY, "Defender error"),
            Self::Timeout(_) => ("defender_timeout", S::GATEWAY_TIMEOUT, "Defender timeout"),
            Self::ActionNotFound(_) => {
                ("action_not_found", S::NOT_FOUND, "Machine action not found")
            }
            Self::ActionNotPending { .. } | Self::CancelRefused { .. } => (
                "action_not_pending",
                S::CONFLICT,
                "Machine action already finished",
            ),
            Self::UnsupportedActionType { .. } => (
                "unsupported_action_type",
                S::UNPROCESSABLE_ENTITY,
                "Machine action type not supported",
            ),
            Self::CallerForbidden(_) => ("caller_forbidden", S::FORBIDDEN, "Caller not allowed"),
            Self::RouteNotFound(_) => ("route_not_found", S::NOT_FOUND, "Not found"),
            Self::MethodNotAllowed { .. } => (
                "method_not_allowed",
                S::METHOD_NOT_ALLOWED,
                "Method not allowed",
            ),
            Self::ShuttingDown => ("shutting_down", S::SERVICE_UNAVAILABLE, "Shutting down"),
            Self::JobNotFound(_) => ("job_not_found", S::NOT_FOUND, "Job not found"),
            Self::TooManyDevices { .. } => (
                "too_many_devices",
                S::UNPROCESSABLE_ENTITY,
                "Too many devices for one job",
            ),
            Self::NoDevicesMatched(_) => (
                "no_devices_matched",
                S::UNPROCESSABLE_ENTITY,
                "No devices matched",
            ),
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        self.kind().0
    }

    pub fn status(&self) -> StatusCode {
        self.kind().1
    }

    fn title(&self) -> &'static str {
        self.kind().2
    }

    fn detail(&self) -> String {
        match self {
            Self::DefenderForbidden { message } => format!(
                "Defender refused the call: {message}. Grant the function's managed identity the \
                 WindowsDefenderATP application permissions {REQUIRED_ROLES} (admin consent), \
                 then allow up to an hour for new roles to reach tokens."
            ),
            Self::DefenderFeatureDisabled { code, message } => format!(
                "Defender refused the call with {code} (403): {message}. This is not a missing \
                 permission, and granting roles will not help: {}. No action was created.",
                if code == "DisabledFeature" {
                    "a Defender for Endpoint feature this call needs is turned off or not licensed \
                     for the tenant. Check the tenant's Defender for Endpoint Plan 2 license and \
                     Settings > Endpoints > Advanced features in the Microsoft Defender portal"
                } else {
                    "Defender does not allow this operation here, for example on this device, \
                     for its device group or under the tenant's settings. Check the device and \
                     its device group in the Microsoft Defender portal, and try the action there \
                     to see Defender's reason"
                }
            ),
            Self::AuthenticationFailed(e) => format!(
                "{e} (the handler's log has the token endpoint's answer). Check that the function app has the identity enabled (IDENTITY_ENDPOINT is \
                 set by the platform) and, for a user-assigned identity, that AZURE_CLIENT_ID is \
                 its client id. Nothing was sent to Defender."
            ),
            Self::TokenRejected { message } => format!(
                "Defender rejected the token (401): {message}. Check that DEFENDER_TOKEN_SCOPE \
                 belongs to the same cloud as DEFENDER_API_URL (DEFENDER_CLOUD sets both). \
                 No action was created."
            ),
            Self::RateLimited { detail, .. } => detail.clone(),
            _ => self.to_string(),
        }
    }

    /// Seconds for a `Retry-After` header, when the caller should wait.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::CoordinationUnavailable { retry_after, .. } => {
                Some(retry_after.as_secs().max(1))
            }
            Self::ShuttingDown => Some(5),
            _ => None,
        }
    }

    /// The problem document for this error.
    pub fn problem(&self, invocation_id: &str) -> Problem {
        let field = match self {
            Self::InvalidRequest(e) => e.field(),
            _ => None,
        };
        let action_id = match self {
            Self::ConflictingActionPending { action_id, .. }
            | Self::CancelNotFinal { action_id, .. }
            | Self::ActionNotPending { action_id, .. }
            | Self::CancelRefused { action_id, .. }
            | Self::UnsupportedActionType { action_id, .. } => Some(action_id.clone()),
            Self::ActionNotFound(id) => Some(id.clone()),
            _ => None,
        };
        let action_status = match self {
            Self::ConflictingActionPending { status, .. }
            | Self::CancelNotFinal { status, .. }
            | Self::ActionNotPending { status, .. }
            | Self::CancelRefused { status, .. } => Some(status.clone()),
            _ => None,
        };
        Problem {
            problem_type: format!("urn:restrict-code-execution:problem:{}", self.code()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.detail(),
            code: self.code(),
            invocation_id: invocation_id.to_owned(),
            field,
            action_id,
            action_status,
            retry_after: self.retry_after(),
        }
    }
}

/// `application/problem+json` body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    pub invocation_id: String,
    /// The payload field a 400 is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The Defender action a 404, 409 or 422 is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    /// That action's status, for a 409.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_status: Option<OrOther<ActionStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// The one place the domain service's errors get their answer and prose.
impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::DeviceNotFound(why) => Self::DeviceNotFound(why),
            ServiceError::Defender(e) => e.into(),
            ServiceError::UnsupportedPlatform {
                machine_id,
                os_platform,
            } => Self::UnsupportedDevice {
                code: "OsPlatformNotSupported".into(),
                message: format!(
                    "machine {machine_id} runs {os_platform}; restrict app execution needs \
                     Windows 10 1709 or later, Windows 11 or Windows Server 2019 or later. \
                     Nothing was sent to Defender."
                ),
            },
            ServiceError::Coordination(e) => e.into(),
            ServiceError::ConflictingActionPending {
                machine_id,
                action,
                created_meanwhile,
            } => Self::ConflictingActionPending {
                machine_id,
                action_id: action.id,
                action_type: action.action_type,
                status: action.status,
                created_meanwhile,
            },
            ServiceError::CancelNotFinal { machine_id, action } => Self::CancelNotFinal {
                machine_id,
                action_id: action.id,
                action_type: action.action_type,
                status: action.status,
            },
            ServiceError::ActionNotFound(id) => Self::ActionNotFound(id),
            ServiceError::ActionNotPending { action_id, status } => {
                Self::ActionNotPending { action_id, status }
            }
            ServiceError::CancelRefused {
                action_id,
                status,
                message,
            } => Self::CancelRefused {
                action_id,
                status,
                message,
            },
            ServiceError::UnsupportedActionType {
                action_id,
                action_type,
            } => Self::UnsupportedActionType {
                action_id,
                action_type,
            },
            ServiceError::OtherActionAnswered { asked, answered } => Self::Defender(format!(
                "Defender answered the read of action {asked} with action {}; the answer was not \
                 used. Retry later.",
                answered.chars().take(64).collect::<String>()
            )),
            ServiceError::InProgressNoneListed { machine_id, action } => Self::Defender(format!(
                "Defender answered \"Action is already in progress\" for {} on machine \
                 {machine_id}, but lists no pending {} action for it. No action was created; \
                 retry in a minute.",
                action.as_str(),
                action.as_str()
            )),
            ServiceError::NotCreated(error) => {
                let detail = format!(
                    "{error}. Re-reading the machine's actions showed that no action was \
                     created; it is safe to retry."
                );
                match error {
                    DefenderError::Timeout { .. } => Self::Timeout(detail),
                    _ => Self::Defender(detail),
                }
            }
            ServiceError::RoundStopped => Self::Defender(
                "the round serving this machine stopped unexpectedly; no answer was received. \
                 Check the device's action history before retrying."
                    .to_owned(),
            ),
            ServiceError::QueuedPastDeadline { machine_id } => Self::Timeout(format!(
                "other invocations for machine {machine_id} held it until the time budget ran \
                 out. No action was created by this invocation."
            )),
            ServiceError::ActingPastDeadline { machine_id } => Self::Timeout(format!(
                "the invocation did not finish in time while acting on machine {machine_id}. A \
                 machine action may or may not have been created: check the device's action \
                 history before retrying."
            )),
        }
    }
}

impl From<CoordinationError> for ApiError {
    fn from(e: CoordinationError) -> Self {
        match e {
            CoordinationError::Unavailable {
                retry_after,
                reason,
            } => Self::CoordinationUnavailable {
                retry_after,
                reason,
            },
            CoordinationError::LockTimeout { machine_id } => Self::Timeout(format!(
                "another invocation, on this or another instance, held machine {machine_id} until \
                 the time budget ran out. No action was created by this invocation."
            )),
            CoordinationError::OverBudget { bucket, wait } => Self::RateLimited {
                retry_after: wait,
                detail: format!(
                    "the Defender budget this app's instances share has no free slot for {bucket} \
                     before this invocation's time runs out; nothing was sent. Retry after {} s.",
                    wait.as_secs().max(1)
                ),
            },
        }
    }
}

impl From<DefenderError> for ApiError {
    fn from(e: DefenderError) -> Self {
        match e {
            DefenderError::Refused { ref refusal, .. } => {
                match refusal.downcast_ref::<CoordinationError>() {
                    Some(coordination) => coordination.clone().into(),
                    None => Self::Defender(e.to_string()),
                }
            }
            DefenderError::Token(t) => Self::AuthenticationFailed(t),
            DefenderError::OverBudget { endpoint, wait } => Self::RateLimited {
                retry_after: wait,
                detail: format!(
                    "this app's rate budget for Defender (100 calls per minute and 1500 per hour \
                     per endpoint, or DEFENDER_RATE_LIMIT_PER_MINUTE / _PER_HOUR) has no free \
                     slot for {} before this invocation's time runs out, so {} was not \
                     attempted. {} Retry after {} s.",
                    endpoint.describe(),
                    endpoint.describe(),
                    consequence_not_sent(endpoint),
                    wait.as_secs().max(1)
                ),
            },
            DefenderError::OutOfTime { endpoint } => Self::Timeout(format!(
                "the invocation ran out of time (REQUEST_TIMEOUT_SECONDS) before {}. {}",
                endpoint.describe(),
                consequence_not_sent(endpoint)
            )),
            DefenderError::Status {
                status: 400,
                code,
                message,
                ..
            } if matches!(
                code.as_str(),
                "OsPlatformNotSupported" | "ClientVersionNotSupported"
            ) =>
            {
                Self::UnsupportedDevice { code, message }
            }
            DefenderError::Status {
                status: 403,
                code,
                message,
                ..
            } if matches!(code.as_str(), "DisabledFeature" | "DisallowedOperation") => {
                Self::DefenderFeatureDisabled { code, message }
            }
            DefenderError::Status {
                status: 403,
                message,
                ..
            } => Self::DefenderForbidden { message },
            DefenderError::Status {
                status: 401,
                message,
                ..
            } => Self::TokenRejected { message },
            DefenderError::Status {
                status: 429,
                endpoint,
                retry_after,
                ..
            } => {
                let retry_after = retry_after.unwrap_or(Duration::from_secs(60));
                Self::RateLimited {
                    retry_after,
                    detail: format!(
                        "Defender answered 429 Too Many Requests while {}; its limits are 100 \
                         calls per minute and 1500 per hour per endpoint for this app. Retry \
                         after {} s. {}",
                        endpoint.describe(),
                        retry_after.as_secs(),
                        if endpoint.may_have_acted() {
                            "No action was created."
                        } else {
                            "Nothing was changed on the device."
                        }
                    ),
                }
            }
            ref e @ (DefenderError::Timeout { endpoint, .. }
            | DefenderError::Transport { endpoint, .. }) => {
                let consequence = consequence(endpoint);
                match e {
                    DefenderError::Timeout { .. } => Self::Timeout(format!("{e}. {consequence}")),
                    _ => Self::Defender(format!("{e}. {consequence}")),
                }
            }
            ref e @ DefenderError::Status {
                endpoint, status, ..
            } => {
                let target = match e {
                    DefenderError::Status {
                        target: Some(t), ..
                    } => format!(" (Defender correlation id {t})"),
                    _ => String::new(),
                };
                let consequence = if status >= 500 {
                    consequence(endpoint)
                } else {
                    "No action was created."
                };
                Self::Defender(format!("{e}{target}. {consequence}"))
            }
            ref e @ (DefenderError::Decode { endpoint, .. }
            | DefenderError::Protocol { endpoint, .. }) => {
                Self::Defender(format!("{e}. {}", consequence(endpoint)))
            }
        }
    }
}

/// What a call that was never sent means for the device.
fn consequence_not_sent(endpoint: Endpoint) -> &'static str {
    if endpoint.may_have_acted() {
        "No action was created by this call."
    } else {
        "Nothing was changed on the device."
    }
}

/// What an ambiguous failure means for the device.
fn consequence(endpoint: Endpoint) -> &'static str {
    if endpoint.may_have_acted() {
        "The action may or may not have been created: check the device's action history in \
         Defender before retrying."
    } else {
        "No action was created."
    }
}
