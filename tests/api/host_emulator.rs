//! A Functions host emulator: it calls the handler exactly as the host does
//! (launch, request payload, and HTTP proxying or forwarding in
//! <https://learn.microsoft.com/azure/azure-functions/functions-custom-handlers>;
//! what each HTTP mode sends is in docs/http-modes.md) and applies the host's
//! rules to the handler's answers (its response payload), failing the test
//! where a real host would fail the invocation.

use std::time::Duration;

use futures_util::stream;
use http_body_util::BodyExt;
use restrict_code_execution::startup::App;
use serde_json::{Map, Value, json};
use tower::ServiceExt;

pub const HOST_VERSION: &str = "4.1037.0.0";
pub const FUNCTION_NAME: &str = "restrict-code-execution";
/// The host and port the caller reached the Functions host on.
pub const PUBLIC_HOST: &str = "localhost:7071";

/// How the host passes an http-in/http-out function's request on
/// (`customHandler` in host.json): the handler must answer the same in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// `enableForwardingHttpRequest`: the request rebuilt with the caller's
    /// `Host` and every caller header.
    Forwarding,
    /// `enableProxyingHttpRequest`: YARP's reverse proxy, `Host: 127.0.0.1:<port>`,
    /// `X-Forwarded-*` set by the host, the query as sent, streamed.
    Proxying,
}

impl HttpMode {
    pub const BOTH: [Self; 2] = [Self::Forwarding, Self::Proxying];

    /// The mode tests run in unless they choose: the shipped `host.json`'s
    /// (proxying), or `TEST_HTTP_MODE=forwarding` to run the whole suite
    /// in the other mode.
    pub fn for_tests() -> Self {
        match std::env::var("TEST_HTTP_MODE").as_deref() {
            Ok("forwarding") => Self::Forwarding,
            Ok("proxying") | Err(_) => Self::Proxying,
            Ok(other) => panic!("TEST_HTTP_MODE={other}: use forwarding or proxying"),
        }
    }

    /// The `host.json` that selects this mode.
    pub fn host_json(self) -> Value {
        let flag = match self {
            Self::Forwarding => "enableForwardingHttpRequest",
            Self::Proxying => "enableProxyingHttpRequest",
        };
        json!({"version": "2.0", "customHandler": {
            "description": {"defaultExecutablePath": "handler"}, flag: true}})
    }
}

/// Headers a proxy never passes on (RFC 9110 hop-by-hop, as YARP drops them).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Which function the caller calls, and how the host addresses it.
#[derive(Debug, Clone)]
pub struct Route {
    /// The function folder's name (payload mode path).
    pub function: &'static str,
    pub method: &'static str,
    /// The public path, as forwarded (`/api/...`).
    pub path: String,
    /// Route parameters (`Data.req.Params`).
    pub params: Vec<(&'static str, String)>,
}

impl Route {
    pub fn restrict() -> Self {
        Self {
            function: FUNCTION_NAME,
            method: "POST",
            path: format!("/api/{FUNCTION_NAME}"),
            params: Vec::new(),
        }
    }

    pub fn status(action_id: &str) -> Self {
        Self {
            function: "action-status",
            method: "GET",
            path: format!("/api/{FUNCTION_NAME}/actions/{action_id}"),
            params: vec![("actionId", action_id.to_owned())],
        }
    }

    pub fn cancel(action_id: &str) -> Self {
        Self {
            function: "cancel-action",
            method: "POST",
            path: format!("/api/{FUNCTION_NAME}/actions/{action_id}/cancel"),
            params: vec![("actionId", action_id.to_owned())],
        }
    }

    /// The fleet view, `GET /api/restrict-code-execution/devices`.
    pub fn devices() -> Self {
        Self {
            function: "list-devices",
            method: "GET",
            path: format!("/api/{FUNCTION_NAME}/devices"),
            params: Vec::new(),
        }
    }

    pub fn openapi() -> Self {
        Self {
            function: "openapi",
            method: "GET",
            path: "/api/openapi.json".to_owned(),
            params: Vec::new(),
        }
    }
}

/// What the caller (curl, a Logic App, a webhook) sent to the function URL.
#[derive(Debug, Clone)]
pub struct CallerRequest {
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub invocation_id: String,
    /// The caller sends its body chunked, without a `Content-Length`.
    pub chunked: bool,
}

impl CallerRequest {
    pub fn json(body: impl Into<String>) -> Self {
        Self {
            body: Some(body.into()),
            headers: vec![("Content-Type".into(), "application/json".into())],
            query: Vec::new(),
            invocation_id: uuid::Uuid::new_v4().to_string(),
            chunked: false,
        }
    }

