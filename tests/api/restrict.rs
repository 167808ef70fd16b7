//! Restrict and release end to end: what the caller gets and, above all, what
//! Defender received.

use restrict_code_execution::simulator::{Fault, FaultKind};
use serde_json::{Value, json};

use crate::helpers::{
    AppOptions, TOKEN, TestApp, post, spawn_app, spawn_app_with, spawn_in_process,
    spawn_in_process_with,
};
use crate::host_emulator::CallerRequest;

pub const ALPHA_AAD: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";
pub const BRAVO_AAD: &str = "7b2e9d14-6c3a-4f85-b1d0-2a9c8e7f6d54";
pub const CHARLIE_AAD: &str = "c4d5e6f7-0819-4a2b-8c3d-4e5f60718293";
pub const LINUX_AAD: &str = "9a8b7c6d-5e4f-4321-8fed-cba987654321";

fn machine_id(app: &TestApp, name_prefix: &str) -> String {
    app.sim
        .machines()
        .into_iter()
        .find(|m| {
            m.computer_dns_name
                .as_deref()
                .is_some_and(|n| n.starts_with(name_prefix))
                && m.merged_into_machine_id.is_none()
                && m.health_status.as_deref() == Some("Active")
        })
        .unwrap_or_else(|| panic!("seeded machine {name_prefix}"))
        .id
        .to_string()
}

#[tokio::test]
async fn restrict_by_entra_device_id_looks_the_machine_up_and_posts_the_action() {
    // Arrange
    let app = spawn_in_process().await;
    let alpha = machine_id(&app, "DESKTOP-ALPHA");

    // Act
    let response = post(&app, json!({"deviceId": ALPHA_AAD, "release": false})).await;

    // Assert: the answer
    assert_eq!(response.status, 201, "{}", response.body);
    let body = response.json();
    assert_eq!(body["outcome"], "requested");
    assert_eq!(body["deviceId"], ALPHA_AAD);
    assert_eq!(body["release"], false);
    assert_eq!(body["machine"]["id"], alpha.as_str());
    assert_eq!(body["machine"]["aadDeviceId"], ALPHA_AAD);
    assert_eq!(body["candidates"], 1);
    assert_eq!(body["action"]["type"], "RestrictCodeExecution");
    assert_eq!(body["action"]["status"], "Pending");
    assert!(body["message"].as_str().unwrap().contains("DESKTOP-ALPHA"));

    // Assert: what Defender received
    let requests = app.defender_requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    let (lookup, state, act) = (&requests[0], &requests[1], &requests[2]);
    assert_eq!(lookup.method, "GET");
    assert_eq!(lookup.path, "/api/machines");
    assert_eq!(
        lookup.filter.as_deref(),
        Some(format!("aadDeviceId eq {ALPHA_AAD}").as_str())
    );
    // The machine's actions are read before acting: every page of them, with
    // only documented OData (no `$orderby`, no `or`).
    assert_eq!(
        (state.method.as_str(), state.path.as_str()),
        ("GET", "/api/machineactions")
    );
    assert_eq!(
        state.filter.as_deref(),
        Some(format!("machineId eq '{alpha}'").as_str())
    );
    let query = state.query.as_deref().unwrap();
    assert!(query.contains("$top=10000"), "{query}");
    assert!(!query.contains("$orderby"), "{query}");
    assert_eq!(act.method, "POST");
    assert_eq!(
        act.path,
        format!("/api/machines/{alpha}/restrictCodeExecution")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&act.body).unwrap(),
        json!({"Comment": "Possible security risk."})
    );
    assert_eq!(act.header("content-type"), Some("application/json"));
    for request in &requests {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    // The action the caller got back is the one Defender holds.
    let actions = app.sim.actions();
    assert_eq!(actions.len(), 1);
    assert_eq!(body["action"]["id"], actions[0].id.as_str());
}

