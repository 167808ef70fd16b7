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

/// Declares [`ProblemCode`] from one table: each code's variant, wire text,
/// HTTP status and title, written nowhere else.
macro_rules! problem_codes {
    ($($(#[$doc:meta])* $variant:ident => $code:literal, $status:ident, $title:literal;)+) => {
        /// A stable, machine-readable problem `code`, with the status and title
        /// every answer carrying it has. The OpenAPI document's `Problem.code`
        /// enum and the README's troubleshooting table list the same codes;
        /// tests check both against [`ProblemCode::ALL`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ProblemCode {
            $($(#[$doc])* $variant,)+
        }

        impl ProblemCode {
            /// Every code, in the order the OpenAPI document lists them.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The code as answered.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)+
                }
            }

            pub const fn status(self) -> StatusCode {
                match self {
                    $(Self::$variant => StatusCode::$status,)+
                }
            }

            pub const fn title(self) -> &'static str {
                match self {
                    $(Self::$variant => $title,)+
                }
            }
        }
    };
}

problem_codes! {
    InvalidRequest => "invalid_request", BAD_REQUEST, "Invalid request";
    PayloadTooLarge => "payload_too_large", PAYLOAD_TOO_LARGE, "Payload too large";
    InvalidEnvelope => "invalid_envelope", BAD_REQUEST, "Invalid invocation envelope";
    DeviceNotFound => "device_not_found", NOT_FOUND, "Device not found in Defender";
    ConflictingActionPending => "conflicting_action_pending", CONFLICT, "Opposite action pending";
    UnsupportedDevice => "unsupported_device", UNPROCESSABLE_ENTITY,
        "Device does not support restricting app execution";
    RateLimited => "rate_limited", TOO_MANY_REQUESTS, "Rate limited by Defender";
    CoordinationUnavailable => "coordination_unavailable", SERVICE_UNAVAILABLE,
        "Coordination storage unavailable";
    // Upstream failures are a bad gateway: the caller's request was fine.
    DefenderForbidden => "defender_forbidden", BAD_GATEWAY, "Defender permission missing";
    DefenderFeatureDisabled => "defender_feature_disabled", BAD_GATEWAY,
        "Defender feature disabled or operation disallowed";
    AuthenticationFailed => "authentication_failed", BAD_GATEWAY, "Authentication failed";
    DefenderError => "defender_error", BAD_GATEWAY, "Defender error";
    DefenderTimeout => "defender_timeout", GATEWAY_TIMEOUT, "Defender timeout";
    ActionNotFound => "action_not_found", NOT_FOUND, "Machine action not found";
    ActionNotPending => "action_not_pending", CONFLICT, "Machine action already finished";
    UnsupportedActionType => "unsupported_action_type", UNPROCESSABLE_ENTITY,
        "Machine action type not supported";
    CallerForbidden => "caller_forbidden", FORBIDDEN, "Caller not allowed";
    RouteNotFound => "route_not_found", NOT_FOUND, "Not found";
    MethodNotAllowed => "method_not_allowed", METHOD_NOT_ALLOWED, "Method not allowed";
    ShuttingDown => "shutting_down", SERVICE_UNAVAILABLE, "Shutting down";
    JobNotFound => "job_not_found", NOT_FOUND, "Job not found";
    TooManyDevices => "too_many_devices", UNPROCESSABLE_ENTITY, "Too many devices for one job";
    NoDevicesMatched => "no_devices_matched", UNPROCESSABLE_ENTITY, "No devices matched";
    IdempotencyKeyReused => "idempotency_key_reused", UNPROCESSABLE_ENTITY,
        "Idempotency-Key used for another request";
    UriTooLong => "uri_too_long", URI_TOO_LONG, "Request URI too long";
    HeadersTooLarge => "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE,
        "Request headers too large";
}

/// Every `code` an answer can carry, as text.
pub const CODES: &[&str] = &{
    let mut codes = [""; ProblemCode::ALL.len()];
    let mut i = 0;
    while i < codes.len() {
        codes[i] = ProblemCode::ALL[i].as_str();
        i += 1;
    }
    codes
};

