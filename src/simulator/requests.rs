//! The request log: what clients sent to `/api/*` and `/_identity/*`, and what
//! the simulator answered. Tests assert on it (which token was sent, which
//! `$filter`, how many retries).

use serde::{Deserialize, Serialize};

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, still percent-encoded.
    pub query: Option<String>,
    /// The percent-decoded `$filter` value, if any.
    pub filter: Option<String>,
    /// Header names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    /// Request body as text (lossy UTF-8).
    pub body: String,
    /// Status the simulator answered; `0` if it dropped the connection.
    pub status: u16,
    /// Total time in the simulator, including injected delays.
    pub duration_micros: u64,
    /// Time spent handling, without injected delays.
    pub handling_micros: u64,
    /// When it arrived, on the simulated clock (Unix milliseconds): the
    /// moment Defender's rate limit counts it.
    #[serde(default)]
    pub arrived_ms: i64,
}

impl RecordedRequest {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn from_request(parts: &axum::http::request::Parts, body: &[u8]) -> Self {
        let query = parts.uri.query().map(str::to_owned);
        let filter = query.as_deref().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "$filter")
                .map(|(_, v)| v.into_owned())
        });
        Self {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query,
            filter,
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
            status: 0,
            duration_micros: 0,
            handling_micros: 0,
            arrived_ms: 0,
        }
    }
}

struct Entry {
    seq: u64,
    done: bool,
    request: RecordedRequest,
}

/// Requests in arrival order. An entry is reserved when a request arrives and
/// completed when it is answered, so concurrent requests keep their arrival
/// order; entries still in flight are not reported.
#[derive(Default)]
pub(crate) struct RequestLog {
    next_seq: u64,
    entries: Vec<Entry>,
}

impl RequestLog {
    pub(crate) fn begin(&mut self, request: RecordedRequest) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push(Entry {
            seq,
            done: false,
            request,
        });
        seq
    }

    /// Completes an entry; a no-op if the log was cleared meanwhile.
    pub(crate) fn finish(
        &mut self,
        seq: u64,
        status: u16,
        duration_micros: u64,
        handling_micros: u64,
    ) {
        // Entries are in `seq` order: a binary search, not a scan of the log.
        let found = self.entries.binary_search_by_key(&seq, |e| e.seq);
        if let Some(entry) = found.ok().and_then(|at| self.entries.get_mut(at)) {
            entry.done = true;
            entry.request.status = status;
            entry.request.duration_micros = duration_micros;
            entry.request.handling_micros = handling_micros;
        }
    }

    pub(crate) fn completed(&self) -> Vec<RecordedRequest> {
        self.entries
            .iter()
            .filter(|e| e.done)
            .map(|e| e.request.clone())
            .collect()
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> axum::http::request::Parts {
        let (parts, ()) = axum::http::Request::get(uri)
            .header("Authorization", "Bearer abc")
            .header("X-Other", "1")
            .body(())
            .expect("request")
            .into_parts();
        parts
    }

    #[test]
    fn records_decoded_filter_and_lowercase_headers() {
        let rec = RecordedRequest::from_request(
            &parts("/api/machines?$filter=aadDeviceId%20eq%20%27abc%27&$top=5"),
            b"",
        );
        assert_eq!(rec.filter.as_deref(), Some("aadDeviceId eq 'abc'"));
        assert_eq!(
            rec.query.as_deref(),
            Some("$filter=aadDeviceId%20eq%20%27abc%27&$top=5")
        );
        assert_eq!(
            rec.headers[0],
            ("authorization".to_owned(), "Bearer abc".to_owned())
        );
        assert_eq!(rec.header("X-OTHER"), Some("1"));
    }

    #[test]
    fn log_keeps_arrival_order_and_hides_in_flight() {
        let mut log = RequestLog::default();
        let first = log.begin(RecordedRequest::from_request(&parts("/a"), b""));
        let second = log.begin(RecordedRequest::from_request(&parts("/b"), b""));
        log.finish(second, 200, 2, 1);
        assert_eq!(log.completed().len(), 1);
        log.finish(first, 0, 5, 0);
        let paths: Vec<_> = log.completed().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/a", "/b"]);
        log.clear();
        log.finish(first, 200, 1, 1);
        assert!(log.completed().is_empty());
    }
}
