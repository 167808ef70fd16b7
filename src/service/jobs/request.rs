//! The start-job body, parsed once: exactly one selector and the single
//! payload's options, with the payload's rules (names match
//! case-insensitively; an unknown field or the same field twice is refused
//! by name).

use serde_json::Value;

use crate::service::runbook::ReleaseAfter;
use crate::service::runbook::{
    CallerName, Comment, DeviceRef, RunbookError,
    fields::{self, Fields},
};

/// Largest start-job body: 10,000 ids with room for the other fields.
pub const MAX_JOB_BODY_BYTES: usize = 1024 * 1024;
/// Most devices in one job, however they are selected.
pub const MAX_JOB_DEVICES: usize = 10_000;
/// Longest machine tag accepted (Defender's tags are short labels).
const MAX_TAG_CHARS: usize = 200;

pub const MACHINE_TAG: &str = "machineTag";
pub const DEVICE_GROUP_ID: &str = "deviceGroupId";

/// Every field the start-job body may carry.
const ACCEPTED: &[&str] = &[
    fields::DEVICE_IDS,
    MACHINE_TAG,
    DEVICE_GROUP_ID,
    fields::RELEASE,
    fields::COMMENT,
    fields::CALLER_NAME,
    fields::FORCE,
    fields::RELEASE_AFTER,
    fields::DRY_RUN,
    fields::CALLBACK_URL,
];

/// Which devices a job acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Listed devices, distinct, in input order.
    DeviceIds(Vec<DeviceRef>),
    /// Every machine carrying this Defender tag.
    MachineTag(String),
    /// Every machine of this device group (`rbacGroupId`).
    DeviceGroup(u64),
}

/// A start-job request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    pub selector: Selector,
    pub release: bool,
    pub comment: Comment,
    pub caller: Option<CallerName>,
    pub force: bool,
    /// `releaseAfter`: each restriction the job creates is released after this.
    pub release_after: Option<ReleaseAfter>,
    /// Look up and read every device, send nothing (`dryRun`).
    pub dry_run: bool,
    /// `callbackUrl` as given; the host checks where it may go.
    pub callback_url: Option<String>,
}

impl JobRequest {
    /// What makes two start requests the same job, as a short digest: the
    /// parsed request, so that key order and spacing in the body do not
    /// matter. Kept with an `Idempotency-Key` to tell a retry from a new
    /// request reusing the key.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{self:?}").as_bytes());
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn parse(body: &[u8]) -> Result<Self, RunbookError> {
        if body.len() > MAX_JOB_BODY_BYTES {
            return Err(RunbookError::TooLarge {
                limit: MAX_JOB_BODY_BYTES,
            });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(RunbookError::Missing {
                field: "machineTag, deviceGroupId or deviceIds",
            });
        }
        let fields = Fields::parse(body, ACCEPTED)?;
        let selector = selector(&fields)?;
        let flag = |name: &'static str| match fields.get(name) {
            None => Ok(false),
            Some(value) => boolean(name, value),
        };
        let release = flag(fields::RELEASE)?;
        let release_after = crate::service::runbook::parse_release_after(
            fields.get(fields::RELEASE_AFTER),
            release,
        )?;
        Ok(Self {
            selector,
            release_after,
            release,
            force: flag(fields::FORCE)?,
            dry_run: flag(fields::DRY_RUN)?,
            callback_url: crate::service::runbook::parse_callback_url(
                fields.get(fields::CALLBACK_URL),
            )?,
            comment: Comment::parse(fields.get(fields::COMMENT))?,
            caller: CallerName::parse(fields.get(fields::CALLER_NAME))?,
        })
    }
}

