//! `list-devices`: `GET /api/restrict-code-execution/devices?state=restricted|released|pending|all`.
//!
//! The fleet view ([`crate::service::fleet`]): which machines are restricted
//! right now, since when and by whom, from one tenant-wide read of the restrict
//! and unrestrict actions (a few paged list calls, never one per machine). JSON
//! by default, one line per device with `Accept: text/plain`, a page for a
//! browser (`Accept: text/html`).

use http::StatusCode;
use tokio::time::Instant;

use super::Record;
use crate::{
    host::{
        app_state::AppState,
        error::ApiError,
        invocation::Invocation,
        reply::{self, Format, Reply},
    },
    service::fleet::{
        Answer, Cursor, DeviceState, PageRequest, StateFilter, page, read::Source, rfc3339, text,
    },
};

/// What the caller reads the answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Html,
    Other(Format),
}

pub async fn run(
    state: &AppState,
    invocation: &Invocation,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let shape = if prefers_html(invocation) {
        Shape::Html
    } else {
        Shape::Other(invocation.format())
    };
    list(state, invocation, shape, record).await
}

/// How an error is answered: a browser shows text/plain as it is, where JSON
/// would be one long line.
pub fn error_format(invocation: &Invocation) -> Format {
    if prefers_html(invocation) {
        Format::Text
    } else {
        invocation.format()
    }
}

fn prefers_html(invocation: &Invocation) -> bool {
    let accept = invocation
        .headers
        .get("accept")
        .map(|values| values.join(", "));
    reply::prefers_html(accept.as_deref())
}

async fn list(
    state: &AppState,
    invocation: &Invocation,
    shape: Shape,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let filter = StateFilter::from_query(&invocation.query)?;
    let wanted = PageRequest::from_query(&invocation.query)?;
    let deadline = Instant::now() + state.request_timeout();
    let view = state.restrictor().fleet_view(deadline).await?;
    let read = &view.read;
    let mut page = read.fleet.page(filter, &wanted);
    let counts = read.fleet.counts;
    // The expiries this service keeps (one listing of its records; a
    // storage failure leaves them out rather than failing the view).
    if let Some(reconciler) = state.reconciler() {
        match reconciler.restrictions().release_times().await {
            Ok(times) => {
                for device in &mut page.devices {
                    if device.state == DeviceState::Restricted {
                        device.release_at = times
                            .get(&device.machine_id.to_string().to_ascii_lowercase())
                            .map(|at| rfc3339(*at));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the expiries could not be read for the fleet view")
            }
        }
    }
    let as_of = rfc3339(read.sent_at);
    let calls = if view.source == Source::Read {
        read.calls
    } else {
        0
    };
    let summary = format!(
        "{} of {} device(s) {}, as of {as_of} ({} read: {} action(s) in {} Defender call(s))",
        page.devices.len(),
        page.matching,
        filter.as_str(),
        view.source.as_str(),
        read.actions,
        read.calls
    );
    record.outcome = Some("listed");
    record.devices = Some(page.devices.len());
    record.actions = Some(read.actions);
    record.defender_calls = Some(calls);
    let continuation = page.next.as_ref().map(Cursor::token);
    // The next page, relative to this one, without the caller's key.
    let next_link = continuation
        .as_deref()
        .map(|token| next_page(filter, wanted.size, token, None));
    let reply = match shape {
        Shape::Html => {
            let code = invocation
                .query
                .iter()
                .find(|(k, _)| k == "code")
                .map(|(_, v)| v.as_str());
            Reply {
                status: StatusCode::OK,
                content_type: "text/html; charset=utf-8",
                extra_headers: Vec::new(),
                body: page::render(
                    &page::Shown {
                        devices: &page.devices,
                        filter,
                        counts,
                        matching: page.matching,
                        as_of: &as_of,
                        next: continuation
                            .as_deref()
                            .map(|token| next_page(filter, wanted.size, token, code)),
                    },
                    code,
                    state.portal(),
                ),
                summary,
            }
            .with_header(
                "Content-Security-Policy",
                page::CONTENT_SECURITY_POLICY.to_owned(),
            )
            // The URL carries the function key: keep it out of caches and referrers.
            .with_header("Cache-Control", "no-store".to_owned())
            .with_header("Referrer-Policy", "no-referrer".to_owned())
            .with_header("X-Content-Type-Options", "nosniff".to_owned())
        }
        Shape::Other(Format::Text) => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Vec::new(),
            body: text::render(&page.devices, filter, &as_of)
                + &text::footer(
                    page.devices.len(),
                    page.matching,
                    &as_of,
                    continuation.as_deref(),
                ),
            summary,
        },
        Shape::Other(Format::Json) => {
            let answer = Answer::new(&page, filter, counts, as_of, wanted.size);
            Reply {
                status: StatusCode::OK,
                content_type: "application/json",
                extra_headers: Vec::new(),
                body: exact_json(&answer),
                summary,
            }
        }
    };
    // Every format names the next page the same way (RFC 8288).
    Ok(match next_link {
        Some(link) => reply.with_header("Link", format!("<{link}>; rel=\"next\"")),
        None => reply,
    })
}

/// A relative link to the next page: the same filter and page size, the
/// continuation token, and the caller's key only where it is given (the
/// HTML page's own links, which a browser follows as they are).
fn next_page(filter: StateFilter, size: usize, token: &str, code: Option<&str>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("state", filter.as_str());
    if size != PageRequest::DEFAULT_SIZE {
        query.append_pair("pageSize", &size.to_string());
    }
    query.append_pair("continuation", token);
    if let Some(code) = code {
        query.append_pair("code", code);
    }
    format!("?{}", query.finish())
}

/// The JSON text in a buffer of exactly its size: a tenant-wide answer runs to
/// megabytes, and a doubling buffer would hold up to twice that. Writing our
/// own types into memory cannot fail; like [`Reply::new`], the fallback is `{}`.
fn exact_json(answer: &Answer<'_>) -> String {
    /// Counts the bytes written to it.
    struct Length(usize);
    impl std::io::Write for Length {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut length = Length(0);
    let mut body = match serde_json::to_writer(&mut length, answer) {
        Ok(()) => Vec::with_capacity(length.0),
        Err(_) => Vec::new(),
    };
    match serde_json::to_writer(&mut body, answer) {
        Ok(()) => String::from_utf8(body).unwrap_or_else(|_| "{}".to_owned()),
        Err(_) => "{}".to_owned(),
    }
}
