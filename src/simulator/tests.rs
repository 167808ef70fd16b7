//! Over-HTTP tests: a real simulator on 127.0.0.1:0 driven with reqwest.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::seed::*;
use super::*;
use crate::defender::models::{ErrorEnvelope, ODataPage};

async fn start(config: SimConfig) -> SimHandle {
    Simulator::start("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("simulator starts")
}

/// A clock that (for a test's duration) stands still unless advanced.
fn frozen() -> SimConfig {
    SimConfig {
        speed: 1e-9,
        ..SimConfig::default()
    }
}

struct Api {
    sim: SimHandle,
    http: reqwest::Client,
}

impl Api {
    async fn new(config: SimConfig) -> Self {
        Self {
            sim: start(config).await,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.sim.url()))
            .bearer_auth("test-token")
            .send()
            .await
            .expect("response")
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.try_post(path, body).await.expect("response")
    }

    async fn try_post(&self, path: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}{path}", self.sim.url()))
            .bearer_auth("test-token")
            .json(body)
            .send()
            .await
    }

    async fn restrict(&self, machine: &str) -> reqwest::Response {
        let path = format!("/api/machines/{machine}/restrictCodeExecution");
        self.post(&path, &json!({"Comment": "test"})).await
    }

    /// The `value` ids of a machine list.
    async fn machine_ids(&self, path: &str) -> Vec<String> {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let page: ODataPage<Machine> = response.json().await.expect("page");
        page.value.into_iter().map(|m| m.id.to_string()).collect()
    }
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: ErrorEnvelope = response.json().await.expect("error envelope");
    let target = body.error.target.unwrap_or_default();
    assert!(super::filter::is_guid(&target), "target {target:?}");
    (status, body.error.code, body.error.message)
}

async fn body(response: reqwest::Response) -> Value {
    response.json().await.expect("json body")
}

#[tokio::test]
async fn unauthorized_without_bearer_token() {
    let api = Api::new(SimConfig::default()).await;
    let response = api
        .http
        .get(format!("{}/api/machines", api.sim.url()))
        .send()
        .await
        .expect("response");
    assert_eq!(
        response.headers()["content-type"],
        "application/json; odata.metadata=minimal"
    );
    assert_eq!(response.headers()["odata-version"], "4.0");
    let (status, code, _) = error_code(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "Unauthorized")
    );

    let log = api.sim.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, 401);
    assert_eq!(log[0].header("authorization"), None);
}

#[tokio::test]
async fn lookup_by_aad_device_id_in_both_literal_forms() {
    let api = Api::new(SimConfig::default()).await;
    let bare = format!("/api/machines?$filter=aadDeviceId%20eq%20{BRAVO_AAD_DEVICE_ID}");
    let quoted = format!("/api/machines?$filter=aadDeviceId+eq+%27{BRAVO_AAD_DEVICE_ID}%27");
    let expected = [
        BRAVO_STALE_MACHINE_ID,
        BRAVO_MACHINE_ID,
        BRAVO_MERGED_MACHINE_ID,
    ];
    assert_eq!(api.machine_ids(&bare).await, expected);
    assert_eq!(api.machine_ids(&quoted).await, expected);

    let upper = ALPHA_AAD_DEVICE_ID.to_ascii_uppercase();
    let spaced = format!(
        "/api/machines?$filter=%20aadDeviceId%20%20eq%20{upper}%20and%20healthStatus%20eq%20%27Active%27"
    );
    assert_eq!(api.machine_ids(&spaced).await, [ALPHA_MACHINE_ID]);

    let none = "/api/machines?$filter=aadDeviceId%20eq%2000000000-0000-0000-0000-000000000000";
    assert!(api.machine_ids(none).await.is_empty());

    let response = api.get(&bare).await;
    let page = body(response).await;
    assert_eq!(
        page["@odata.context"],
        format!("{}/api/$metadata#Machines", api.sim.url())
    );
    assert!(page.get("@odata.nextLink").is_none());

    let log = api.sim.requests();
    assert_eq!(
        log[0].filter.as_deref(),
        Some(format!("aadDeviceId eq {BRAVO_AAD_DEVICE_ID}").as_str())
    );
    assert_eq!(log[0].header("Authorization"), Some("Bearer test-token"));
    assert_eq!(
        log[1].filter.as_deref(),
        Some(format!("aadDeviceId eq '{BRAVO_AAD_DEVICE_ID}'").as_str())
    );
}

