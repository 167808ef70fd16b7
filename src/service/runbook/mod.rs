//! The runbook payload: parsed once, at the edge, into domain types.
//!
//! Callers send `{deviceId, release, comment, callerName}`; RealmJoin sends the
//! same names in PascalCase, so names match case-insensitively. Everything is
//! strict on purpose: this tool acts on devices, and a typo such as `relase`
//! must be a 400 that names it, never a silent restrict.

mod device;
pub(crate) mod fields;
pub mod release_after;
mod text;

use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

pub use device::DeviceRef;
pub use release_after::ReleaseAfter;
pub use text::{CallerName, Comment};

/// Largest accepted payload. Real payloads are a few hundred bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most devices in one `deviceIds` call.
pub const MAX_DEVICES: usize = 50;
/// Longest `wait`: well inside the 230 s an HTTP-triggered function may take.
pub const MAX_WAIT_SECONDS: u64 = 180;

/// Which devices to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `deviceId`.
    One(DeviceRef),
    /// `deviceIds`: distinct devices in input order (a repeated id is acted on once).
    Many(Vec<DeviceRef>),
}

/// What the caller asked for, fully validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunbookRequest {
    pub target: Target,
    /// `true` lifts the restriction, `false` (the default) restricts.
    pub release: bool,
    pub comment: Comment,
    pub caller: Option<CallerName>,
    /// Act even when the device is already in the wanted state.
    pub force: bool,
    /// Cancel a pending action of the opposite type instead of refusing.
    pub cancel_pending: bool,
    /// Poll the action until it is finished, for at most this long.
    pub wait: Option<Duration>,
    /// `releaseAfter`: lift the restriction this creates after a while (or
    /// move or remove the expiry of ours).
    pub release_after: Option<ReleaseAfter>,
    /// When a restriction this request creates is released: `releaseAfter`
    /// counted from when the request was parsed.
    pub release_at: Option<time::OffsetDateTime>,
    /// Look and decide, send nothing (`dryRun`).
    pub dry_run: bool,
    /// Where to POST when the action is final (`callbackUrl`), as given:
    /// where it may go is the host's check, against the settings.
    pub callback_url: Option<String>,
}