    pub fn empty() -> Self {
        Self {
            body: None,
            headers: Vec::new(),
            query: Vec::new(),
            invocation_id: uuid::Uuid::new_v4().to_string(),
            chunked: false,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Send the body chunked, with no `Content-Length` (an upload of unknown length).
    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    pub fn invocation_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.invocation_id);
        self
    }
}

/// What the caller receives from the host.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Payload mode only: the `Logs` the handler returned.
    pub logs: Vec<String>,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// How long the host's client waits for the handler's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct HostEmulator {
    /// The handler's port; 0 for an in-process app, which has none.
    pub port: u16,
    /// How http-in/http-out requests reach the handler.
    pub mode: HttpMode,
    client: reqwest::Client,
    /// The service itself, called in this process instead of over a socket.
    in_process: Option<App>,
}

/// What the host sends, before it goes over a socket or into the service.
struct Outgoing {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: Vec<(String, String)>,
    body: Outbody,
}

enum Outbody {
    None,
    Full(String),
    /// Sent chunked (no length), as the host sends the envelope.
    Chunked(Vec<Vec<u8>>),
    /// Streamed in pieces under the caller's `Content-Length`, as the
    /// proxying host passes a body on.
    Streamed(Vec<Vec<u8>>),
}

/// A body in the pieces a stream delivers it in.
fn pieces(body: &str) -> Vec<Vec<u8>> {
    body.as_bytes().chunks(512).map(<[u8]>::to_vec).collect()
}

impl HostEmulator {
    pub fn new(port: u16) -> Self {
        let client = reqwest::Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .build()
            .unwrap();
        Self {
            port,
            mode: HttpMode::for_tests(),
            client,
            in_process: None,
        }
    }

    /// The same host, passing HTTP requests on in `mode`.
    pub fn with_mode(mut self, mode: HttpMode) -> Self {
        self.mode = mode;
        self
    }

    /// A host whose calls go straight into `app` (the library's own service,
    /// path normalisation and router), in this process.
    pub fn in_process(app: App) -> Self {
        Self {
            in_process: Some(app),
            ..Self::new(0)
        }
    }

