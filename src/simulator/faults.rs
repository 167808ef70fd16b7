//! Injected faults: make the next matching request(s) fail in a chosen way.
//!
//! A fault matches when its method (if given, case-insensitive) equals the
//! request's and the request path contains `path_contains`. The first matching
//! fault in insertion order fires; after `times` firings it is removed. Faults
//! only ever apply to `/api/*` and `/_identity/*`, never to `/_sim/*`.

use serde::{Deserialize, Serialize};

/// One injected fault. JSON form (for `POST /_sim/faults`):
/// `{"method":"POST","pathContains":"restrictCodeExecution","times":1,"kind":{"status":{"status":503,"retryAfter":null,"body":null}}}`.
/// `method` defaults to any method and `times` to 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Only requests with this method (case-insensitive); `None` matches any.
    #[serde(default)]
    pub method: Option<String>,
    /// A substring of the request path (not the query), e.g. `"restrictCodeExecution"`.
    pub path_contains: String,
    /// What happens to a matching request.
    pub kind: FaultKind,
    /// How often it fires before it is removed; `0` never fires.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

/// What happens to a matching request.
///
/// JSON: `{"status":{"status":429,"retryAfter":5}}`, `{"delay":{"millis":250}}`,
/// `"malformedBody"`, `"dropConnection"`, `"dropAfterHandling"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum FaultKind {
    /// Answer this status instead of handling the request (no state changes).
    /// `body` defaults to a Defender error envelope for the status.
    Status {
        /// The HTTP status to answer.
        status: u16,
        /// `Retry-After` header value in seconds, if any.
        #[serde(default)]
        retry_after: Option<u64>,
        /// The JSON body; `None` gives an error envelope for the status.
        #[serde(default)]
        body: Option<serde_json::Value>,
    },
    /// Sleep (real time), then handle normally.
    Delay {
        /// Milliseconds of real time.
        millis: u64,
    },
    /// Handle normally, then sleep (real time) before answering: the answer
    /// is the state as it was when the request arrived, however late it comes.
    DelayAfterHandling {
        /// Milliseconds of real time.
        millis: u64,
    },
    /// Handle normally (state changes happen), then answer the real status with
    /// a truncated, invalid JSON body.
    MalformedBody,
    /// Do not handle; close the connection without any response.
    DropConnection,
    /// Handle normally (e.g. the action is created), then close the connection
    /// without a response.
    DropAfterHandling,
}

impl Fault {
    /// A fault on any method, firing once.
    pub fn new(path_contains: impl Into<String>, kind: FaultKind) -> Self {
        Self {
            method: None,
            path_contains: path_contains.into(),
            kind,
            times: 1,
        }
    }

    /// Only match this HTTP method.
    #[must_use]
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Fire this many times before being removed.
    #[must_use]
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.contains(&self.path_contains)
    }
}

/// The pending faults, in insertion order.
#[derive(Debug, Default)]
pub(crate) struct FaultList(Vec<Fault>);

impl FaultList {
    pub(crate) fn push(&mut self, fault: Fault) {
        if fault.times > 0 {
            self.0.push(fault);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    pub(crate) fn list(&self) -> Vec<Fault> {
        self.0.clone()
    }

    /// Fires the first fault matching the request, if any.
    pub(crate) fn take_match(&mut self, method: &str, path: &str) -> Option<FaultKind> {
        let index = self.0.iter().position(|f| f.matches(method, path))?;
        let fault = &mut self.0[index];
        fault.times = fault.times.saturating_sub(1);
        let kind = fault.kind.clone();
        if fault.times == 0 {
            self.0.remove(index);
        }
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_camel_case() {
        let json = r#"{"method":"POST","pathContains":"restrictCodeExecution","times":1,"kind":{"status":{"status":503,"retryAfter":null,"body":null}}}"#;
        let fault: Fault = serde_json::from_str(json).expect("parses");
        assert_eq!(
            fault,
            Fault::new(
                "restrictCodeExecution",
                FaultKind::Status {
                    status: 503,
                    retry_after: None,
                    body: None
                }
            )
            .method("POST")
        );
        let unit: Fault =
            serde_json::from_str(r#"{"pathContains":"/api/","kind":"dropConnection"}"#)
                .expect("parses");
        assert_eq!(unit.kind, FaultKind::DropConnection);
        assert_eq!(unit.times, 1);
        let back = serde_json::to_value(Fault::new("x", FaultKind::Delay { millis: 5 }))
            .expect("serializes");
        assert_eq!(back["kind"]["delay"]["millis"], 5);
    }

    #[test]
    fn first_match_wins_and_times_run_out() {
        let mut faults = FaultList::default();
        faults.push(
            Fault::new("machines", FaultKind::MalformedBody)
                .method("get")
                .times(2),
        );
        faults.push(Fault::new("/api/", FaultKind::DropConnection));
        faults.push(Fault::new("never", FaultKind::DropConnection).times(0));

        assert_eq!(
            faults.take_match("POST", "/api/machines/x"),
            Some(FaultKind::DropConnection)
        );
        assert_eq!(
            faults.take_match("GET", "/api/machines"),
            Some(FaultKind::MalformedBody)
        );
        assert_eq!(
            faults.take_match("GET", "/api/machines"),
            Some(FaultKind::MalformedBody)
        );
        assert_eq!(faults.take_match("GET", "/api/machines"), None);
        assert!(faults.list().is_empty());
    }
}