/// Why a payload was rejected. Each message names the field and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RunbookError {
    #[error("the request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error(
        "the request body is empty; send a JSON object such as {{\"deviceId\": \"<Entra device id>\", \"release\": false}}"
    )]
    Empty,
    #[error("{0}")]
    Unreadable(String),
    #[error("the request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the request body must be a JSON object, not {0}")]
    NotObject(&'static str),
    #[error("unknown field `{field}`; accepted fields are {accepted}")]
    UnknownField { field: String, accepted: String },
    #[error("field `{field}` appears more than once (names match case-insensitively)")]
    DuplicateField { field: String },
    /// A query parameter the function does not read (names are case-sensitive).
    #[error("unknown query parameter `{name}`; accepted query parameters are {accepted}")]
    UnknownQuery { name: String, accepted: String },
    #[error("field `{field}` is required")]
    Missing { field: &'static str },
    #[error("field `{field}` {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl RunbookError {
    /// The payload field the error is about, when there is one.
    pub fn field(&self) -> Option<String> {
        match self {
            Self::UnknownField { field, .. }
            | Self::DuplicateField { field }
            | Self::UnknownQuery { name: field, .. } => Some(field.clone()),
            Self::Missing { field } | Self::Invalid { field, .. } => Some((*field).to_owned()),
            _ => None,
        }
    }
}

impl RunbookRequest {
    /// Parse a raw request body.
    pub fn parse(body: &[u8]) -> Result<Self, RunbookError> {
        if body.len() > MAX_PAYLOAD_BYTES {
            return Err(RunbookError::TooLarge {
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(RunbookError::Empty);
        }
        let fields = fields::Fields::parse(body, fields::ACCEPTED)?;

        let target = parse_target(
            fields.get(fields::DEVICE_ID),
            fields.get(fields::DEVICE_IDS),
        )?;
        let wait = parse_wait(fields.get(fields::WAIT))?;
        let flag = |name: &'static str| match fields.get(name) {
            None => Ok(false),
            Some(v) => parse_bool(name, v),
        };
        let release = flag(fields::RELEASE)?;
        let force = flag(fields::FORCE)?;
        let cancel_pending = flag(fields::CANCEL_PENDING)?;
        let comment = Comment::parse(fields.get(fields::COMMENT))?;
        let caller = CallerName::parse(fields.get(fields::CALLER_NAME))?;
        let release_after = parse_release_after(fields.get(fields::RELEASE_AFTER), release)?;
        let dry_run = flag(fields::DRY_RUN)?;
        let callback_url = parse_callback_url(fields.get(fields::CALLBACK_URL))?;
        if dry_run && callback_url.is_some() {
            return Err(RunbookError::Invalid {
                field: fields::CALLBACK_URL,
                reason: "cannot be combined with dryRun: a dry run creates no action to wait for"
                    .into(),
            });
        }

        Ok(Self {
            target,
            release,
            comment,
            caller,
            force,
            cancel_pending,
            wait,
            release_after,
            release_at: release_after.and_then(|r| r.release_at(time::OffsetDateTime::now_utc())),
            dry_run,
            callback_url,
        })
    }

    /// The single device, when the request names one (`deviceId`).
    pub fn single_device(&self) -> Option<&DeviceRef> {
        match &self.target {
            Target::One(device) => Some(device),
            Target::Many(_) => None,
        }
    }
}

/// `releaseAfter` belongs to a restrict: on a release it would mean nothing,
/// and saying nothing about it would hide the caller's mistake.
pub fn parse_release_after(
    value: Option<&Value>,
    release: bool,
) -> Result<Option<ReleaseAfter>, RunbookError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if release {
        return Err(RunbookError::Invalid {
            field: fields::RELEASE_AFTER,
            reason: "applies to a restrict only; a release has no expiry".into(),
        });
    }
    ReleaseAfter::parse(value)
        .map(Some)
        .map_err(|reason| RunbookError::Invalid {
            field: fields::RELEASE_AFTER,
            reason,
        })
}

/// The comment-only body of the cancel function: `{"comment": "..."}`.
pub fn parse_cancel_comment(body: &[u8]) -> Result<Option<Comment>, RunbookError> {
    if body.len() > MAX_PAYLOAD_BYTES {
        return Err(RunbookError::TooLarge {
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    // An empty body is fine here: the comment is optional.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let fields = fields::Fields::parse(body, &[fields::COMMENT])?;
    match fields.get(fields::COMMENT) {
        None | Some(Value::Null) => Ok(None),
        value => Comment::parse(value).map(Some),
    }
}

fn parse_target(one: Option<&Value>, many: Option<&Value>) -> Result<Target, RunbookError> {
    match (one, many) {
        // Both keys, whatever their values (null included): one or the other.
        (Some(_), Some(_)) => Err(RunbookError::Invalid {
            field: fields::DEVICE_IDS,
            reason: "cannot be combined with deviceId (even a null one); send one or the other"
                .into(),
        }),
        (_, Some(Value::Array(items))) => {
            if items.is_empty() || items.len() > MAX_DEVICES {
                return Err(RunbookError::Invalid {
                    field: fields::DEVICE_IDS,
                    reason: format!("must list 1 to {MAX_DEVICES} devices, got {}", items.len()),
                });
            }
            let mut devices: Vec<DeviceRef> = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let device = match item {
                    Value::String(s) => DeviceRef::parse(s).map_err(|e| RunbookError::Invalid {
                        field: fields::DEVICE_IDS,
                        reason: format!("item {index}: {e}"),
                    })?,
                    other => {
                        return Err(RunbookError::Invalid {
                            field: fields::DEVICE_IDS,
                            reason: format!(
                                "item {index} must be a string, got {}",
                                describe(other)
                            ),
                        });
                    }
                };
                if !devices.contains(&device) {
                    devices.push(device);
                }
            }
            Ok(Target::Many(devices))
        }
        (_, Some(Value::Null)) | (None, None) | (Some(Value::Null), None) => {
            Err(RunbookError::Missing {
                field: fields::DEVICE_ID,
            })
        }
        (_, Some(other)) => Err(wrong_type(fields::DEVICE_IDS, "an array of strings", other)),
        (Some(Value::String(s)), None) => Ok(Target::One(DeviceRef::parse(s)?)),
        (Some(other), None) => Err(wrong_type(fields::DEVICE_ID, "a string", other)),
    }
}

/// A string, or absent; `null` is absent.
pub fn parse_callback_url(value: Option<&Value>) -> Result<Option<String>, RunbookError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Some(Value::String(_)) => Err(RunbookError::Invalid {
            field: fields::CALLBACK_URL,
            reason: "must be an https URL, got an empty string".into(),
        }),
        // Never echo the value: a callback URL carries a secret.
        Some(other) => Err(RunbookError::Invalid {
            field: fields::CALLBACK_URL,
            reason: format!("must be a string (an https URL), got {}", kind(other)),
        }),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whole seconds, 0 to [`MAX_WAIT_SECONDS`], as a JSON number or a string of digits.
fn parse_wait(value: Option<&Value>) -> Result<Option<Duration>, RunbookError> {
    let seconds = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        // Digits only, as documented: `u64::from_str` would also take "+5".
        Some(Value::String(s)) => Some(s.trim())
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok()),
        Some(_) => None,
    };
    match seconds {
        Some(0) => Ok(None),
        Some(s) if s <= MAX_WAIT_SECONDS => Ok(Some(Duration::from_secs(s))),
        _ => Err(RunbookError::Invalid {
            field: fields::WAIT,
            reason: format!(
                "must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}, got {}",
                value.map_or_else(|| "nothing".to_owned(), describe)
            ),
        }),
    }
}

/// `true`/`false` as JSON booleans, or as strings in any case. Anything else,
/// `null` included, is rejected: guessing would mean restricting by default.
fn parse_bool(field: &'static str, value: &Value) -> Result<bool, RunbookError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(RunbookError::Invalid {
            field,
            reason: format!(
                "must be true or false (a JSON boolean or the string \"true\"/\"false\"), got {}",
                describe(other)
            ),
        }),
    }
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> RunbookError {
    RunbookError::Invalid {
        field,
        reason: format!("must be {expected}, got {}", describe(got)),
    }
}