    pub fn base(&self) -> String {
        assert!(
            self.in_process.is_none(),
            "an in-process app has no address: start the binary (spawn_app) for socket-level tests"
        );
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Send as the host would: over loopback to the binary, or into the
    /// in-process service with the headers a client puts on the wire.
    async fn send(&self, out: Outgoing) -> (u16, Vec<(String, String)>, String) {
        let Some(app) = &self.in_process else {
            let mut url = out.url;
            url.set_host(Some("127.0.0.1")).unwrap();
            url.set_port(Some(self.port)).unwrap();
            let mut builder = self.client.request(out.method, url);
            for (k, v) in &out.headers {
                builder = builder.header(k, v);
            }
            builder = match out.body {
                Outbody::None => builder,
                Outbody::Full(body) => builder.body(body),
                // A stream body has no length, so reqwest sends it chunked, as the host does.
                Outbody::Chunked(chunks) => builder.body(reqwest::Body::wrap_stream(stream::iter(
                    chunks.into_iter().map(Ok::<_, std::io::Error>),
                ))),
                Outbody::Streamed(chunks) => {
                    let length: usize = chunks.iter().map(Vec::len).sum();
                    builder
                        .header("content-length", length)
                        .body(reqwest::Body::wrap_stream(stream::iter(
                            chunks.into_iter().map(Ok::<_, std::io::Error>),
                        )))
                }
            };
            let response = builder.send().await.expect("the handler answered");
            let status = response.status().as_u16();
            let headers = lower_headers(response.headers());
            let body = response.text().await.unwrap();
            return (status, headers, body);
        };
        let mut builder = axum::http::Request::builder()
            .method(out.method.as_str())
            .uri(&out.url[url::Position::BeforePath..]);
        let has = |name: &str| {
            out.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        };
        // What reqwest and hyper add on the wire when the caller did not.
        if !has("host") {
            builder = builder.header("host", format!("127.0.0.1:{}", self.port));
        }
        if !has("accept") {
            builder = builder.header("accept", "*/*");
        }
        for (k, v) in &out.headers {
            builder = builder.header(k, v);
        }
        let body = match out.body {
            Outbody::None => axum::body::Body::empty(),
            Outbody::Full(body) => {
                builder = builder.header("content-length", body.len());
                axum::body::Body::from(body)
            }
            Outbody::Chunked(chunks) => {
                builder = builder.header("transfer-encoding", "chunked");
                axum::body::Body::from_stream(stream::iter(
                    chunks.into_iter().map(Ok::<_, std::io::Error>),
                ))
            }
            Outbody::Streamed(chunks) => {
                let length: usize = chunks.iter().map(Vec::len).sum();
                builder = builder.header("content-length", length);
                axum::body::Body::from_stream(stream::iter(
                    chunks.into_iter().map(Ok::<_, std::io::Error>),
                ))
            }
        };
        let exchange = async {
            let response = app
                .clone()
                .oneshot(builder.body(body).unwrap())
                .await
                .expect("the service answered");
            let status = response.status().as_u16();
            let headers = lower_headers(response.headers());
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
        };
        // As long as the client over a socket waits (`Self::new`): a service
        // that never answers fails the test rather than hanging the run.
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .expect("the service answered within the client's timeout")
    }

    /// `GET /` every 25 ms until any HTTP response, for up to 30 s.
    pub async fn wait_until_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.client.get(format!("{}/", self.base())).send().await {
                Ok(_) => return,
                Err(e) if e.is_connect() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => panic!("handler never became ready: {e}"),
            }
        }
    }

    /// forwarded mode. The original request goes to `/api/<route>` with the
    /// host's headers added; the handler's answer reaches the caller as is.
    /// The host forwards a body only when it had a Content-Length.
    pub async fn forwarded(&self, request: &CallerRequest) -> ClientResponse {
        self.forwarded_to(&Route::restrict(), request).await
    }

    /// The caller's request as the host passes it on in [`Self::mode`]:
    /// forwarded, or proxied.
    pub async fn forwarded_to(&self, route: &Route, request: &CallerRequest) -> ClientResponse {
        match self.mode {
            HttpMode::Forwarding => self.rebuilt_to(route, request).await,
            HttpMode::Proxying => self.proxied_to(route, request).await,
        }
    }

    /// Proxying mode, as the host's YARP forwarder sends it: the original
    /// method, path and query; every caller header but the hop-by-hop ones
    /// and `Host` (the proxy's own `Host: 127.0.0.1:<port>` instead);
    /// `X-Forwarded-For`, `-Host` and `-Proto` set from the request the host
    /// received, replacing any the caller sent; `User-Agent` untouched; the
    /// invocation id in `X-Azure-Functions-InvocationId` and
    /// `x-ms-invocation-id`; the body streamed as it came. The answer goes to
    /// the caller as is (status, headers but hop-by-hop ones, body).
    pub async fn proxied_to(&self, route: &Route, request: &CallerRequest) -> ClientResponse {
        let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
        let mut url = reqwest::Url::parse(&format!("http://127.0.0.1{}", route.path)).unwrap();
        if !request.query.is_empty() {
            url.query_pairs_mut().extend_pairs(request.query.iter());
        }
        let replaced = |name: &str| {
            let name = name.to_ascii_lowercase();
            HOP_BY_HOP.contains(&name.as_str())
                || name == "host"
                || name == "forwarded"
                || name.starts_with("x-forwarded-")
                || name == "x-azure-functions-hostversion"
                || name == "x-azure-functions-invocationid"
                || name == "x-ms-invocation-id"
        };
        let mut headers: Vec<(String, String)> = Vec::new();
        if !request
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
        {
            headers.push(("User-Agent".to_owned(), "curl/8.5.0".to_owned()));
        }
        headers.extend(
            request
                .headers
                .iter()
                .filter(|(k, _)| !replaced(k))
                .cloned(),
        );
        headers.extend([
            ("X-Forwarded-For".to_owned(), "127.0.0.1".to_owned()),
            ("X-Forwarded-Host".to_owned(), PUBLIC_HOST.to_owned()),
            ("X-Forwarded-Proto".to_owned(), "http".to_owned()),
            (
                "X-Azure-Functions-HostVersion".to_owned(),
                HOST_VERSION.to_owned(),
            ),
            (
                "X-Azure-Functions-InvocationId".to_owned(),
                request.invocation_id.clone(),
            ),
            (
                "x-ms-invocation-id".to_owned(),
                request.invocation_id.clone(),
            ),
        ]);
        // Streamed as it arrives: under its length, or chunked as the caller sent it.
        let body = match &request.body {
            Some(body) if request.chunked => Outbody::Chunked(pieces(body)),
            Some(body) => Outbody::Streamed(pieces(body)),
            None => Outbody::None,
        };
        let (status, headers, body) = self
            .send(Outgoing {
                method,
                url,
                headers,
                body,
            })
            .await;
        let headers = headers
            .into_iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .collect();
        ClientResponse {
            status,
            headers,
            body,
            logs: Vec::new(),
        }
    }

    /// Forwarding mode: the request rebuilt, with the caller's `Host`.
    pub async fn rebuilt_to(&self, route: &Route, request: &CallerRequest) -> ClientResponse {
        let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
        let mut url = reqwest::Url::parse(&format!("http://127.0.0.1{}", route.path)).unwrap();
        if !request.query.is_empty() {
            url.query_pairs_mut().extend_pairs(request.query.iter());
        }
        let mut headers = vec![
            ("Host".to_owned(), PUBLIC_HOST.to_owned()),
            (
                "X-Azure-Functions-HostVersion".to_owned(),
                HOST_VERSION.to_owned(),
            ),
            (
                "X-Azure-Functions-InvocationId".to_owned(),
                request.invocation_id.clone(),
            ),
            (
                "User-Agent".to_owned(),
                format!("curl/8.5.0 Azure-Functions-Host/{HOST_VERSION}"),
            ),
        ];
        headers.extend(request.headers.iter().cloned());
        // The host forwards a body only when the request had a Content-Length.
        let body = match &request.body {
            Some(body) if !request.chunked => Outbody::Full(body.clone()),
            _ => Outbody::None,
        };
        let (status, headers, body) = self
            .send(Outgoing {
                method,
                url,
                headers,
                body,
            })
            .await;
        ClientResponse {
            status,
            headers,
            body,
            logs: Vec::new(),
        }
    }

    /// payload mode. The host POSTs the envelope (chunked) to
    /// `/<FunctionName>` and renders the `res` output for the caller.
    pub async fn payload(&self, request: &CallerRequest) -> ClientResponse {
        self.payload_to(&Route::restrict(), request).await
    }

    /// Payload mode for any function.
    pub async fn payload_to(&self, route: &Route, request: &CallerRequest) -> ClientResponse {
        let envelope = envelope_for_route(route, request);
        self.payload_raw_to(route.function, envelope.to_string(), &request.invocation_id)
            .await
    }

    /// Payload mode with an arbitrary envelope text.
    pub async fn payload_raw(&self, envelope: String, invocation_id: &str) -> ClientResponse {
        self.payload_raw_to(FUNCTION_NAME, envelope, invocation_id)
            .await
    }

    async fn payload_raw_to(
        &self,
        function: &str,
        envelope: String,
        invocation_id: &str,
    ) -> ClientResponse {
        let chunks: Vec<Vec<u8>> = envelope
            .into_bytes()
            .chunks(512)
            .map(<[u8]>::to_vec)
            .collect();
        let headers = vec![
            (
                "X-Azure-Functions-HostVersion".to_owned(),
                HOST_VERSION.to_owned(),
            ),
            (
                "X-Azure-Functions-InvocationId".to_owned(),
                invocation_id.to_owned(),
            ),
            (
                "User-Agent".to_owned(),
                format!("Azure-Functions-Host/{HOST_VERSION}"),
            ),
            (
                "Content-Type".to_owned(),
                "application/json; charset=utf-8".to_owned(),
            ),
            (
                "traceparent".to_owned(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            ),
        ];
        let (status, headers, text) = self
            .send(Outgoing {
                method: reqwest::Method::POST,
                url: reqwest::Url::parse(&format!("http://127.0.0.1/{function}")).unwrap(),
                headers,
                body: Outbody::Chunked(chunks),
            })
            .await;
        let content_type = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map_or("", |(_, v)| v.as_str())
            .to_owned();
        render_host_result(status, &content_type, &text)
    }
}

