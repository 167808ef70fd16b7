//! The payload object as an ordered list of fields, matched case-insensitively.
//!
//! `serde_json::Map` keeps only the last of two equal keys, which would let
//! `{"release":false,"release":true}` mean whatever the last one says. The
//! payload is deserialized through a visitor that sees every key instead.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::RunbookError;
use crate::service::shown_text::echoed_name;

pub const DEVICE_ID: &str = "deviceId";
pub const RELEASE: &str = "release";
pub const COMMENT: &str = "comment";
pub const CALLER_NAME: &str = "callerName";
pub const FORCE: &str = "force";
pub const CANCEL_PENDING: &str = "cancelPending";
pub const DEVICE_IDS: &str = "deviceIds";
pub const WAIT: &str = "wait";
pub const RELEASE_AFTER: &str = "releaseAfter";
pub const DRY_RUN: &str = "dryRun";
pub const CALLBACK_URL: &str = "callbackUrl";

/// Every field the runbook payload may carry, in their documented spelling.
pub const ACCEPTED: &[&str] = &[
    DEVICE_ID,
    DEVICE_IDS,
    RELEASE,
    COMMENT,
    CALLER_NAME,
    FORCE,
    CANCEL_PENDING,
    WAIT,
    RELEASE_AFTER,
    DRY_RUN,
    CALLBACK_URL,
];

/// Known fields, keyed by their canonical name.
pub struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    /// Parse an object whose fields must all be among `accepted`.
    pub fn parse(body: &[u8], accepted: &[&'static str]) -> Result<Self, RunbookError> {
        let raw: RawObject = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                // The only data error our visitor raises is "not an object",
                // and it is raised at the first token: `[1,2` is refused as an
                // array before the missing `]` is seen. Only a body that is
                // valid JSON is "not an object".
                match serde_json::from_slice::<Value>(body) {
                    Ok(value) => RunbookError::NotObject(value_kind(&value)),
                    Err(e) => RunbookError::NotJson(e.to_string()),
                }
            } else {
                RunbookError::NotJson(e.to_string())
            }
        })?;

        let mut known: Vec<(&'static str, Value)> = Vec::with_capacity(raw.0.len());
        for (key, value) in raw.0 {
            let Some(canonical) = accepted.iter().find(|c| c.eq_ignore_ascii_case(&key)) else {
                return Err(RunbookError::UnknownField {
                    field: echoed_name(&key),
                    accepted: accepted.join(", "),
                });
            };
            if known.iter().any(|(k, _)| k == canonical) {
                return Err(RunbookError::DuplicateField {
                    field: echoed_name(&key),
                });
            }
            known.push((canonical, value));
        }
        Ok(Self(known))
    }

    pub fn get(&self, canonical: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| *k == canonical).map(|(_, v)| v)
    }
}

/// A JSON object with its keys in order, duplicates kept.
struct RawObject(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    entries.push((key, value));
                }
                Ok(RawObject(entries))
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// What kind of JSON value the body holds, for the "not an object" message.
fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::Object(_) => "this value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_json_inside_an_object_is_not_json_rather_than_not_object() {
        let err = Fields::parse(br#"{"deviceId": tru}"#, ACCEPTED)
            .err()
            .unwrap();
        assert!(matches!(err, RunbookError::NotJson(_)), "{err:?}");
    }

    #[test]
    fn truncated_json_is_not_json_rather_than_not_object() {
        for truncated in ["[1,2", "\"abc", "[", "tru"] {
            let err = Fields::parse(truncated.as_bytes(), ACCEPTED).err().unwrap();
            assert!(
                matches!(err, RunbookError::NotJson(_)),
                "{truncated}: {err:?}"
            );
        }
        let err = Fields::parse(b"[1,2]", ACCEPTED).err().unwrap();
        assert_eq!(err, RunbookError::NotObject("an array"));
    }

    #[test]
    fn trailing_garbage_is_not_json() {
        let err = Fields::parse(br#"{"deviceId":"x"} {}"#, ACCEPTED)
            .err()
            .unwrap();
        assert!(matches!(err, RunbookError::NotJson(_)), "{err:?}");
    }
}
