//! Answers and logs at the edges: what the caller is told and what is
//! logged, for requests that never reach Defender as much as for those that do.

use restrict_code_execution::simulator::{Fault, FaultKind};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_in_process};
use crate::host_emulator::CallerRequest;
use crate::host_emulator::Route;
use crate::restrict::ALPHA_AAD;

#[tokio::test]
async fn a_failing_identity_endpoint_is_logged_not_echoed_and_the_credential_is_named() {
    let app = spawn_app().await;
    app.sim.inject(Fault {
        method: None,
        path_contains: "/_identity/".into(),
        kind: FaultKind::Status {
            status: 500,
            retry_after: None,
            body: Some(json!({"error": "invalid_request", "error_description": "Identity not found: internal-detail-7f3a"})),
        },
        times: 20,
    });

    let response = app.restrict(&json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    let problem: Value = response.json();
    assert_eq!(problem["code"], "authentication_failed");
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.contains("internal-detail-7f3a"), "{detail}");
    assert!(
        detail.contains("system-assigned managed identity"),
        "{detail}"
    );
    assert!(detail.contains("answered HTTP 500"), "{detail}");
    let logs = app.logs().await.join("\n");
    assert!(
        logs.contains("internal-detail-7f3a"),
        "the raw answer is logged"
    );
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn a_405_names_the_method_the_route_allows_and_post_to_the_root_gets_a_problem() {
    let app = spawn_app().await;
    let client = reqwest::Client::new();
    let action = "9c2f4f8e-3b1a-4c7d-8e6f-0a1b2c3d4e5f";
    for (method, path, allowed) in [
        ("GET", "/api/restrict-code-execution".to_owned(), "POST"),
        (
            "POST",
            format!("/api/restrict-code-execution/actions/{action}"),
            "GET",
        ),
        (
            "GET",
            format!("/api/restrict-code-execution/actions/{action}/cancel"),
            "POST",
        ),
        ("DELETE", "/api/openapi.json".to_owned(), "GET"),
        ("POST", "/".to_owned(), "GET"),
        ("GET", "/restrict-code-execution".to_owned(), "POST"),
    ] {
        let response = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", app.host.base()),
            )
            .send()
            .await
            .unwrap();

        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allowed, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "method_not_allowed");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.ends_with(&format!("use {allowed}")),
            "{method} {path}: {detail}"
        );
    }
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn payload_mode_checks_the_envelopes_method_against_the_function() {
    let app = spawn_in_process().await;
    let action = "9c2f4f8e-3b1a-4c7d-8e6f-0a1b2c3d4e5f";
    let mut status_by_post = Route::status(action);
    status_by_post.method = "POST";
    let mut restrict_by_get = Route::restrict();
    restrict_by_get.method = "GET";

    for (route, allowed) in [(status_by_post, "GET"), (restrict_by_get, "POST")] {
        let response = app
            .host
            .payload_to(
                &route,
                &CallerRequest::json(json!({"deviceId": ALPHA_AAD}).to_string()),
            )
            .await;

        assert_eq!(response.status, 405, "{}", response.body);
        assert_eq!(response.json()["code"], "method_not_allowed");
        assert_eq!(response.header("allow"), Some(allowed));
    }
    assert!(app.defender_requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn the_status_function_refuses_an_answer_about_another_action() {
    let app = spawn_app().await;
    let created = app.restrict(&json!({"deviceId": ALPHA_AAD})).await;
    let mut other = created.json()["action"].clone();
    let asked = "9c2f4f8e-3b1a-4c7d-8e6f-0a1b2c3d4e5f";
    other["status"] = json!("Succeeded");
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: format!("/api/machineactions/{asked}"),
        kind: FaultKind::Status {
            status: 200,
            retry_after: None,
            body: Some(other.clone()),
        },
        times: 1,
    });

    let response = app
        .host
        .forwarded_to(&Route::status(asked), &CallerRequest::empty())
        .await;

    assert_eq!(response.status, 502, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "defender_error");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains(other["id"].as_str().unwrap()),
        "{problem}"
    );
    let reads: Vec<_> = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.path == format!("/api/machineactions/{asked}"))
        .collect();
    assert_eq!(reads.len(), 1, "Defender was asked for the right action");
}

/// The log lines of one invocation.
async fn lines_of(app: &TestApp, id: &str) -> Vec<Value> {
    app.logs()
        .await
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["span"]["invocation_id"] == id)
        .collect()
}

#[tokio::test]
async fn every_request_gets_its_per_invocation_log_line() {
    let app = spawn_app().await;
    let client = reqwest::Client::new();
    let send = |method: &str, path: &str, id: &str| {
        client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", app.host.base()),
            )
            .header("X-Azure-Functions-InvocationId", id)
            .send()
    };
    send("POST", "/api/nowhere", "log-404").await.unwrap();
    send("GET", "/api/restrict-code-execution", "log-405")
        .await
        .unwrap();
    send("POST", "/", "log-root").await.unwrap();
    app.host
        .payload_raw("not an envelope".to_owned(), "log-envelope")
        .await;
    app.host
        .forwarded_to(
            &Route::openapi(),
            &CallerRequest::empty().invocation_id("log-openapi"),
        )
        .await;
    app.host
        .payload_to(
            &Route::openapi(),
            &CallerRequest::empty().invocation_id("log-openapi-payload"),
        )
        .await;

    for (id, status) in [
        ("log-404", 404),
        ("log-405", 405),
        ("log-root", 405),
        ("log-envelope", 400),
        ("log-openapi", 200),
        ("log-openapi-payload", 200),
    ] {
        let lines = lines_of(&app, id).await;
        assert!(
            lines.iter().any(|l| l["status"] == status),
            "{id}: no log line with status {status}: {lines:?}"
        );
    }
}