#[tokio::test]
async fn release_posts_unrestrict_with_the_given_comment() {
    let app = spawn_in_process().await;
    let alpha = machine_id(&app, "DESKTOP-ALPHA");

    let response = post(
        &app,
        json!({"deviceId": ALPHA_AAD, "release": true, "comment": "Cleared by SOC"}),
    )
    .await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.json()["action"]["type"], "UnrestrictCodeExecution");
    let act = app.defender_requests().pop().unwrap();
    assert_eq!(
        act.path,
        format!("/api/machines/{alpha}/unrestrictCodeExecution")
    );
    assert_eq!(act.body, r#"{"Comment":"Cleared by SOC"}"#);
}

#[tokio::test]
async fn the_caller_is_recorded_in_the_comment() {
    let app = spawn_app().await;

    let response = post(
        &app,
        json!({"deviceId": ALPHA_AAD, "comment": "INC-4711", "callerName": "alice@contoso.com"}),
    )
    .await;

    assert_eq!(response.status, 201, "{}", response.body);
    let act = app.defender_requests().pop().unwrap();
    assert_eq!(
        act.body,
        r#"{"Comment":"INC-4711 (requested by alice@contoso.com)"}"#
    );
    assert_eq!(
        response.json()["action"]["requestorComment"],
        "INC-4711 (requested by alice@contoso.com)"
    );
    let logged = app.log_events("invocation succeeded").await;
    assert_eq!(logged[0]["caller_name"], "alice@contoso.com");
}

#[tokio::test]
async fn recording_the_caller_can_be_turned_off() {
    let app = spawn_in_process_with(AppOptions {
        env: vec![("COMMENT_INCLUDE_CALLER", "false".into())],
        ..AppOptions::default()
    })
    .await;

    post(
        &app,
        json!({"deviceId": ALPHA_AAD, "callerName": "alice@contoso.com"}),
    )
    .await;

    let act = app.defender_requests().pop().unwrap();
    assert_eq!(act.body, r#"{"Comment":"Possible security risk."}"#);
}

#[tokio::test]
async fn realmjoin_pascal_case_keys_and_string_booleans_release() {
    let app = spawn_in_process().await;

    let response = app
        .host
        .payload(&CallerRequest::json(
            json!({"DeviceId": ALPHA_AAD, "Release": "True", "Comment": null, "CallerName": "rj"})
                .to_string(),
        ))
        .await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.json()["release"], true);
    let act = app.defender_requests().pop().unwrap();
    assert!(
        act.path.ends_with("/unrestrictCodeExecution"),
        "{}",
        act.path
    );
    assert_eq!(
        act.body,
        r#"{"Comment":"Possible security risk. (requested by rj)"}"#
    );
}

