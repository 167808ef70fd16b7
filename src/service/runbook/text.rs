//! Free-text fields: the comment recorded in Defender and the caller's name.

use serde_json::Value;

use crate::service::shown_text::is_layout_control;

use super::{
    RunbookError,
    fields::{CALLER_NAME, COMMENT},
};

/// The comment used when the caller gives none (the RealmJoin runbook's default).
pub const DEFAULT_COMMENT: &str = "Possible security risk.";
pub const MAX_COMMENT_CHARS: usize = 1000;
pub const MAX_CALLER_CHARS: usize = 256;

/// The reason recorded in Defender: 1..=1000 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment(String);

impl Comment {
    /// Missing, null or blank means the default comment.
    pub fn parse(value: Option<&Value>) -> Result<Self, RunbookError> {
        match optional_text(COMMENT, value, MAX_COMMENT_CHARS)? {
            Some(text) => Ok(Self(text)),
            None => Ok(Self(DEFAULT_COMMENT.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who asked, for the audit trail (Defender records the app, not the person).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerName(String);

impl CallerName {
    /// Missing, null or blank means no caller.
    pub fn parse(value: Option<&Value>) -> Result<Option<Self>, RunbookError> {
        Ok(optional_text(CALLER_NAME, value, MAX_CALLER_CHARS)?.map(Self))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn optional_text(
    field: &'static str,
    value: Option<&Value>,
    max_chars: usize,
) -> Result<Option<String>, RunbookError> {
    let raw = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(RunbookError::Invalid {
                field,
                reason: format!("must be a string, got {}", super::describe(other)),
            });
        }
    };
    // Checked before trimming: a newline is refused wherever it is, even at
    // the end (where trimming would hide it) or alone (where the text would
    // otherwise count as blank and become the default).
    if let Some(c) = raw.chars().find(|c| c.is_control()) {
        return Err(RunbookError::Invalid {
            field,
            reason: format!(
                "contains the control character U+{:04X}; send plain text on one line",
                u32::from(c)
            ),
        });
    }
    if let Some(c) = raw.chars().find(|&c| is_layout_control(c)) {
        return Err(RunbookError::Invalid {
            field,
            reason: format!(
                "contains U+{:04X}, a line separator or bidirectional formatting character that \
                 can make the text display as something else; send plain text on one line",
                u32::from(c)
            ),
        });
    }
    let text = raw.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(RunbookError::Invalid {
            field,
            reason: format!("is {chars} characters long; the limit is {max_chars}"),
        });
    }
    Ok(Some(text.to_owned()))
}

/// A value quoted for an error message: at most 64 characters, escaped.
pub(crate) fn quote_snippet(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    format!("{out:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blank_comment_falls_back_to_the_default() {
        for v in [None, Some(json!(null)), Some(json!("   "))] {
            assert_eq!(
                Comment::parse(v.as_ref()).unwrap().as_str(),
                DEFAULT_COMMENT
            );
        }
    }

    #[test]
    fn comment_limits_count_characters_not_bytes() {
        let ok = "é".repeat(1000);
        assert!(Comment::parse(Some(&json!(ok))).is_ok());
        let long = "é".repeat(1001);
        assert!(Comment::parse(Some(&json!(long))).is_err());
    }

    #[test]
    fn control_characters_are_rejected() {
        for bad in [
            "a\nb",
            "a\u{0}b",
            "tab\there",
            "\u{7f}",
            "\n\n",
            "Ticket 42\n",
            "\r\n",
            "a\u{2028}b",
            "a\u{2029}b",
            "admin\u{202E}gnp.exe",
            "\u{202A}x",
            "\u{2066}x\u{2069}",
            "x\u{2068}",
        ] {
            let err = Comment::parse(Some(&json!(bad))).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("comment"), "{bad:?}");
            let err = CallerName::parse(Some(&json!(bad))).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("callerName"), "{bad:?}");
        }
    }

    #[test]
    fn non_string_values_are_rejected() {
        assert!(Comment::parse(Some(&json!(5))).is_err());
        assert!(CallerName::parse(Some(&json!({"a": 1}))).is_err());
    }
}