/// An invocation that did not succeed.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidRequest(#[from] RunbookError),
    #[error("the host's invocation envelope is malformed: {0}")]
    InvalidEnvelope(String),
    /// The domain service's answer about the device or its actions
    /// (never its `Defender` or `Coordination` wrappers, which `From`
    /// unwraps into the variants below).
    #[error("{}", service_detail(.0))]
    Service(ServiceError),
    #[error("Defender does not support this action on the device: {message}")]
    UnsupportedDevice { code: String, message: String },
    #[error(
        "Defender is rate limiting this app; retry after {} s",
        seconds_up(retry_after)
    )]
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
        seconds_up(retry_after)
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
    #[error("{0}")]
    CallerForbidden(String),
    #[error("no route {0}")]
    RouteNotFound(String),
    #[error("method {method} is not allowed here; use {allowed}")]
    MethodNotAllowed {
        method: String,
        /// The methods the route serves, as the `Allow` header lists them
        /// (`GET, POST`).
        allowed: String,
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
    #[error(
        "the Idempotency-Key {0:?} started a job with a different request within the last 24 \
         hours; a retry must send the same body. Use a new key for a new job. Nothing was sent \
         to Defender."
    )]
    IdempotencyKeyReused(String),
    #[error(
        "the request URI is longer than {limit} bytes; no function takes more than a few short \
         query parameters. Nothing was sent to Defender."
    )]
    UriTooLong { limit: usize },
    #[error(
        "the request headers are larger than {limit} bytes or more than {count} fields. Nothing \
         was sent to Defender."
    )]
    HeadersTooLarge { limit: usize, count: usize },
}

/// The code of a service error's answer.
fn service_code(e: &ServiceError) -> ProblemCode {
    use ProblemCode as P;
    match e {
        ServiceError::DeviceNotFound(_) => P::DeviceNotFound,
        // Refused before any POST, as Defender would refuse it.
        ServiceError::UnsupportedPlatform { .. } => P::UnsupportedDevice,
        ServiceError::ConflictingActionPending { .. } | ServiceError::CancelNotFinal { .. } => {
            P::ConflictingActionPending
        }
        ServiceError::ActionNotFound(_) => P::ActionNotFound,
        // A 400 to the cancel of an action that read as pending: it is most
        // likely finishing.
        ServiceError::ActionNotPending { .. } | ServiceError::CancelRefused { .. } => {
            P::ActionNotPending
        }
        ServiceError::UnsupportedActionType { .. } => P::UnsupportedActionType,
        ServiceError::NotCreated(DefenderError::Timeout { .. })
        | ServiceError::QueuedPastDeadline { .. }
        | ServiceError::ActingPastDeadline { .. } => P::DefenderTimeout,
        ServiceError::Coordination(_) => P::CoordinationUnavailable,
        ServiceError::ShuttingDown => P::ShuttingDown,
        ServiceError::Defender(_)
        | ServiceError::OtherActionAnswered { .. }
        | ServiceError::OtherActionCreated { .. }
        | ServiceError::InProgressNoneListed { .. }
        | ServiceError::NotCreated(_)
        | ServiceError::RoundStopped => P::DefenderError,
    }
}

