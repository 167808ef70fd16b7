//! The device to act on: an Entra device id or a Defender machine id.

use std::fmt;

use uuid::Uuid;

use super::{RunbookError, fields::DEVICE_ID, text::quote_snippet};

/// Which device the caller means. Once parsed, the value is safe to put into an
/// OData filter or a URL path: it is hex digits and hyphens only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceRef {
    /// An Entra (Azure AD) device id, looked up with `aadDeviceId eq <guid>`.
    AadDevice(Uuid),
    /// A 40-hex Defender machine id, used directly. Stored lowercase.
    Machine(String),
}

impl DeviceRef {
    pub fn parse(raw: &str) -> Result<Self, RunbookError> {
        let value = raw.trim();
        if value.len() == 40 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::Machine(value.to_ascii_lowercase()));
        }
        // Only the hyphenated 8-4-4-4-12 form: Uuid::parse_str also takes
        // braces, urn: and simple forms, which no caller of ours sends.
        if value.len() == 36
            && let Ok(id) = Uuid::try_parse(value)
        {
            if id.is_nil() {
                return Err(RunbookError::Invalid {
                    field: DEVICE_ID,
                    reason: "is the nil GUID (all zeros), which is no device".into(),
                });
            }
            return Ok(Self::AadDevice(id));
        }
        Err(RunbookError::Invalid {
            field: DEVICE_ID,
            reason: format!(
                "must be an Entra device id (a GUID such as 3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d) \
                 or a 40-character hexadecimal Defender machine id, got {}",
                quote_snippet(raw)
            ),
        })
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Hyphenated lowercase: the form Entra shows and Defender returns.
            Self::AadDevice(id) => write!(f, "{}", id.hyphenated()),
            Self::Machine(id) => f.write_str(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_and_machine_id_forms_are_normalised_to_lowercase() {
        let d = DeviceRef::parse(" 3F1C7A52-8D4E-4B6A-9C21-5E7F0A1B2C3D ").unwrap();
        assert_eq!(d.to_string(), "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d");
        let m = DeviceRef::parse("ABCDEF0123456789abcdef0123456789ABCDEF01").unwrap();
        assert_eq!(
            m,
            DeviceRef::Machine("abcdef0123456789abcdef0123456789abcdef01".into())
        );
    }

    #[test]
    fn anything_else_is_rejected_with_the_accepted_forms() {
        for bad in [
            "",
            "DESKTOP-1",
            "{3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d}",
            "3f1c7a528d4e4b6a9c215e7f0a1b2c3d",
            "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d' or 1 eq 1",
            "00000000-0000-0000-0000-000000000000",
            "abcdef0123456789abcdef0123456789abcdef0",
        ] {
            let err = DeviceRef::parse(bad).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("deviceId"), "{bad}");
        }
        let msg = DeviceRef::parse("DESKTOP-1").unwrap_err().to_string();
        assert!(
            msg.contains("GUID") && msg.contains("40-character"),
            "{msg}"
        );
    }
}