#[tokio::test]
async fn bad_and_unmodelled_queries() {
    let api = Api::new(SimConfig::default()).await;
    for (path, status, code) in [
        (
            "/api/machines?$filter=aadDeviceId%20eq%20nope",
            400,
            "ODataError",
        ),
        ("/api/machines?$filter=aadDeviceId%20eq", 400, "ODataError"),
        (
            "/api/machines?$filter=osPlatform%20eq%20%27Linux%27",
            501,
            "NotImplementedInSimulator",
        ),
        (
            "/api/machines?$filter=id%20eq%20%27a%27%20or%20id%20eq%20%27b%27",
            501,
            "NotImplementedInSimulator",
        ),
        ("/api/machines?$top=0", 400, "ODataError"),
        ("/api/machines?$select=id", 501, "NotImplementedInSimulator"),
        ("/api/machineactions?$stop=2", 400, "ODataError"),
        (
            "/api/machineactions?$orderby=creationDateTimeUtc%20asc",
            501,
            "NotImplementedInSimulator",
        ),
        (
            "/api/machineactions?$filter=creationDateTimeUtc%20gt%202024-01-01Z",
            501,
            "NotImplementedInSimulator",
        ),
        ("/api/v1.0/machines", 501, "NotImplementedInSimulator"),
        ("/api/alerts", 501, "NotImplementedInSimulator"),
    ] {
        let (got_status, got_code, message) = error_code(api.get(path).await).await;
        assert_eq!(
            (got_status.as_u16(), got_code.as_str()),
            (status, code),
            "{path}: {message}"
        );
    }
    let ok = api
        .get("/api/machineactions?$orderby=creationDateTimeUtc%20desc&$top=10")
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn get_machine_by_id_or_name() {
    let api = Api::new(SimConfig::default()).await;
    let by_id = api
        .get(&format!(
            "/api/machines/{}",
            ALPHA_MACHINE_ID.to_ascii_uppercase()
        ))
        .await;
    assert_eq!(by_id.status(), StatusCode::OK);
    let machine: Machine = by_id.json().await.expect("machine");
    assert_eq!(machine.computer_dns_name.as_deref(), Some(ALPHA_NAME));
    assert_eq!(machine.extra["isAadJoined"], true);

    let by_name = api.get(&format!("/api/machines/{KIOSK_NAME}")).await;
    let machine: Machine = by_name.json().await.expect("machine");
    assert_eq!(
        (machine.id.as_str(), machine.aad_device_id),
        (KIOSK_MACHINE_ID, None)
    );

    let (status, code, message) = error_code(api.get("/api/machines/nope").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
    assert_eq!(message, "Machine nope was not found");

    // Three records share this name: the simulator will not guess.
    let (status, _, _) = error_code(api.get(&format!("/api/machines/{BRAVO_NAME}")).await).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test]
async fn restrict_duplicate_list_and_cancel() {
    let api = Api::new(frozen()).await;
    let response = api.restrict(ALPHA_MACHINE_ID).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created = body(response).await;
    assert_eq!(created["type"], "RestrictCodeExecution");
    assert_eq!(created["status"], "Pending");
    assert_eq!(created["requestor"], REQUESTOR);
    assert_eq!(created["requestorComment"], "test");
    assert_eq!(created["requestSource"], "PublicApi");
    assert_eq!(created["machineId"], ALPHA_MACHINE_ID);
    // Filled from creation, as real answers are (`ActionFields::FromCreation`).
    assert_eq!(created["computerDnsName"], ALPHA_NAME);
    assert_eq!(
        created["lastUpdateDateTimeUtc"],
        created["creationDateTimeUtc"]
    );
    assert_eq!(created["title"], "Restrict code execution");
    assert_eq!(created["errorHResult"], 0);
    assert_eq!(created["commands"], json!([]));
    let restrict_id = created["id"].as_str().expect("id").to_owned();
    assert!(super::filter::is_guid(&restrict_id));

    let (status, code, message) = error_code(api.restrict(ALPHA_MACHINE_ID).await).await;
    assert_eq!(
        (status, code.as_str(), message.as_str()),
        (
            StatusCode::BAD_REQUEST,
            "ActiveRequestAlreadyExists",
            "Action is already in progress"
        )
    );

    // The opposite type is not a duplicate.
    let path = format!("/api/machines/{ALPHA_MACHINE_ID}/unrestrictCodeExecution");
    let unrestrict = api.post(&path, &json!({"Comment": "undo"})).await;
    assert_eq!(unrestrict.status(), StatusCode::CREATED);
    let unrestrict_id = body(unrestrict).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    api.sim.advance(Duration::from_millis(1));
    assert_eq!(
        api.restrict(CHARLIE_MACHINE_ID).await.status(),
        StatusCode::CREATED
    );

    // Newest first, and filtered.
    let all: ODataPage<MachineAction> = api
        .get("/api/machineactions")
        .await
        .json()
        .await
        .expect("page");
    assert_eq!(all.value.len(), 3);
    assert_eq!(all.value[0].machine_id.as_deref(), Some(CHARLIE_MACHINE_ID));
    assert_eq!(all.value[1].id, unrestrict_id);
    let filtered: ODataPage<MachineAction> = api
        .get(&format!(
            "/api/machineactions?$filter=machineId%20eq%20%27{ALPHA_MACHINE_ID}%27%20and%20type%20eq%20%27RestrictCodeExecution%27%20and%20status%20eq%20%27Pending%27"
        ))
        .await
        .json()
        .await
        .expect("page");
    let ids: Vec<_> = filtered.value.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, [restrict_id.as_str()]);

    let got = api.get(&format!("/api/machineactions/{restrict_id}")).await;
    assert_eq!(got.status(), StatusCode::OK);

    // Cancel, then cancelling again names the final status.
    let cancel_path = format!("/api/machineactions/{restrict_id}/cancel");
    let cancelled = api.post(&cancel_path, &json!({"Comment": "oops"})).await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let cancelled = body(cancelled).await;
    assert_eq!(cancelled["status"], "Cancelled");
    assert_eq!(cancelled["cancellationComment"], "oops");
    assert_eq!(cancelled["cancellationRequestor"], REQUESTOR);
    assert!(cancelled["cancellationDateTimeUtc"].is_string());
    let (status, code, message) =
        error_code(api.post(&cancel_path, &json!({"Comment": "again"})).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "BadRequest")
    );
    assert!(message.contains("Cancelled"), "{message}");
    let (status, code, _) = error_code(
        api.post("/api/machineactions/nope/cancel", &json!({"Comment": "x"}))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );

    // The cancelled action no longer blocks a new one.
    assert_eq!(
        api.restrict(ALPHA_MACHINE_ID).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(api.sim.actions().len(), 4);
}

#[tokio::test]
async fn restrict_body_and_platform_rules() {
    let api = Api::new(frozen()).await;
    let restrict = format!("/api/machines/{ALPHA_MACHINE_ID}/restrictCodeExecution");
    for (body, code) in [
        (json!({"comment": "lowercase"}), "MissingRequiredParameter"),
        (json!({"Comment": null}), "MissingRequiredParameter"),
        (json!(["Comment"]), "InvalidRequestBody"),
        (json!("Comment"), "InvalidRequestBody"),
    ] {
        let (status, got, _) = error_code(api.post(&restrict, &body).await).await;
        assert_eq!(
            (status, got.as_str()),
            (StatusCode::BAD_REQUEST, code),
            "{body}"
        );
    }
    let not_json = api
        .http
        .post(format!("{}{restrict}", api.sim.url()))
        .bearer_auth("t")
        .header("content-type", "application/json")
        .body("Comment=x")
        .send()
        .await
        .expect("response");
    let (_, code, _) = error_code(not_json).await;
    assert_eq!(code, "InvalidRequestBody");

    let (status, code, _) = error_code(api.restrict(LINUX_MACHINE_ID).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "OsPlatformNotSupported")
    );
    let (status, code, _) = error_code(api.restrict("0000").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
    assert!(api.sim.actions().is_empty());
}

#[tokio::test]
async fn duplicate_can_return_the_pending_action() {
    let api = Api::new(SimConfig {
        duplicate: DuplicateBehaviour::ReturnPending,
        ..frozen()
    })
    .await;
    let first = body(api.restrict(BRAVO_MACHINE_ID).await).await;
    let second = api.restrict(BRAVO_MACHINE_ID).await;
    assert_eq!(second.status(), StatusCode::CREATED);
    assert_eq!(body(second).await["id"], first["id"]);
    assert_eq!(api.sim.actions().len(), 1);
}

#[tokio::test]
async fn action_life_on_the_sim_clock() {
    // Sped up: 2 s Pending + 3 s InProgress take 50 ms of real time.
    let api = Api::new(SimConfig {
        speed: 100.0,
        ..SimConfig::default()
    })
    .await;
    let created = body(api.restrict(ALPHA_MACHINE_ID).await).await;
    assert_eq!(created["status"], "Pending");
    let id = created["id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let done = body(api.get(&format!("/api/machineactions/{id}")).await).await;
    assert_eq!(done["status"], "Succeeded");
    assert_eq!(done["computerDnsName"], ALPHA_NAME);
    let created_at = time::OffsetDateTime::parse(
        created["creationDateTimeUtc"].as_str().expect("created"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let updated_at = time::OffsetDateTime::parse(
        done["lastUpdateDateTimeUtc"].as_str().expect("updated"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    assert_eq!(updated_at - created_at, time::Duration::seconds(5));

    // Stepped: each phase seen exactly.
    let api = Api::new(frozen()).await;
    let id = body(api.restrict(ALPHA_MACHINE_ID).await).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let status = |api: &Api| {
        let id = id.clone();
        let actions = api.sim.actions();
        actions
            .into_iter()
            .find(|a| a.id == id)
            .map(|a| a.status.to_string())
            .unwrap_or_default()
    };
    assert_eq!(status(&api), "Pending");
    api.sim.advance(Duration::from_secs(2));
    assert_eq!(status(&api), "InProgress");
    api.sim.advance(Duration::from_secs(3));
    assert_eq!(status(&api), "Succeeded");
}

#[tokio::test]
async fn offline_machine_holds_actions_then_times_out() {
    let api = Api::new(frozen()).await;
    api.sim.set_offline(CHARLIE_MACHINE_ID, true);
    let held = body(api.restrict(CHARLIE_MACHINE_ID).await).await["id"].clone();
    api.sim.advance(Duration::from_secs(3600));
    assert_eq!(api.sim.actions()[0].status, "Pending");
    // Back online: the countdown starts now.
    api.sim.set_offline(CHARLIE_MACHINE_ID, false);
    api.sim.advance(Duration::from_secs(5));
    assert_eq!(api.sim.actions()[0].status, "Succeeded");

    api.sim.set_offline(ALPHA_MACHINE_ID, true);
    let stuck = body(api.restrict(ALPHA_MACHINE_ID).await).await["id"].clone();
    api.sim.advance(Duration::from_secs(3 * 86_400));
    let timed_out: ODataPage<MachineAction> = api
        .get("/api/machineactions?$filter=status%20eq%20%27TimeOut%27")
        .await
        .json()
        .await
        .expect("page");
    let ids: Vec<_> = timed_out
        .value
        .iter()
        .map(|a| Value::from(a.id.as_str()))
        .collect();
    assert_eq!(ids, [stuck]);
    assert_ne!(ids[0], held);
}

#[tokio::test]
async fn paging_follows_next_link() {
    let api = Api::new(SimConfig {
        page_size: 1,
        ..SimConfig::default()
    })
    .await;
    let mut url = format!("{}/api/machines", api.sim.url());
    let mut ids = Vec::new();
    for _ in 0..20 {
        let page: ODataPage<Machine> = api
            .http
            .get(&url)
            .bearer_auth("t")
            .send()
            .await
            .expect("response")
            .json()
            .await
            .expect("page");
        assert!(page.value.len() <= 1);
        ids.extend(page.value.into_iter().map(|m| m.id));
        match page.next_link {
            Some(next) => url = next,
            None => break,
        }
    }
    let all: Vec<String> = api
        .sim
        .machines()
        .into_iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, all);

    // nextLink keeps the filter and honours $top.
    let first: ODataPage<Machine> = api
        .get(&format!(
            "/api/machines?$filter=aadDeviceId%20eq%20{BRAVO_AAD_DEVICE_ID}&$top=2"
        ))
        .await
        .json()
        .await
        .expect("page");
    assert_eq!(first.value[0].id, BRAVO_STALE_MACHINE_ID);
    let next = first.next_link.expect("second page");
    let second: ODataPage<Machine> = api
        .http
        .get(&next)
        .bearer_auth("t")
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("page");
    assert_eq!(second.value[0].id, BRAVO_MACHINE_ID);
    assert_eq!(second.next_link, None);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let api = Api::new(SimConfig {
        rate_limits: Some(RateLimits {
            per_minute: 2,
            per_hour: 100,
        }),
        ..SimConfig::default()
    })
    .await;
    let path = format!("/api/machines/{ALPHA_MACHINE_ID}");
    assert_eq!(api.get(&path).await.status(), StatusCode::OK);
    assert_eq!(api.get(&path).await.status(), StatusCode::OK);
    let limited = api.get(&path).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((50..=60).contains(&retry_after), "{retry_after}");
    let (status, code, message) = error_code(limited).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests")
    );
    assert_eq!(
        message,
        format!("Rate limit is exceeded. Try again in {retry_after} seconds.")
    );

    // Another endpoint has its own budget; a minute later this one has room.
    assert_eq!(api.get("/api/machines").await.status(), StatusCode::OK);
    api.sim.advance(Duration::from_secs(60));
    assert_eq!(api.get(&path).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn drop_connection_is_a_transport_error() {
    let api = Api::new(frozen()).await;
    let path = format!("/api/machines/{ALPHA_MACHINE_ID}/restrictCodeExecution");
    api.sim
        .inject(Fault::new("restrictCodeExecution", FaultKind::DropConnection).method("POST"));
    let err = api
        .try_post(&path, &json!({"Comment": "x"}))
        .await
        .expect_err("connection dropped");
    assert!(!err.is_status(), "{err:?}");
    // hyper reports "connection closed before message completed".
    assert!(err.is_request(), "{err:?}");
    assert!(api.sim.actions().is_empty(), "not handled");

    api.sim.inject(Fault::new(
        "restrictCodeExecution",
        FaultKind::DropAfterHandling,
    ));
    let err = api
        .try_post(&path, &json!({"Comment": "x"}))
        .await
        .expect_err("connection dropped");
    assert!(!err.is_status(), "{err:?}");
    assert_eq!(api.sim.actions().len(), 1, "handled before the drop");

    // Faults are used up: the retry reaches the duplicate rule.
    let (status, code, _) = error_code(api.restrict(ALPHA_MACHINE_ID).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "ActiveRequestAlreadyExists")
    );
    let statuses: Vec<u16> = api.sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [0, 0, 400]);
}

#[tokio::test]
async fn status_delay_and_malformed_faults() {
    let api = Api::new(frozen()).await;
    api.sim.inject(Fault::new(
        "restrictCodeExecution",
        FaultKind::Status {
            status: 503,
            retry_after: Some(2),
            body: None,
        },
    ));
    let response = api.restrict(ALPHA_MACHINE_ID).await;
    assert_eq!(response.headers()["retry-after"], "2");
    let (status, code, _) = error_code(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
    );
    assert!(
        api.sim.actions().is_empty(),
        "a status fault is not handled"
    );

    api.sim.inject(Fault::new(
        "/api/machines",
        FaultKind::Status {
            status: 500,
            retry_after: None,
            body: Some(json!({"custom": true})),
        },
    ));
    assert_eq!(
        body(api.get("/api/machines").await).await,
        json!({"custom": true})
    );

    api.sim
        .inject(Fault::new("/api/machineactions", FaultKind::MalformedBody).method("GET"));
    let malformed = api.get("/api/machineactions").await;
    assert_eq!(malformed.status(), StatusCode::OK);
    let text = malformed.text().await.expect("body");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    api.sim.clear_requests();
    api.sim.inject(Fault::new(
        "/api/machines",
        FaultKind::Delay { millis: 100 },
    ));
    assert_eq!(api.get("/api/machines").await.status(), StatusCode::OK);
    let log = api.sim.requests();
    assert!(log[0].duration_micros >= 100_000, "{log:?}");
    assert!(log[0].handling_micros < log[0].duration_micros, "{log:?}");

    api.sim
        .inject(Fault::new("/api/", FaultKind::DropConnection).times(5));
    api.sim.clear_faults();
    assert_eq!(api.get("/api/machines").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn identity_endpoint_follows_the_azure_identity_contract() {
    let api = Api::new(SimConfig::default()).await;
    let token_url = |query: &str| format!("{}?{query}", api.sim.identity_endpoint());
    let good = "api-version=2019-08-01&resource=https%3A%2F%2Fapi.securitycenter.microsoft.com";
    let send = |url: String, secret: Option<&'static str>| {
        let mut request = api.http.get(url).header("metadata", "true");
        if let Some(secret) = secret {
            request = request.header("x-identity-header", secret);
        }
        request.send()
    };

    let ok = send(token_url(good), Some("sim-identity-header"))
        .await
        .expect("response");
    assert_eq!(ok.status(), StatusCode::OK);
    let token = body(ok).await;
    assert_eq!(token["access_token"], "sim-access-token");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(
        token["resource"],
        "https://api.securitycenter.microsoft.com"
    );
    assert_eq!(token["client_id"], IDENTITY_CLIENT_ID);
    // A string of unix seconds, about an hour ahead (azure_identity rejects a number).
    let expires_on: i64 = token["expires_on"]
        .as_str()
        .expect("string")
        .parse()
        .expect("unix seconds");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now + 3500..=now + 3700).contains(&expires_on));

    let with_client = send(
        token_url(&format!(
            "{good}&client_id=11111111-1111-1111-1111-111111111111"
        )),
        Some("sim-identity-header"),
    )
    .await
    .expect("response");
    assert_eq!(
        body(with_client).await["client_id"],
        "11111111-1111-1111-1111-111111111111"
    );

    for (url, secret, status) in [
        (token_url(good), None, 401),
        (token_url(good), Some("wrong"), 401),
        (
            token_url("api-version=2018-02-01&resource=x"),
            Some("sim-identity-header"),
            400,
        ),
        (
            token_url("api-version=2019-08-01"),
            Some("sim-identity-header"),
            400,
        ),
    ] {
        let response = send(url.clone(), secret).await.expect("response");
        assert_eq!(response.status().as_u16(), status, "{url}");
    }

    let log = api.sim.requests();
    assert_eq!(log.len(), 6);
    assert_eq!(log[0].path, "/_identity/token");
    assert_eq!(
        log[0].header("x-identity-header"),
        Some("sim-identity-header")
    );

    // Faults apply here too (e.g. to exercise the credential's retries).
    api.sim.inject(Fault::new(
        "/_identity/",
        FaultKind::Status {
            status: 500,
            retry_after: None,
            body: None,
        },
    ));
    let failed = send(token_url(good), Some("sim-identity-header"))
        .await
        .expect("response");
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn control_surface_over_http() {
    let api = Api::new(SimConfig {
        seed: false,
        ..frozen()
    })
    .await;
    let url = |path: &str| format!("{}{path}", api.sim.url());
    assert!(api.sim.machines().is_empty());

    let machine = json!({
        "id": "1111111111111111111111111111111111111111",
        "computerDnsName": "ADDED-01",
        "aadDeviceId": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "healthStatus": "Active",
        "osPlatform": "WindowsServer2022",
        "customField": 7
    });
    let added = api
        .http
        .post(url("/_sim/machines"))
        .json(&machine)
        .send()
        .await
        .expect("response");
    assert_eq!(added.status(), StatusCode::CREATED);
    let listed: Vec<Machine> = api
        .http
        .get(url("/_sim/machines"))
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("machines");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].extra["customField"], 7);

    let fault = json!({"method":"POST","pathContains":"restrictCodeExecution","times":1,
        "kind":{"status":{"status":503,"retryAfter":null,"body":null}}});
    let injected = api
        .http
        .post(url("/_sim/faults"))
        .json(&fault)
        .send()
        .await
        .expect("response");
    assert_eq!(injected.status(), StatusCode::CREATED);
    assert_eq!(
        api.restrict("ADDED-01").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    let offline = api
        .http
        .post(url(
            "/_sim/machines/1111111111111111111111111111111111111111/offline",
        ))
        .json(&json!({"offline": true}))
        .send()
        .await
        .expect("response");
    assert_eq!(offline.status(), StatusCode::NO_CONTENT);
    assert_eq!(api.restrict("added-01").await.status(), StatusCode::CREATED);
    let advanced = api
        .http
        .post(url("/_sim/clock"))
        .json(&json!({"advanceSeconds": 259_200}))
        .send()
        .await
        .expect("response");
    assert_eq!(advanced.status(), StatusCode::OK);
    let actions: Vec<MachineAction> = api
        .http
        .get(url("/_sim/actions"))
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("actions");
    assert_eq!(actions[0].status, "TimeOut");

    let log: Vec<RecordedRequest> = api
        .http
        .get(url("/_sim/requests"))
        .send()
        .await
        .expect("response")
        .json()
        .await
        .expect("log");
    assert_eq!(log.len(), 2, "only the /api calls are recorded: {log:?}");
    let cleared = api
        .http
        .delete(url("/_sim/requests"))
        .send()
        .await
        .expect("response");
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    assert!(api.sim.requests().is_empty());

    for (method, path, status) in [
        (reqwest::Method::GET, "/_sim/nope", 404),
        (reqwest::Method::PUT, "/_sim/faults", 405),
        (reqwest::Method::GET, "/elsewhere", 404),
    ] {
        let response = api
            .http
            .request(method, url(path))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status().as_u16(), status, "{path}");
    }
    let bad = api
        .http
        .post(url("/_sim/faults"))
        .body("{")
        .send()
        .await
        .expect("response");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    let banner = api
        .http
        .get(url("/_sim"))
        .send()
        .await
        .expect("response")
        .text()
        .await
        .expect("text");
    assert!(
        banner.contains("ADDED-01") && banner.contains("/_sim/faults"),
        "{banner}"
    );
}

#[tokio::test]
async fn banner_lists_seeded_devices() {
    let sim = start(SimConfig::default()).await;
    let banner = sim.banner();
    for needle in [
        ALPHA_NAME,
        ALPHA_AAD_DEVICE_ID,
        BRAVO_MACHINE_ID,
        &format!("merged into {BRAVO_MACHINE_ID}"),
        KIOSK_MACHINE_ID,
        "Linux",
        "/_identity/token",
        "/_sim/requests",
    ] {
        assert!(banner.contains(needle), "{needle} missing from\n{banner}");
    }
}

#[tokio::test]
async fn invalid_config_is_rejected() {
    for config in [
        SimConfig {
            speed: 0.0,
            ..SimConfig::default()
        },
        SimConfig {
            speed: f64::NAN,
            ..SimConfig::default()
        },
        SimConfig {
            page_size: 0,
            ..SimConfig::default()
        },
    ] {
        let err = Simulator::start("127.0.0.1:0".parse().expect("addr"), config)
            .await
            .expect_err("invalid");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = start(SimConfig::default()).await;
    let url = format!("{}/api/machines", sim.url());
    let http = reqwest::Client::new();
    assert!(http.get(&url).bearer_auth("t").send().await.is_ok());
    sim.shutdown();
    let mut refused = false;
    for _ in 0..50 {
        // A fresh client, so no pooled connection is reused.
        if reqwest::Client::new().get(&url).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "still serving after shutdown");
}