#[tokio::test]
async fn several_records_for_one_device_pick_the_active_newest_unmerged_one() {
    let app = spawn_in_process().await;
    let records: Vec<_> = app
        .sim
        .machines()
        .into_iter()
        .filter(|m| m.aad_device_id.as_deref() == Some(BRAVO_AAD))
        .collect();
    assert_eq!(records.len(), 3, "the seed has three records for BRAVO");
    let expected = records
        .iter()
        .find(|m| {
            m.health_status.as_deref() == Some("Active") && m.merged_into_machine_id.is_none()
        })
        .unwrap()
        .id
        .clone();

    let response = post(&app, json!({"deviceId": BRAVO_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let body = response.json();
    assert_eq!(body["candidates"], 3);
    assert_eq!(body["machine"]["id"], expected.as_str());
    let act = app.defender_requests().pop().unwrap();
    assert_eq!(
        act.path,
        format!("/api/machines/{expected}/restrictCodeExecution")
    );
}

#[tokio::test]
async fn an_unknown_device_is_a_404_and_nothing_is_posted() {
    let app = spawn_in_process().await;

    let response = post(
        &app,
        json!({"deviceId": "0f0e0d0c-0b0a-4908-8706-050403020100"}),
    )
    .await;

    assert_eq!(response.status, 404);
    assert_eq!(response.json()["code"], "device_not_found");
    let requests = app.defender_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
}

#[tokio::test]
async fn a_defender_machine_id_is_used_directly() {
    let app = spawn_in_process().await;
    let kiosk = app
        .sim
        .machines()
        .into_iter()
        .find(|m| {
            m.computer_dns_name
                .as_deref()
                .is_some_and(|n| n.starts_with("KIOSK-DELTA"))
        })
        .unwrap();
    assert_eq!(kiosk.aad_device_id, None, "KIOSK-DELTA has no Entra id");

    let response = post(&app, json!({"deviceId": kiosk.id.to_uppercase()})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let requests = app.defender_requests();
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, format!("/api/machines/{}", kiosk.id));
    assert_eq!(requests[1].path, "/api/machineactions");
    assert_eq!(
        requests[2].path,
        format!("/api/machines/{}/restrictCodeExecution", kiosk.id)
    );
    let unknown = post(&app, json!({"deviceId": "ab".repeat(20)})).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["code"], "device_not_found");
}

#[tokio::test]
async fn an_unsupported_os_is_a_422() {
    let app = spawn_in_process().await;

    let response = post(&app, json!({"deviceId": LINUX_AAD})).await;

    assert_eq!(response.status, 422, "{}", response.body);
    assert_eq!(response.json()["code"], "unsupported_device");
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn defender_403_names_the_app_roles_to_grant() {
    let app = spawn_in_process().await;
    app.sim.inject(Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: FaultKind::Status {
            status: 403,
            retry_after: None,
            body: Some(json!({"error": {"code": "Forbidden", "message": "Missing application roles. API required roles: Machine.RestrictExecution, application roles: Machine.Read.All", "target": "b4c1"}})),
        },
        times: 1,
    });

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "defender_forbidden");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("Machine.Read.All") && detail.contains("Machine.RestrictExecution"),
        "{detail}"
    );
}

#[tokio::test]
async fn a_defender_429_longer_than_the_time_budget_is_passed_on_with_retry_after() {
    let app = spawn_in_process_with(AppOptions {
        env: vec![("REQUEST_TIMEOUT_SECONDS", "5".into())],
        ..AppOptions::default()
    })
    .await;
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machines".into(),
        kind: FaultKind::Status {
            status: 429,
            retry_after: Some(17),
            body: None,
        },
        times: 1,
    });

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 429, "{}", response.body);
    assert_eq!(response.header("retry-after"), Some("17"));
    assert_eq!(response.json()["code"], "rate_limited");
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn a_defender_that_stays_slow_is_a_504_once_the_budget_is_spent() {
    let app = spawn_in_process_with(AppOptions {
        env: vec![
            ("DEFENDER_TIMEOUT_SECONDS", "1".into()),
            ("REQUEST_TIMEOUT_SECONDS", "3".into()),
        ],
        ..AppOptions::default()
    })
    .await;
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machines".into(),
        kind: FaultKind::Delay { millis: 3000 },
        times: 100,
    });

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 504, "{}", response.body);
    assert_eq!(response.json()["code"], "defender_timeout");
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn the_token_is_fetched_once_through_managed_identity_for_many_invocations() {
    let app = spawn_app().await;

    for body in [
        json!({"deviceId": ALPHA_AAD}),
        json!({"deviceId": CHARLIE_AAD}),
        json!({"deviceId": BRAVO_AAD, "release": true}),
        json!({"deviceId": BRAVO_AAD, "release": true}),
        json!({"deviceId": "327e13c6bfe7466bcd0564fd94d1bedf29ac2659"}),
    ] {
        let response = post(&app, body).await;
        assert!(response.status < 300, "{}", response.body);
    }

    let tokens = app.token_requests();
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    let request = &tokens[0];
    assert_eq!(request.method, "GET");
    assert_eq!(
        request.header("x-identity-header"),
        Some(crate::helpers::IDENTITY_HEADER)
    );
    let query = request.query.as_deref().unwrap();
    assert!(query.contains("api-version=2019-08-01"), "{query}");
    assert!(
        query.contains("resource=https%3A%2F%2Fapi.securitycenter.microsoft.com"),
        "{query}"
    );
    assert!(!query.contains(".default"), "{query}");
}