/// The envelope the host builds for an http trigger named `req`.
pub fn envelope_for_route(route: &Route, request: &CallerRequest) -> Value {
    let mut headers = Map::new();
    let mut meta_headers = Map::new();
    for (k, v) in &request.headers {
        headers.insert(k.clone(), json!([v]));
        meta_headers.insert(k.clone(), json!(v));
    }
    headers.insert("Host".into(), json!(["localhost:7071"]));
    headers.insert("User-Agent".into(), json!(["curl/8.5.0"]));

    let mut req = Map::new();
    let mut url = reqwest::Url::parse(&format!("http://localhost:7071{}", route.path)).unwrap();
    let mut query = Map::new();
    if !request.query.is_empty() {
        url.query_pairs_mut().extend_pairs(request.query.iter());
        for (k, v) in &request.query {
            query.insert(k.clone(), json!(v));
        }
    }
    req.insert("Url".into(), json!(url.to_string()));
    req.insert("Method".into(), json!(route.method));
    req.insert("Query".into(), Value::Object(query.clone()));
    let params: Map<String, Value> = route
        .params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    req.insert("Params".into(), Value::Object(params.clone()));
    req.insert(
        "Identities".into(),
        json!([{
            "AuthenticationType": "WebJobsAuthLevel", "IsAuthenticated": true, "Actor": null,
            "BootstrapContext": null, "Label": null, "Name": null,
            "Claims": [
                {"Type": "http://schemas.microsoft.com/2017/07/functions/claims/authlevel", "Value": "Function"},
                {"Type": "http://schemas.microsoft.com/2017/07/functions/claims/keyid", "Value": "default"}
            ],
            "NameClaimType": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
            "RoleClaimType": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
        }]),
    );

    let mut metadata = Map::new();
    // Body only when the request had a Content-Length > 0.
    if let Some(body) = request
        .body
        .as_ref()
        .filter(|b| !b.is_empty() && !request.chunked)
    {
        headers.insert("Content-Length".into(), json!([body.len().to_string()]));
        meta_headers.insert("Content-Length".into(), json!(body.len().to_string()));
        req.insert("Body".into(), json!(body));
        // top-level non-array properties of an object body, double-encoded.
        if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(body) {
            for (k, v) in fields {
                let encoded = match v {
                    Value::Array(_) | Value::Null => continue,
                    Value::Object(_) => v,
                    Value::String(s) => json!(json!(s).to_string()),
                    other => json!(json!(other.to_string()).to_string()),
                };
                metadata.insert(k, encoded);
            }
        }
    }
    req.insert("Headers".into(), Value::Object(headers));
    // route params and query keys (except code) also arrive double-encoded.
    for (k, v) in &params {
        metadata.insert(k.clone(), json!(v.to_string()));
    }
    metadata.insert("Query".into(), Value::Object(query));
    metadata.insert("Headers".into(), Value::Object(meta_headers));
    metadata.insert(
        "sys".into(),
        json!({"MethodName": route.function, "UtcNow": "2026-11-28T10:00:00.1234567Z", "RandGuid": uuid::Uuid::new_v4().to_string()}),
    );
    json!({"Data": {"req": Value::Object(req)}, "Metadata": Value::Object(metadata)})
}

