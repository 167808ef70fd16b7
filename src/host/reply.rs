//! The answer to a caller, before it is wrapped for the host, and the choice
//! between JSON (the default) and readable text (`Accept: text/plain`, for
//! runbook consoles and chat).

use http::StatusCode;
use serde::Serialize;

use crate::host::error::ApiError;

/// How the caller wants the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

impl Format {
    /// Text only when the caller prefers `text/plain` over JSON; `*/*`,
    /// no header, or a tie keeps JSON.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let Some(ranges) = accept.map(AcceptRanges::parse) else {
            return Self::Json;
        };
        let (text, text_named) = ranges.q_of(&["text/plain"], "text/*");
        let (json, json_named) = ranges.q_of(
            &["application/json", "application/problem+json"],
            "application/*",
        );
        if text > json || (text == json && text > 0.0 && text_named && !json_named) {
            Self::Text
        } else {
            Self::Json
        }
    }
}

/// Whether the caller names `text/html` and prefers it over both JSON and
/// `text/plain`: a browser opening the URL. Only functions that have a page
/// (the fleet view) ask; `*/*` or `text/*` alone never gives HTML.
pub fn prefers_html(accept: Option<&str>) -> bool {
    let Some(ranges) = accept.map(AcceptRanges::parse) else {
        return false;
    };
    let (html, html_named) = ranges.q_of(&["text/html"], "text/*");
    let (text, _) = ranges.q_of(&["text/plain"], "text/*");
    let (json, _) = ranges.q_of(
        &["application/json", "application/problem+json"],
        "application/*",
    );
    html_named && html > 0.0 && html > text && html > json
}

/// The media ranges of an `Accept` header with their q values.
struct AcceptRanges(Vec<(String, f32)>);

impl AcceptRanges {
    fn parse(accept: &str) -> Self {
        let mut ranges: Vec<(String, f32)> = Vec::new();
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            ranges.push((media, q));
        }
        Self(ranges)
    }

    /// The q of the most specific range that matches one of `specific`
    /// (and whether one of them was named), else of `family`, else of `*/*`.
    fn q_of(&self, specific: &[&str], family: &str) -> (f32, bool) {
        let find = |name: &str| self.0.iter().find(|(m, _)| m == name).map(|(_, q)| *q);
        if let Some(q) = specific.iter().find_map(|name| find(name)) {
            return (q, true);
        }
        (find(family).or_else(|| find("*/*")).unwrap_or(0.0), false)
    }
}

/// A finished answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    /// Extra headers: Location, Retry-After, Preference-Applied.
    pub extra_headers: Vec<(&'static str, String)>,
    pub body: String,
    /// One human line for the host's invocation log (payload mode `Logs`).
    pub summary: String,
}

impl Reply {
    /// A JSON answer, or its text rendering.
    pub fn new(
        status: StatusCode,
        format: Format,
        json: &impl Serialize,
        text: impl FnOnce() -> String,
        summary: String,
    ) -> Self {
        match format {
            Format::Json => Self {
                status,
                content_type: "application/json",
                extra_headers: Vec::new(),
                body: serde_json::to_string(json).unwrap_or_else(|_| "{}".to_owned()),
                summary,
            },
            Format::Text => Self {
                status,
                content_type: "text/plain; charset=utf-8",
                extra_headers: Vec::new(),
                body: text(),
                summary,
            },
        }
    }

    /// The problem answer for an error.
    pub fn error(error: &ApiError, invocation_id: &str, format: Format) -> Self {
        let problem = error.problem(invocation_id);
        // The host shows the summary as an invocation log line: one line,
        // whatever Defender's message in the detail holds.
        let summary = format!(
            "{} ({}): {}",
            problem.title,
            problem.code,
            crate::service::shown_text::one_line(&problem.detail)
        );
        let mut reply = match format {
            Format::Json => Self {
                status: error.status(),
                content_type: "application/problem+json",
                extra_headers: Vec::new(),
                body: serde_json::to_string(&problem)
                    .unwrap_or_else(|_| format!(r#"{{"code":"{}"}}"#, problem.code)),
                summary: summary.clone(),
            },
            Format::Text => Self {
                status: error.status(),
                content_type: "text/plain; charset=utf-8",
                extra_headers: Vec::new(),
                body: format!(
                    "Error: {} ({}, HTTP {})\n{}\nInvocation {}\n",
                    problem.title,
                    problem.code,
                    problem.status,
                    // Defender's own words are in some details: one line.
                    crate::service::shown_text::one_line(&problem.detail),
                    invocation_id
                ),
                summary: summary.clone(),
            },
        };
        if let Some(seconds) = error.retry_after() {
            reply
                .extra_headers
                .push(("Retry-After", seconds.to_string()));
        }
        if let ApiError::MethodNotAllowed { allowed, .. } = error {
            reply.extra_headers.push(("Allow", allowed.clone()));
        }
        reply
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.extra_headers.push((name, value));
        self
    }

    /// Response headers, as the caller must receive them.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![("Content-Type", self.content_type.to_owned())];
        headers.extend(self.extra_headers.iter().cloned());
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_unless_text_is_preferred() {
        for (accept, want) in [
            (None, Format::Json),
            (Some("*/*"), Format::Json),
            (Some("application/json"), Format::Json),
            (Some("text/plain"), Format::Text),
            (Some("text/plain, */*"), Format::Text),
            (Some("application/json, text/plain"), Format::Json),
            (Some("application/json;q=0.5, text/plain"), Format::Text),
            (Some("text/plain;q=0.1, application/json"), Format::Json),
            (Some("text/html"), Format::Json),
            (Some("text/plain;q=0, */*"), Format::Json),
            (Some("text/*"), Format::Text),
        ] {
            assert_eq!(Format::from_accept(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn html_only_when_named_and_preferred() {
        let browser =
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
        for (accept, want) in [
            (Some(browser), true),
            (Some("text/html"), true),
            (Some("text/html, application/json"), false),
            (Some("text/html;q=0.5, text/plain"), false),
            (Some("text/html;q=0"), false),
            (Some("*/*"), false),
            (Some("text/*"), false),
            (Some("application/json"), false),
            (None, false),
        ] {
            assert_eq!(prefers_html(accept), want, "{accept:?}");
        }
        // A browser still gets JSON from the functions that have no page.
        assert_eq!(Format::from_accept(Some(browser)), Format::Json);
    }
}