#[tokio::test]
async fn a_user_assigned_identity_is_asked_for_by_client_id() {
    let app = spawn_app_with(AppOptions {
        env: vec![(
            "AZURE_CLIENT_ID",
            "11111111-2222-3333-4444-555555555555".into(),
        )],
        ..AppOptions::default()
    })
    .await;

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let query = app.token_requests()[0].query.clone().unwrap();
    assert!(
        query.contains("client_id=11111111-2222-3333-4444-555555555555"),
        "{query}"
    );
}

#[tokio::test]
async fn an_unreachable_identity_endpoint_fails_fast_and_sends_nothing_to_defender() {
    let closed = crate::helpers::free_port();
    let app = spawn_app_with(AppOptions {
        env: vec![(
            "IDENTITY_ENDPOINT",
            format!("http://127.0.0.1:{closed}/msi/token"),
        )],
        ..AppOptions::default()
    })
    .await;

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "authentication_failed");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("system-assigned managed identity"),
        "{problem}"
    );
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn a_hanging_identity_endpoint_is_cut_off_by_the_token_timeout() {
    let app = spawn_app_with(AppOptions {
        env: vec![("TOKEN_TIMEOUT_SECONDS", "1".into())],
        ..AppOptions::default()
    })
    .await;
    app.sim.inject(Fault {
        method: None,
        path_contains: "/_identity/".into(),
        kind: FaultKind::Delay { millis: 10_000 },
        times: 1,
    });

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "authentication_failed");
    assert!(
        problem["detail"].as_str().unwrap().contains("within 1 s"),
        "{problem}"
    );
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn no_token_or_identity_secret_appears_in_the_logs_even_at_trace_level() {
    // Arrange: the most verbose logging there is, and a run that fetches the
    // token twice (a 401 forces a refresh), fails once and succeeds once.
    let app = spawn_app_with(AppOptions {
        env: vec![("RUST_LOG", "trace".into())],
        ..AppOptions::default()
    })
    .await;
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machines".into(),
        kind: FaultKind::Status {
            status: 401,
            retry_after: None,
            body: None,
        },
        times: 1,
    });

    // Act: the function key in the query and in a header, too.
    let keyed =
        CallerRequest::json(json!({"deviceId": ALPHA_AAD, "callerName": "alice"}).to_string())
            .query("code", "fn-key-in-query-9f2")
            .header("x-functions-key", "fn-key-in-header-7c1");
    app.host.forwarded(&keyed).await;
    post(&app, json!({"deviceId": "bad"})).await;
    let logs = app.logs().await.join("\n");

    // Assert
    assert_eq!(app.token_requests().len(), 2);
    assert!(logs.contains("invocation succeeded"), "{logs}");
    assert!(logs.contains(r#""level":"TRACE""#), "trace logging was on");
    assert!(!logs.contains(TOKEN), "token leaked into logs");
    assert!(
        !logs.contains("fn-key-in-query-9f2"),
        "function key leaked into logs"
    );
    assert!(
        !logs.contains("fn-key-in-header-7c1"),
        "function key leaked into logs"
    );
    assert!(
        !logs.contains(crate::helpers::IDENTITY_HEADER),
        "identity header leaked into logs"
    );
}
#[tokio::test]
async fn machine_lookups_follow_next_links_across_pages() {
    let app = spawn_in_process_with(AppOptions {
        sim: restrict_code_execution::simulator::SimConfig {
            page_size: 1,
            ..AppOptions::default().sim
        },
        ..AppOptions::default()
    })
    .await;

    let response = post(&app, json!({"deviceId": BRAVO_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(
        response.json()["candidates"],
        3,
        "all three pages were read"
    );
    let pages = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machines")
        .count();
    assert_eq!(pages, 3);
}