/// how the host treats the handler's answer, strictly. Anything a real
/// host would turn into a failed invocation fails the test here.
pub fn render_host_result(status: u16, content_type: &str, text: &str) -> ClientResponse {
    assert!(
        (200..300).contains(&status),
        "handler answered HTTP {status}: the host would fail the invocation and the caller would get an empty 500"
    );
    let media = content_type.split(';').next().unwrap_or("").trim();
    assert!(
        media == "application/json" || media == "text/json",
        "handler answered Content-Type {content_type:?}: UnsupportedMediaTypeException in the host"
    );
    let value: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("handler's envelope is not JSON ({e}): {text}"));
    let object = value.as_object().unwrap_or_else(|| {
        panic!("handler's envelope is not an object (null hangs the host): {text}")
    });
    for key in object.keys() {
        assert!(
            ["outputs", "logs", "returnvalue"].contains(&key.to_ascii_lowercase().as_str()),
            "unexpected top-level key {key}"
        );
    }
    let res = value["Outputs"]["res"]
        .as_object()
        .unwrap_or_else(|| panic!("no Outputs.res object: {text}"));
    assert!(
        res.get("status").is_none(),
        "`status` is ignored by the host; use statusCode"
    );
    let status_code = match &res["statusCode"] {
        Value::Number(n) => n.as_u64().expect("integer statusCode"),
        Value::String(s) => s.parse().expect("numeric statusCode"),
        other => panic!("statusCode must be an int, got {other}"),
    };
    let mut headers = Vec::new();
    for (k, v) in res["headers"].as_object().expect("headers object") {
        let v = v
            .as_str()
            .unwrap_or_else(|| panic!("header {k} is not a string (array values break the host)"));
        headers.push((k.to_ascii_lowercase(), v.to_owned()));
    }
    let body = res["body"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "body must be a string to be written verbatim: {}",
                res["body"]
            )
        })
        .to_owned();
    assert!(
        headers.iter().any(|(k, _)| k == "content-type"),
        "no Content-Type: the host would send text/plain"
    );
    let logs = value["Logs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ClientResponse {
        status: u16::try_from(status_code).expect("status fits"),
        headers,
        body,
        logs,
    }
}

fn lower_headers(headers: &reqwest::header::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect()
}
