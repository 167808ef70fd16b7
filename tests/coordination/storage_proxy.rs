//! A fault-injecting HTTP proxy between the code under test and Azurite.
//!
//! Azurite answers what a healthy storage account answers; real Azure also
//! answers 503 `ServerBusy` when throttling, 500 when failing, refuses a
//! metadata write whose lease is gone, and can refuse an acquire for a while
//! after a lease expired. The proxy forwards every request to Azurite
//! unchanged, except those an injected [`Rule`] matches: these get the
//! rule's status and storage error code, and never reach Azurite. Every
//! request is recorded with its kind and the status it got, so that tests
//! count storage operations as storage saw them.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{body::Body, extract::State, http::Response};
use restrict_code_execution::coordination::StorageSettings;

use crate::azurite::Azurite;

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The path, container and blob name included, percent-decoded.
    pub path: String,
    pub kind: &'static str,
    /// What it was answered: Azurite's status, or an injected one.
    pub status: u16,
}

impl Seen {
    fn of(parts: &axum::http::request::Parts) -> Self {
        let query = parts.uri.query().unwrap_or_default();
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        };
        let lease_action = parts
            .headers
            .get("x-ms-lease-action")
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let method = parts.method.as_str().to_owned();
        let kind = match (
            param("comp").as_deref(),
            param("restype").as_deref(),
            method.as_str(),
        ) {
            (Some("lease"), _, _) => match lease_action.as_deref() {
                Some("acquire") => "acquire_lease",
                Some("renew") => "renew_lease",
                Some("release") => "release_lease",
                _ => "other_lease",
            },
            (Some("metadata"), _, "PUT") => "set_metadata",
            (Some("list"), _, _) => "list",
            (None, Some("container"), "PUT") => "create_container",
            (None, None, "HEAD") => "get_properties",
            (None, None, "GET") => "read",
            (None, None, "PUT") => "write",
            (None, None, "DELETE") => "delete",
            _ => "other",
        };
        Self {
            path: percent_encoding::percent_decode_str(parts.uri.path())
                .decode_utf8_lossy()
                .into_owned(),
            kind,
            status: 0,
        }
    }
}

/// Answer requests of `kind` whose path contains `path_contains` with
/// `status` and the storage error `code`, after letting the first `after`
/// such requests through, `times` times.
#[derive(Debug, Clone)]
pub struct Rule {
    kind: &'static str,
    path_contains: String,
    status: u16,
    code: &'static str,
    after: u32,
    times: u32,
    /// Forward the request after this pause instead of answering it.
    delay: Option<std::time::Duration>,
}

impl Rule {
    pub fn new(kind: &'static str, path_contains: &str, status: u16, code: &'static str) -> Self {
        Self {
            kind,
            path_contains: path_contains.to_owned(),
            status,
            code,
            after: 0,
            times: 1,
            delay: None,
        }
    }

    /// Forward matching requests of `kind` to Azurite after `pause`: a slow
    /// storage account rather than a failing one.
    pub fn slow(kind: &'static str, path_contains: &str, pause: std::time::Duration) -> Self {
        Self {
            delay: Some(pause),
            ..Self::new(kind, path_contains, 0, "")
        }
    }

    /// Let the first `n` matching requests through.
    pub fn after(mut self, n: u32) -> Self {
        self.after = n;
        self
    }

    /// Answer this many matching requests (after those let through).
    pub fn times(mut self, n: u32) -> Self {
        self.times = n;
        self
    }

    fn matches(&self, seen: &Seen) -> bool {
        self.kind == seen.kind && seen.path.contains(&self.path_contains)
    }
}

enum Fault {
    Answer(u16, &'static str),
    Slow(std::time::Duration),
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    client: reqwest::Client,
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
}

impl Shared {
    /// What a rule does with `seen`, if one takes it.
    fn fault(&self, seen: &Seen) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let index = rules.iter().position(|r| r.matches(seen))?;
        let rule = &mut rules[index];
        if rule.after > 0 {
            rule.after -= 1;
            return None;
        }
        let answer = match rule.delay {
            Some(pause) => Fault::Slow(pause),
            None => Fault::Answer(rule.status, rule.code),
        };
        rule.times -= 1;
        if rule.times == 0 {
            rules.remove(index);
        }
        Some(answer)
    }
}

pub struct StorageProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl StorageProxy {
    /// Listen on a free loopback port (on the calling runtime), forwarding
    /// to the blob service of `azurite`.
    pub async fn start(azurite: &Azurite) -> Self {
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], azurite.port)),
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap(),
            rules: Mutex::default(),
            seen: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { port, shared }
    }

    pub fn inject(&self, rule: Rule) {
        self.shared.rules.lock().unwrap().push(rule);
    }

    pub fn clear_rules(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn clear_seen(&self) {
        self.shared.seen.lock().unwrap().clear();
    }

    /// How many requests of `kind` on a path containing `path_contains`.
    pub fn count(&self, kind: &str, path_contains: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.kind == kind && s.path.contains(path_contains))
            .count()
    }

    /// `AzureWebJobsStorage` for `azurite`, its blob endpoint through this
    /// proxy (its queue endpoint direct).
    pub fn connection_string(&self, azurite: &Azurite) -> String {
        azurite.connection_string().replace(
            &format!("127.0.0.1:{}/", azurite.port),
            &format!("127.0.0.1:{}/", self.port),
        )
    }

    /// Storage settings for `container`, through this proxy.
    pub fn settings(&self, azurite: &Azurite, container: &str) -> StorageSettings {
        let mut settings = azurite.settings(container);
        settings.blob_endpoint.set_port(Some(self.port)).unwrap();
        settings
    }
}

async fn relay(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let mut seen = Seen::of(&parts);
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let response = match shared.fault(&seen) {
        Some(Fault::Slow(pause)) => {
            tokio::time::sleep(pause).await;
            forward(&shared, &parts, body).await
        }
        Some(Fault::Answer(status, code)) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code>\
                 <Message>Injected by the test proxy.</Message></Error>"
            );
            let body = if parts.method == axum::http::Method::HEAD {
                Body::empty()
            } else {
                Body::from(xml)
            };
            Response::builder()
                .status(status)
                .header("x-ms-error-code", code)
                .header("content-type", "application/xml")
                .body(body)
                .unwrap()
        }
        None => forward(&shared, &parts, body).await,
    };
    seen.status = response.status().as_u16();
    shared.seen.lock().unwrap().push(seen);
    response
}

async fn forward(
    shared: &Shared,
    parts: &axum::http::request::Parts,
    body: axum::body::Bytes,
) -> Response<Body> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let url = format!("http://{}{path_and_query}", shared.upstream);
    let mut headers = parts.headers.clone();
    // Content-Length stays: storage wants it on a PUT, even of nothing.
    for hop in ["host", "connection", "transfer-encoding"] {
        headers.remove(hop);
    }
    let answer = shared
        .client
        .request(parts.method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let Ok(answer) = answer else {
        return Response::builder().status(502).body(Body::empty()).unwrap();
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !matches!(name.as_str(), "connection" | "transfer-encoding") {
            response = response.header(name, value);
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    response.body(Body::from(bytes)).unwrap()
}
