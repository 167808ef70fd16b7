//! `Accept: text/html`: the fleet view as a page, for a browser opening the
//! function URL with its `code`.
//!
//! Rendered on the server with `maud`, which escapes every interpolated
//! string: Defender's names and comments are free text anyone with the
//! restrict permission could have written. No script and no external asset
//! (the page must work without internet, and the answer's
//! `Content-Security-Policy` allows nothing but the inline style). The table
//! turns into one card per device on a narrow screen.
//!
//! Escaping keeps markup out, but not the characters the payload refuses and
//! Defender keeps (a right-to-left override, a line separator): each of
//! Defender's strings sits in its own `<bdi>` (or a block with `dir="auto"`),
//! so its direction stays inside it and cannot reorder the rest of the row.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use time::{UtcOffset, format_description::FormatItem, macros::format_description};

use super::{Counts, Device, DeviceState, StateFilter};
use crate::defender::{
    models::{ActionType, MachineAction},
    timestamp::Timestamp,
};

/// The `Content-Security-Policy` the page is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const STYLE: &str = r#"
:root { color-scheme: light dark; --line: #8884; --muted: #777; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; padding: 1rem; }
h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
p.meta { color: var(--muted); margin: 0 0 .75rem; }
nav { display: flex; flex-wrap: wrap; gap: .4rem; margin-bottom: 1rem; }
nav a { padding: .3rem .7rem; border: 1px solid var(--line); border-radius: 1rem; text-decoration: none; color: inherit; }
nav a[aria-current] { font-weight: 600; border-color: currentColor; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: .5rem; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
th { font-size: .85rem; color: var(--muted); }
code { font-size: .8rem; color: var(--muted); }
time { white-space: nowrap; }
.state { font-weight: 600; padding: .05rem .45rem; border-radius: .3rem; white-space: nowrap; }
.restricted { background: #c0392b22; color: #c0392b; }
.released { background: #2e7d3222; color: #2e7d32; }
.unknown { background: #7774; }
.comment { white-space: pre-wrap; }
.none { color: var(--muted); }
@media (max-width: 700px) {
  thead { display: none; }
  table, tbody, tr, td { display: block; width: 100%; }
  tr { border: 1px solid var(--line); border-radius: .5rem; margin-bottom: .75rem; padding: .25rem .5rem; }
  td { border: 0; padding: .3rem 0; }
  td::before { content: attr(data-label); display: block; font-size: .75rem; color: var(--muted); }
}
"#;

/// What one page of the view shows.
#[derive(Debug, Clone)]
pub struct Shown<'a> {
    pub devices: &'a [Device],
    pub filter: StateFilter,
    pub counts: Counts,
    /// Devices the filter keeps, on every page.
    pub matching: usize,
    pub as_of: &'a str,
    /// The link to the next page (with the key), if there is one.
    pub next: Option<String>,
}

/// The whole page. `code` is the caller's function key, kept on the filter
/// links so they work as the page itself did.
pub fn render(shown: &Shown<'_>, code: Option<&str>, portal: &str) -> String {
    let Shown {
        devices,
        filter,
        counts,
        matching,
        as_of,
        ..
    } = *shown;
    let heading = match filter {
        StateFilter::Restricted => "Restricted devices",
        StateFilter::Released => "Released devices",
        StateFilter::Pending => "Devices with a pending restrict or release",
        StateFilter::All => "All devices with restrict or release actions",
    };
    let tab_count = |f: StateFilter| match f {
        StateFilter::Restricted => counts.restricted,
        StateFilter::Released => counts.released,
        StateFilter::Pending => counts.pending,
        StateFilter::All => counts.restricted + counts.released + counts.unknown,
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (heading) " · restrict-code-execution" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { (heading) }
                p.meta {
                    span #count { (devices.len()) } " shown of "
                    span #matching { (matching) } ", as of "
                    time #as-of datetime=(as_of) { (readable_text(as_of)) }
                    " (when Defender's actions were read). "
                    (counts.unknown) " with no successful action (state unknown)."
                }
                nav aria-label="Filter by state" {
                    @for f in StateFilter::ALL {
                        a href=(link(f, code)) aria-current=[(f == filter).then_some("page")] {
                            (f.as_str()) " (" (tab_count(f)) ")"
                        }
                    }
                }
                table {
                    thead {
                        tr {
                            th { "Device" }
                            th { "State" }
                            th { "Since" }
                            th { "Requested by and comment" }
                            th { "Pending action" }
                        }
                    }
                    tbody {
                        @for d in devices {
                            (row(d, portal))
                        }
                        @if devices.is_empty() {
                            tr { td.none colspan="5" { "No devices match." } }
                        }
                    }
                }
                @if let Some(next) = &shown.next {
                    p { a #next rel="next" href=(next) { "Next page" } }
                }
            }
        }
    }
    .into_string()
}

/// The device's page in the Defender portal (`portal`: the cloud's portal
/// origin, such as `https://security.microsoft.com`).
pub fn portal_link(portal: &str, machine_id: &str) -> String {
    format!(
        "{}/machines/v2/{}",
        portal.trim_end_matches('/'),
        percent_encoding::utf8_percent_encode(machine_id, percent_encoding::NON_ALPHANUMERIC)
    )
}

fn row(d: &Device, portal: &str) -> Markup {
    html! {
        tr data-machine-id=(d.machine_id) data-state=(d.state.as_str()) {
            td data-label="Device" {
                strong { bdi { (d.computer_dns_name.as_deref().unwrap_or("(no name)")) } }
                br;
                code { (d.machine_id) }
                br;
                a.portal href=(portal_link(portal, &d.machine_id)) rel="noreferrer noopener" target="_blank" {
                    "Open in Defender"
                }
            }
            td data-label="State" {
                span.state.(d.state.as_str()) { (state_label(d.state)) }
                @if let Some(at) = &d.release_at {
                    br;
                    "auto-release " time.release-at datetime=(at) { (readable_text(at)) }
                }
            }
            td data-label="Since" {
                @match &d.since {
                    Some(since) => time datetime=(since) { (readable(since)) },
                    None => span.none { "—" },
                }
            }
            td data-label="Requested by and comment" {
                @match &d.last_action {
                    Some(a) => (who_and_why(a)),
                    None => span.none { "—" },
                }
            }
            td data-label="Pending action" {
                @match &d.pending_action {
                    Some(p) => {
                        strong title=(p.action_type) { (kind_label(p)) } " " (p.status)
                        @if let Some(created) = &p.creation_date_time_utc {
                            ", created " time datetime=(created) { (readable(created)) }
                        }
                        br;
                        (who_and_why(p))
                        br;
                        code { (p.id) }
                    }
                    None => span.none { "none" },
                }
            }
        }
    }
}

fn who_and_why(a: &MachineAction) -> Markup {
    html! {
        span.requestor { bdi { (a.requestor.as_deref().unwrap_or("(unknown)")) } }
        @if let Some(comment) = a.requestor_comment.as_deref().filter(|c| !c.is_empty()) {
            div.comment dir="auto" { (comment) }
        }
    }
}

/// "Restrict" or "Release" for the two action types; any other as Defender names it.
fn kind_label(action: &MachineAction) -> &str {
    match action.action_type.known() {
        Some(ActionType::RestrictCodeExecution) => "Restrict",
        Some(ActionType::UnrestrictCodeExecution) => "Release",
        None => action.action_type.as_str(),
    }
}

/// `2026-11-28 10:05:00 UTC` (the `datetime` attribute keeps Defender's own
/// text).
fn readable(timestamp: &Timestamp) -> String {
    const SHOWN: &[FormatItem<'_>] =
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    let utc = timestamp.at().to_offset(UtcOffset::UTC);
    utc.format(SHOWN).unwrap_or_else(|_| timestamp.to_string())
}

/// [`readable`] for an RFC 3339 text; anything else as it is.
fn readable_text(text: &str) -> String {
    Timestamp::parse(text).map_or_else(|| text.to_owned(), |t| readable(&t))
}

fn state_label(state: DeviceState) -> &'static str {
    match state {
        DeviceState::Restricted => "restricted",
        DeviceState::Released => "released",
        DeviceState::Unknown => "unknown",
    }
}

/// A relative link to this page with another filter, keeping the key.
fn link(filter: StateFilter, code: Option<&str>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("state", filter.as_str());
    if let Some(code) = code {
        query.append_pair("code", code);
    }
    format!("?{}", query.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::fleet::one_restricted;

    #[test]
    fn defender_strings_are_escaped_and_links_keep_the_key() {
        let fleet = one_restricted(
            "m1\"><script>x()</script>",
            "<b>PC</b>",
            "<img src=x onerror=alert(1)>",
            "</td><script>alert('x')</script>&amp;",
        );
        let counts = fleet.counts;
        let (devices, _) = fleet.select(StateFilter::Restricted);
        let page = render(
            &Shown {
                devices: &devices,
                filter: StateFilter::Restricted,
                counts,
                matching: devices.len(),
                as_of: "2026-11-28T11:00:00Z",
                next: None,
            },
            Some("k&y=\"1"),
            "https://security.microsoft.us",
        );
        assert!(
            page.contains(
                r#"href="https://security.microsoft.us/machines/v2/m1%22%3E%3Cscript%3Ex%28%29%3C%2Fscript%3E""#
            ),
            "{page}"
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<b>PC"), "{page}");
        assert!(page.contains("&lt;/td&gt;&lt;script&gt;alert('x')&lt;/script&gt;&amp;amp;"));
        assert!(page.contains(r#"data-machine-id="m1&quot;&gt;&lt;script&gt;x()&lt;/script&gt;""#));
        assert!(
            page.contains(r#"href="?state=all&amp;code=k%26y%3D%221""#),
            "{page}"
        );
        assert!(
            page.contains(r#"aria-current="page">restricted (1)"#),
            "{page}"
        );
    }

    #[test]
    fn defender_strings_are_isolated_so_they_cannot_reorder_the_row() {
        let fleet = one_restricted(
            "m1",
            "PC\u{202E}exe.doc",
            "eve\u{2028}@contoso",
            "ok\u{202E}txt.exe",
        );
        let counts = fleet.counts;
        let (devices, _) = fleet.select(StateFilter::Restricted);
        let page = render(
            &Shown {
                devices: &devices,
                filter: StateFilter::Restricted,
                counts,
                matching: devices.len(),
                as_of: "2026-11-28T11:00:00Z",
                next: None,
            },
            None,
            "https://security.microsoft.com",
        );
        assert!(
            page.contains("<strong><bdi>PC\u{202E}exe.doc</bdi></strong>"),
            "{page}"
        );
        assert!(
            page.contains("<span class=\"requestor\"><bdi>eve\u{2028}@contoso</bdi></span>"),
            "{page}"
        );
        assert!(
            page.contains("<div class=\"comment\" dir=\"auto\">ok\u{202E}txt.exe</div>"),
            "{page}"
        );
    }
}