/// The prose a caller reads for a service error.
fn service_detail(e: &ServiceError) -> String {
    match e {
        ServiceError::DeviceNotFound(why) => why.clone(),
        ServiceError::UnsupportedPlatform {
            machine_id,
            os_platform,
        } => format!(
            "Defender does not support this action on the device: machine {machine_id} runs \
             {os_platform}; restrict app execution needs Windows 10 1709 or later, Windows 11 or \
             Windows Server 2019 or later. Nothing was sent to Defender."
        ),
        ServiceError::ConflictingActionPending {
            machine_id,
            action,
            created_meanwhile,
        } => conflict_detail(
            machine_id,
            &action.id,
            &action.action_type,
            &action.status,
            *created_meanwhile,
        ),
        ServiceError::CancelNotFinal { machine_id, action } => format!(
            "the {} action {} on machine {machine_id} was cancelled, but Defender still reports \
             it {}: a cancel is not final until Defender says so. No action was created; send \
             the request again once the action is Cancelled (the status route shows it).",
            action.action_type, action.id, action.status
        ),
        ServiceError::ActionNotFound(id) => format!("Defender has no machine action with id {id}"),
        ServiceError::ActionNotPending { action_id, status } => {
            format!("action {action_id} is {status}, which is final; there is nothing to cancel")
        }
        ServiceError::CancelRefused {
            action_id,
            status,
            message,
        } => format!(
            "Defender refused to cancel action {action_id} (400: {message}); it read as {status} \
             just before, so it is most likely finishing. Read it again with the status function; \
             to undo a finished action, send the opposite request."
        ),
        ServiceError::UnsupportedActionType {
            action_id,
            action_type,
        } => format!(
            "action {action_id} is of type {action_type}; only RestrictCodeExecution and \
             UnrestrictCodeExecution actions can be cancelled here"
        ),
        ServiceError::OtherActionAnswered { asked, answered } => format!(
            "Defender answered the read of action {asked} with action {}; the answer was not \
             used. Retry later.",
            answered.chars().take(64).collect::<String>()
        ),
        ServiceError::OtherActionCreated {
            machine_id,
            action,
            answered,
        } => format!(
            "Defender answered the {} for machine {machine_id} with action {}, a {} on machine \
             {}; that is not the action asked for, and it was not taken as this request's. \
             Check the device's action history in the Microsoft Defender portal before retrying.",
            action.as_str(),
            answered.id.as_str().chars().take(64).collect::<String>(),
            answered
                .action_type
                .to_string()
                .chars()
                .take(64)
                .collect::<String>(),
            answered.machine_id.as_ref().map_or_else(
                || "(none named)".to_owned(),
                |m| m.as_str().chars().take(64).collect()
            ),
        ),
        ServiceError::ShuttingDown => ApiError::ShuttingDown.to_string(),
        ServiceError::InProgressNoneListed { machine_id, action } => format!(
            "Defender answered \"Action is already in progress\" for {} on machine \
             {machine_id}, but lists no pending {} action for it. No action was created; \
             retry in a minute.",
            action.as_str(),
            action.as_str()
        ),
        ServiceError::NotCreated(error) => format!(
            "{error}. Re-reading the machine's actions showed that no action was created; it is \
             safe to retry."
        ),
        ServiceError::RoundStopped => "the round serving this machine stopped unexpectedly; no \
             answer was received. Check the device's action history before retrying."
            .to_owned(),
        ServiceError::QueuedPastDeadline { machine_id } => format!(
            "other invocations for machine {machine_id} held it until the time budget ran out. \
             No action was created by this invocation."
        ),
        ServiceError::ActingPastDeadline { machine_id } => format!(
            "the invocation did not finish in time while acting on machine {machine_id}. A \
             machine action may or may not have been created: check the device's action history \
             before retrying."
        ),
        // `From<ServiceError>` unwraps these into their own answers.
        ServiceError::Defender(e) => ApiError::from(e.clone()).detail(),
        ServiceError::Coordination(e) => ApiError::from(e.clone()).detail(),
    }
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
    /// The problem code, which decides the status and title.
    pub fn kind(&self) -> ProblemCode {
        use ProblemCode as P;
        match self {
            Self::InvalidRequest(RunbookError::TooLarge { .. }) => P::PayloadTooLarge,
            Self::InvalidRequest(_) => P::InvalidRequest,
            Self::InvalidEnvelope(_) => P::InvalidEnvelope,
            Self::Service(e) => service_code(e),
            Self::UnsupportedDevice { .. } => P::UnsupportedDevice,
            Self::RateLimited { .. } => P::RateLimited,
            Self::CoordinationUnavailable { .. } => P::CoordinationUnavailable,
            Self::DefenderForbidden { .. } => P::DefenderForbidden,
            Self::DefenderFeatureDisabled { .. } => P::DefenderFeatureDisabled,
            Self::AuthenticationFailed(_) | Self::TokenRejected { .. } => P::AuthenticationFailed,
            Self::Defender(_) => P::DefenderError,
            Self::Timeout(_) => P::DefenderTimeout,
            Self::CallerForbidden(_) => P::CallerForbidden,
            Self::RouteNotFound(_) => P::RouteNotFound,
            Self::MethodNotAllowed { .. } => P::MethodNotAllowed,
            Self::ShuttingDown => P::ShuttingDown,
            Self::JobNotFound(_) => P::JobNotFound,
            Self::TooManyDevices { .. } => P::TooManyDevices,
            Self::NoDevicesMatched(_) => P::NoDevicesMatched,
            Self::IdempotencyKeyReused(_) => P::IdempotencyKeyReused,
            Self::UriTooLong { .. } => P::UriTooLong,
            Self::HeadersTooLarge { .. } => P::HeadersTooLarge,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    pub fn status(&self) -> StatusCode {
        self.kind().status()
    }

    fn title(&self) -> &'static str {
        self.kind().title()
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
            | Self::CoordinationUnavailable { retry_after, .. } => Some(seconds_up(retry_after)),
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
            Self::Service(
                ServiceError::ConflictingActionPending { action, .. }
                | ServiceError::CancelNotFinal { action, .. },
            ) => Some(action.id.to_string()),
            Self::Service(
                ServiceError::ActionNotPending { action_id, .. }
                | ServiceError::CancelRefused { action_id, .. }
                | ServiceError::UnsupportedActionType { action_id, .. }
                | ServiceError::ActionNotFound(action_id),
            ) => Some(action_id.clone()),
            _ => None,
        };
        let action_status = match self {
            Self::Service(
                ServiceError::ConflictingActionPending { action, .. }
                | ServiceError::CancelNotFinal { action, .. },
            ) => Some(action.status.clone()),
            Self::Service(
                ServiceError::ActionNotPending { status, .. }
                | ServiceError::CancelRefused { status, .. },
            ) => Some(status.clone()),
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

/// The domain service's errors: the two wrappers of lower layers get those
/// layers' answers; every other one is answered as itself ([`service_code`],
/// [`service_detail`]).
impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Defender(e) => e.into(),
            ServiceError::Coordination(e) => e.into(),
            ServiceError::ShuttingDown => Self::ShuttingDown,
            e => Self::Service(e),
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
                    seconds_up(&wait)
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
                    seconds_up(&wait)
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
                // `Retry-After: 0` is advice to retry at once; the answer's
                // header says at least 1 s, and its detail says the same.
                let retry_after = retry_after
                    .unwrap_or(Duration::from_secs(60))
                    .max(Duration::from_secs(1));
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

/// A wait in whole seconds for `Retry-After` and the detail that names it:
/// rounded up (1.9 s is 2, not 1), and at least 1.
fn seconds_up(wait: &std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defender::error::Refusal;

    /// A write the machine's lease (or the shared budget) refused to let go
    /// out reaches the caller through the client's hook as
    /// `DefenderError::Refused`; it is answered exactly as a coordination
    /// failure: 503, `coordination_unavailable`, its Retry-After, "nothing
    /// was sent".
    #[test]
    fn a_write_the_coordination_refused_is_a_503_with_retry_after() {
        let refused = DefenderError::Refused {
            endpoint: Endpoint::create(ActionType::RestrictCodeExecution),
            refusal: Refusal::new(CoordinationError::Unavailable {
                retry_after: Duration::from_secs(15),
                reason: "the lease on machine m could not be renewed".to_owned(),
            }),
        };
        for error in [
            ApiError::from(ServiceError::from(refused.clone())),
            ApiError::from(refused),
        ] {
            let problem = error.problem("inv");
            assert_eq!(problem.status, 503);
            assert_eq!(problem.code, "coordination_unavailable");
            assert_eq!(problem.retry_after, Some(15));
            assert!(
                problem
                    .detail
                    .contains("(the lease on machine m could not be renewed), so nothing was sent"),
                "{}",
                problem.detail
            );
        }
    }

    /// Defender's `Retry-After: 0` means "retry at once"; the answer's header
    /// says 1 s (a header of 0 makes some clients spin), and so does its detail.
    #[test]
    fn retry_after_zero_from_defender_is_one_second_in_header_and_detail() {
        let error = ApiError::from(DefenderError::Status {
            endpoint: Endpoint::create(ActionType::RestrictCodeExecution),
            status: 429,
            code: "TooManyRequests".to_owned(),
            message: "slow down".to_owned(),
            target: None,
            retry_after: Some(Duration::ZERO),
        });
        let problem = error.problem("inv");
        assert_eq!(problem.retry_after, Some(1));
        assert!(
            problem.detail.contains("Retry after 1 s."),
            "{}",
            problem.detail
        );
        assert!(!problem.detail.contains("0 s"), "{}", problem.detail);
    }

    /// A wait of 1.9 s is a `Retry-After` of 2: a client that retries after
    /// 1 s would be refused again.
    #[test]
    fn a_fractional_wait_is_rounded_up() {
        assert_eq!(seconds_up(&Duration::from_millis(1900)), 2);
        assert_eq!(seconds_up(&Duration::from_secs(3)), 3);
        assert_eq!(seconds_up(&Duration::ZERO), 1);
    }
}
