//! The functions, one module each: what an invocation of each one does.

pub mod cancel;
pub mod devices;
pub mod openapi;
pub mod restrict;
pub mod status;

use crate::runbook::RunbookError;

/// A Defender machine action id: a GUID. Checked before it goes into a URL.
pub(crate) fn action_id(raw: Option<&String>) -> Result<String, RunbookError> {
    let value = raw.map(|s| s.trim()).unwrap_or("");
    match uuid::Uuid::try_parse(value) {
        Ok(id) if value.len() == 36 => Ok(id.hyphenated().to_string()),
        _ => Err(RunbookError::Invalid {
            field: "actionId",
            reason: format!(
                "must be a Defender machine action id (a GUID), got {:?}",
                value.chars().take(64).collect::<String>()
            ),
        }),
    }
}
