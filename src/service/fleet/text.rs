//! `Accept: text/plain`: one line per device, for runbook consoles and chat.
//!
//! Defender's strings (names, comments) are the caller's or a colleague's
//! free text, written through any tool, not only ours: line breaks become
//! spaces and other control and layout characters (an ESC, a right-to-left
//! override, a line separator) are escaped ([`shown_text::one_line`]), so
//! each device stays on one line and reads in its order.

use std::fmt::Write as _;

use super::{Device, StateFilter};
use crate::{defender::models::MachineAction, service::shown_text};

/// The lines, or one line saying nothing matched.
pub fn render(devices: &[Device], filter: StateFilter, as_of: &str) -> String {
    if devices.is_empty() {
        let what = match filter {
            StateFilter::Restricted => "restricted devices",
            StateFilter::Released => "released devices",
            StateFilter::Pending => "devices with a pending restrict or release",
            StateFilter::All => "devices with restrict or release actions",
        };
        return format!("No {what} as of {as_of}.\n");
    }
    let mut out = String::with_capacity(devices.len() * 160);
    for d in devices {
        let _ = write!(
            out,
            "{} ({}) {}",
            clean(d.computer_dns_name.as_deref().unwrap_or("(no name)")),
            clean(d.machine_id.as_str()),
            d.state.as_str()
        );
        if let Some(since) = &d.since {
            let _ = write!(out, " since {since}");
        }
        if let Some(a) = &d.last_action {
            let _ = write!(out, " by {}", who_and_why(a));
        }
        if let Some(p) = &d.pending_action {
            let _ = write!(
                out,
                "; pending {} {} ({}) by {}",
                clean(p.action_type.as_str()),
                clean(p.status.as_str()),
                clean(p.id.as_str()),
                who_and_why(p)
            );
        }
        out.push('\n');
    }
    out
}

/// The last line under the devices: how many of how many, as of when (an
/// answer can come from a read some seconds old), and how to ask for the
/// next page when there is one. Nothing under an answer saying none matched.
pub fn footer(shown: usize, matching: usize, as_of: &str, next: Option<&str>) -> String {
    if shown == 0 {
        return String::new();
    }
    let mut line = format!("{shown} of {matching} device(s), as of {as_of}.");
    if let Some(token) = next {
        let _ = write!(
            line,
            " Next page: add continuation={token} (the Link header has its URL)."
        );
    }
    line.push('\n');
    line
}

/// `requestor: "comment"`.
fn who_and_why(a: &MachineAction) -> String {
    format!(
        "{}: \"{}\"",
        clean(a.requestor.as_deref().unwrap_or("(unknown)")),
        clean(a.requestor_comment.as_deref().unwrap_or(""))
    )
}

fn clean(s: &str) -> String {
    shown_text::one_line(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::fleet::one_restricted;

    #[test]
    fn one_line_per_device_whatever_the_comments_hold() {
        let (devices, _) =
            one_restricted("m1", "PC-1", "app (contoso)", "line one\nline two\r\tend")
                .select(StateFilter::All);
        let text = render(&devices, StateFilter::All, "now");
        assert_eq!(
            text,
            "PC-1 (m1) restricted since 2026-11-28T10:05:00Z by app (contoso): \"line one line two  end\"\n"
        );
        assert_eq!(
            render(&[], StateFilter::Restricted, "2026-11-28T10:00:00Z"),
            "No restricted devices as of 2026-11-28T10:00:00Z.\n"
        );
    }

    #[test]
    fn layout_characters_from_defender_are_escaped() {
        let (devices, _) = one_restricted(
            "m1",
            "PC\u{202E}cod.exe",
            "eve\u{2028}@contoso",
            "ok\u{1b}[2J\u{85}next",
        )
        .select(StateFilter::All);
        let text = render(&devices, StateFilter::All, "now");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(
            text,
            "PC\\u{202E}cod.exe (m1) restricted since 2026-11-28T10:05:00Z by \
             eve\\u{2028}@contoso: \"ok\\u{001B}[2J\\u{0085}next\"\n"
        );
    }
}