fn selector(fields: &Fields) -> Result<Selector, RunbookError> {
    let given: Vec<&'static str> = [fields::DEVICE_IDS, MACHINE_TAG, DEVICE_GROUP_ID]
        .into_iter()
        .filter(|name| fields.get(name).is_some())
        .collect();
    match given.as_slice() {
        [] => Err(RunbookError::Missing {
            field: "machineTag, deviceGroupId or deviceIds",
        }),
        [_, second, ..] => Err(RunbookError::Invalid {
            field: second,
            reason: format!(
                "cannot be combined with {}: a job selects its devices in exactly one way",
                given[0]
            ),
        }),
        [name] if *name == MACHINE_TAG => match fields.get(MACHINE_TAG) {
            Some(Value::String(tag)) => {
                let tag = tag.trim();
                if tag.is_empty() || tag.chars().count() > MAX_TAG_CHARS {
                    return Err(RunbookError::Invalid {
                        field: MACHINE_TAG,
                        reason: format!(
                            "must be a Defender machine tag of 1 to {MAX_TAG_CHARS} characters"
                        ),
                    });
                }
                if tag.chars().any(char::is_control) {
                    return Err(RunbookError::Invalid {
                        field: MACHINE_TAG,
                        reason: "must not contain control characters".into(),
                    });
                }
                Ok(Selector::MachineTag(tag.to_owned()))
            }
            _ => Err(RunbookError::Invalid {
                field: MACHINE_TAG,
                reason: "must be a string (a Defender machine tag)".into(),
            }),
        },
        [name] if *name == DEVICE_GROUP_ID => {
            let id = match fields.get(DEVICE_GROUP_ID) {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            match id {
                Some(id) if id <= i64::MAX as u64 => Ok(Selector::DeviceGroup(id)),
                _ => Err(RunbookError::Invalid {
                    field: DEVICE_GROUP_ID,
                    reason: "must be a device group's id (rbacGroupId): a whole number".into(),
                }),
            }
        }
        _ => device_ids(fields.get(fields::DEVICE_IDS)),
    }
}

fn device_ids(value: Option<&Value>) -> Result<Selector, RunbookError> {
    let Some(Value::Array(items)) = value else {
        return Err(RunbookError::Invalid {
            field: fields::DEVICE_IDS,
            reason: "must be an array of device ids".into(),
        });
    };
    if items.is_empty() || items.len() > MAX_JOB_DEVICES {
        return Err(RunbookError::Invalid {
            field: fields::DEVICE_IDS,
            reason: format!(
                "must list 1 to {MAX_JOB_DEVICES} devices, got {}",
                items.len()
            ),
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let mut devices = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let Value::String(raw) = item else {
            return Err(RunbookError::Invalid {
                field: fields::DEVICE_IDS,
                reason: format!("item {index} must be a string"),
            });
        };
        let device = DeviceRef::parse(raw).map_err(|e| RunbookError::Invalid {
            field: fields::DEVICE_IDS,
            reason: format!("item {index}: {e}"),
        })?;
        if seen.insert(device.clone()) {
            devices.push(device);
        }
    }
    Ok(Selector::DeviceIds(devices))
}

fn boolean(field: &'static str, value: &Value) -> Result<bool, RunbookError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(RunbookError::Invalid {
            field,
            reason: "must be true or false (a JSON boolean or the string \"true\"/\"false\")"
                .into(),
        }),
    }
}

/// A tag as an OData string literal: single-quoted, a `'` doubled.
pub fn odata_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<JobRequest, RunbookError> {
        JobRequest::parse(json.as_bytes())
    }

    #[test]
    fn exactly_one_selector() {
        assert_eq!(
            parse(r#"{"MachineTag":"outbreak-42","release":"true"}"#)
                .unwrap()
                .selector,
            Selector::MachineTag("outbreak-42".into())
        );
        assert_eq!(
            parse(r#"{"deviceGroupId":7}"#).unwrap().selector,
            Selector::DeviceGroup(7)
        );
        let none = parse(r#"{"release":true}"#).unwrap_err();
        assert!(none.to_string().contains("machineTag"), "{none}");
        let two = parse(r#"{"machineTag":"a","deviceGroupId":7}"#).unwrap_err();
        assert_eq!(two.field().as_deref(), Some("deviceGroupId"));
        let typo = parse(r#"{"machineTags":"a"}"#).unwrap_err();
        assert_eq!(typo.field().as_deref(), Some("machineTags"));
        let twice = parse(r#"{"machineTag":"a","MACHINETAG":"b"}"#).unwrap_err();
        assert!(matches!(twice, RunbookError::DuplicateField { .. }));
        for bad in [
            r#"{"deviceGroupId":-1}"#,
            r#"{"deviceGroupId":"x"}"#,
            r#"{"machineTag":""}"#,
            r#"{"machineTag":5}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ten_thousand_ids_fit_and_one_more_does_not() {
        let ids = |n: usize| {
            (0..n)
                .map(|i| format!("\"{i:040x}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let body = format!(r#"{{"deviceIds":[{}]}}"#, ids(10_000));
        assert!(body.len() <= MAX_JOB_BODY_BYTES);
        let Selector::DeviceIds(devices) = parse(&body).unwrap().selector else {
            panic!("device ids expected")
        };
        assert_eq!(devices.len(), 10_000);
        let err = parse(&format!(r#"{{"deviceIds":[{}]}}"#, ids(10_001))).unwrap_err();
        assert_eq!(err.field().as_deref(), Some("deviceIds"));
    }

    #[test]
    fn a_quote_in_a_tag_is_doubled_in_the_filter() {
        assert_eq!(odata_string("it's"), "'it''s'");
    }
}