/// A short, safe description of a JSON value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", text::quote_snippet(s)),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<RunbookRequest, RunbookError> {
        RunbookRequest::parse(json.as_bytes())
    }

    const AAD: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";

    #[test]
    fn minimal_payload_restricts_with_the_default_comment() {
        let r = parse(&format!(r#"{{"deviceId":"{AAD}"}}"#)).unwrap();
        assert!(!r.release);
        assert_eq!(r.comment.as_str(), "Possible security risk.");
        assert_eq!(r.caller, None);
    }

    #[test]
    fn pascal_case_and_string_booleans_are_accepted() {
        let r = parse(&format!(
            r#"{{"DeviceId":"{AAD}","Release":"TRUE","Comment":"c","CallerName":"alice@contoso.com"}}"#
        ))
        .unwrap();
        assert!(r.release);
        assert_eq!(r.comment.as_str(), "c");
        assert_eq!(r.caller.unwrap().as_str(), "alice@contoso.com");
    }

    #[test]
    fn a_typo_is_rejected_by_name() {
        let err = parse(&format!(r#"{{"deviceId":"{AAD}","relase":true}}"#)).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("relase"));
        assert!(err.to_string().contains("relase"));
    }

    #[test]
    fn the_same_field_twice_is_rejected_even_with_other_casing() {
        let err = parse(&format!(
            r#"{{"deviceId":"{AAD}","release":false,"Release":true}}"#
        ))
        .unwrap_err();
        assert!(
            matches!(err, RunbookError::DuplicateField { .. }),
            "{err:?}"
        );
        let err = parse(&format!(
            r#"{{"deviceId":"{AAD}","release":false,"release":true}}"#
        ))
        .unwrap_err();
        assert!(
            matches!(err, RunbookError::DuplicateField { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn release_null_number_or_other_string_is_rejected() {
        for bad in ["null", "1", "\"yes\"", "\"\"", "[]"] {
            let err = parse(&format!(r#"{{"deviceId":"{AAD}","release":{bad}}}"#)).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("release"), "release={bad}");
        }
    }

    #[test]
    fn force_and_cancel_pending_parse_like_release() {
        let r = parse(&format!(
            r#"{{"deviceId":"{AAD}","Force":"TRUE","cancelpending":true}}"#
        ))
        .unwrap();
        assert!(r.force && r.cancel_pending && !r.release);
        let err = parse(&format!(r#"{{"deviceId":"{AAD}","force":"1"}}"#)).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("force"));
        let err = parse(&format!(r#"{{"deviceId":"{AAD}","cancelPending":null}}"#)).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("cancelPending"));
    }

    #[test]
    fn device_ids_are_deduplicated_in_order_and_exclusive_with_device_id() {
        let m = "c5cb89852ce0d21636c0491709a4571b5f190e75";
        let r = parse(&format!(
            r#"{{"deviceIds":["{AAD}","{m}","{}"]}}"#,
            AAD.to_uppercase()
        ))
        .unwrap();
        let Target::Many(devices) = r.target else {
            panic!("bulk")
        };
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].to_string(), AAD);
        let err = parse(&format!(r#"{{"deviceId":"{AAD}","deviceIds":["{AAD}"]}}"#)).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("deviceIds"));
        for both in [
            format!(r#"{{"deviceIds":["{AAD}"],"deviceId":null}}"#),
            format!(r#"{{"deviceId":"{AAD}","deviceIds":null}}"#),
            r#"{"deviceId":null,"deviceIds":null}"#.to_owned(),
        ] {
            let err = parse(&both).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("deviceIds"), "{both}");
        }
        let err = parse(r#"{"deviceIds":[]}"#).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("deviceIds"));
        let many = vec![format!("\"{AAD}\""); 51].join(",");
        assert!(parse(&format!(r#"{{"deviceIds":[{many}]}}"#)).is_err());
        let err = parse(&format!(r#"{{"deviceIds":["{AAD}", "nope"]}}"#)).unwrap_err();
        assert!(err.to_string().contains("item 1"), "{err}");
    }

    #[test]
    fn wait_is_bounded_whole_seconds() {
        let r = parse(&format!(r#"{{"deviceId":"{AAD}","wait":"30"}}"#)).unwrap();
        assert_eq!(r.wait, Some(Duration::from_secs(30)));
        for bad in [
            "-1", "181", "1.5", "\"soon\"", "true", "\"+5\"", "\"-0\"", "\"1e1\"", "\"\"",
        ] {
            let err = parse(&format!(r#"{{"deviceId":"{AAD}","wait":{bad}}}"#)).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("wait"), "{bad}");
        }
    }

    #[test]
    fn the_cancel_body_takes_only_a_comment() {
        assert_eq!(parse_cancel_comment(b"").unwrap(), None);
        let c = parse_cancel_comment(br#"{"Comment":"stop"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.as_str(), "stop");
        assert!(parse_cancel_comment(br#"{"deviceId":"x"}"#).is_err());
    }

    #[test]
    fn body_shape_errors() {
        assert_eq!(parse("").unwrap_err(), RunbookError::Empty);
        assert!(matches!(parse("{").unwrap_err(), RunbookError::NotJson(_)));
        assert!(matches!(
            parse("[1]").unwrap_err(),
            RunbookError::NotObject(_)
        ));
        assert!(matches!(
            parse("\"x\"").unwrap_err(),
            RunbookError::NotObject(_)
        ));
        let big = format!(
            r#"{{"deviceId":"{AAD}","comment":"{}"}}"#,
            "a".repeat(70_000)
        );
        assert!(matches!(
            parse(&big).unwrap_err(),
            RunbookError::TooLarge { .. }
        ));
    }
}