#[tokio::test]
async fn every_function_writes_one_invocation_line_with_its_function_status_and_ids() {
    let app = spawn_app().await;
    let restrict = CallerRequest::json(json!({"deviceId": ALPHA_AAD}).to_string());
    let created = app
        .host
        .forwarded(&restrict.clone().invocation_id("one-restrict"))
        .await;
    let action = created.json()["action"]["id"].as_str().unwrap().to_owned();
    for (route, id) in [
        (Route::status(&action), "one-status"),
        (Route::cancel(&action), "one-cancel"),
        (Route::devices(), "one-devices"),
    ] {
        app.host
            .forwarded_to(&route, &CallerRequest::empty().invocation_id(id))
            .await;
    }
    // One device Defender knows, one it does not.
    let unknown = "0b5e2c1d-7a3f-4e8b-9c6d-1f2e3d4c5b6a";
    let bulk = json!({"deviceIds": [crate::restrict::CHARLIE_AAD, unknown]}).to_string();
    app.host
        .forwarded(&CallerRequest::json(bulk).invocation_id("one-bulk"))
        .await;

    for (id, function, status) in [
        ("one-restrict", "restrict-code-execution", 201),
        ("one-status", "action-status", 202),
        ("one-cancel", "cancel-action", 200),
        ("one-devices", "list-devices", 200),
        ("one-bulk", "restrict-code-execution", 207),
    ] {
        let lines: Vec<Value> = lines_of(&app, id)
            .await
            .into_iter()
            .filter(|l| l["message"].as_str().unwrap().starts_with("invocation "))
            .collect();
        assert_eq!(lines.len(), 1, "{id}: {lines:?}");
        let line = &lines[0];
        assert_eq!(line["function"], function, "{id}: {line}");
        assert_eq!(line["status"], status, "{id}: {line}");
        assert!(line["duration_ms"].is_u64(), "{id}: {line}");
        assert!(line["outcome"].is_string(), "{id}: {line}");
    }
    let restricted = &lines_of(&app, "one-restrict").await;
    let line = restricted
        .iter()
        .find(|l| l["message"] == "invocation succeeded")
        .unwrap();
    assert_eq!(line["device_id"], ALPHA_AAD);
    assert_eq!(line["action_id"], action.as_str());
    assert_eq!(line["outcome"], "requested");
    let bulk = &lines_of(&app, "one-bulk").await;
    let line = bulk
        .iter()
        .find(|l| l["message"].as_str().unwrap().starts_with("invocation "))
        .unwrap();
    assert_eq!(line["devices"], 2, "{line}");
    assert_eq!(line["failed"], 1, "{line}");
}

#[tokio::test]
async fn a_bulk_wait_cut_short_by_the_time_budget_says_so() {
    let mut options = crate::helpers::AppOptions {
        env: vec![("REQUEST_TIMEOUT_SECONDS", "4".into())],
        ..crate::helpers::AppOptions::default()
    };
    // Actions stay pending far longer than the invocation may take.
    options.sim.pending_for = std::time::Duration::from_secs(3600);
    let app = crate::helpers::spawn_in_process_with(options).await;

    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceIds": [ALPHA_AAD, crate::restrict::CHARLIE_AAD], "wait": 60}).to_string(),
        ))
        .await;

    assert_eq!(response.status, 200, "{}", response.body);
    let answer = response.json();
    let warning = answer["warning"].as_str().expect("a warning");
    assert!(warning.contains("wait was cut short"), "{warning}");
    assert!(warning.contains("2 action(s)"), "{warning}");
    for result in answer["results"].as_array().unwrap() {
        assert_eq!(result["terminal"], false);
        let id = result["action"]["id"].as_str().unwrap();
        // Defender was polled for the action before time ran out.
        assert!(
            app.defender_requests()
                .iter()
                .any(|r| r.method == "GET" && r.path == format!("/api/machineactions/{id}")),
            "{id} was polled"
        );
    }
    let posts = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 2);

    // Without a cut (a short wait), no warning.
    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceIds": [ALPHA_AAD], "wait": 1}).to_string(),
        ))
        .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response.json().get("warning").is_none(),
        "{}",
        response.body
    );
}

#[tokio::test]
async fn a_bulk_wait_cut_short_by_failing_polls_says_so() {
    let app = spawn_in_process().await;
    // Every read of one action (the polls) is refused with a Retry-After far
    // beyond the invocation's time; the listing reads are not affected.
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machineactions/".into(),
        kind: FaultKind::Status {
            status: 429,
            retry_after: Some(3600),
            body: None,
        },
        times: 100,
    });

    let response = app
        .restrict(&json!({"deviceIds": [ALPHA_AAD], "wait": 3}))
        .await;

    assert_eq!(response.status, 200, "{}", response.body);
    let answer = response.json();
    let warning = answer["warning"].as_str().expect("a warning");
    assert!(
        warning.contains("wait was cut short for 1 action(s)"),
        "{warning}"
    );
    assert!(warning.contains("rate_limited"), "{warning}");
    assert_eq!(answer["results"][0]["terminal"], false);
    let polls = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/api/machineactions/"))
        .count();
    assert_eq!(polls, 1, "a poll refused for an hour is not repeated");
}
