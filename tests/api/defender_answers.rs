//! Defender answers the service must read right: what the caller is told,
//! and what Defender received.

use restrict_code_execution::simulator::{Fault, FaultKind, RecordedRequest};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_in_process};
use crate::host_emulator::CallerRequest;
use crate::restrict::ALPHA_AAD;

fn posts(app: &TestApp) -> Vec<RecordedRequest> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect()
}

fn defender_403(code: &str, message: &str) -> FaultKind {
    FaultKind::Status {
        status: 403,
        retry_after: None,
        body: Some(
            json!({"error": {"code": code, "message": message, "target": "c0ffee00-0000-4000-8000-000000000403"}}),
        ),
    }
}

#[tokio::test]
async fn a_403_for_a_disabled_feature_is_not_called_a_missing_permission() {
    for (code, method, path) in [
        ("DisabledFeature", "POST", "restrictCodeExecution"),
        ("DisallowedOperation", "POST", "restrictCodeExecution"),
        ("DisabledFeature", "GET", "/api/machines"),
    ] {
        let app = spawn_app().await;
        app.sim.inject(Fault {
            method: Some(method.into()),
            path_contains: path.into(),
            kind: defender_403(code, "The operation is not allowed."),
            times: 5,
        });

        let response = app.restrict(&json!({"deviceId": ALPHA_AAD})).await;

        assert_eq!(response.status, 502, "{code}: {}", response.body);
        let problem: Value = response.json();
        assert_eq!(problem["code"], "defender_feature_disabled", "{code}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(code), "{detail}");
        assert!(detail.contains("not a missing permission"), "{detail}");
        assert!(
            !detail.contains("Grant the function's managed identity"),
            "{detail}"
        );
        // Not retried: one call to the refusing endpoint, and no action.
        let refused: Vec<_> = app
            .defender_requests()
            .into_iter()
            .filter(|r| r.method == method && r.path.contains(path))
            .collect();
        assert_eq!(refused.len(), 1, "{code} {method} {path}: {refused:?}");
        assert!(app.sim.actions().is_empty());
        if method == "GET" {
            assert!(posts(&app).is_empty());
        }
    }
}

#[tokio::test]
async fn a_403_for_missing_roles_keeps_the_permissions_advice() {
    let app = spawn_in_process().await;
    app.sim.inject(Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: defender_403(
            "Forbidden",
            "Missing application roles. API required roles: Machine.RestrictExecution, application roles: Machine.Read.All",
        ),
        times: 5,
    });

    let response = app.restrict(&json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502);
    let problem = response.json();
    assert_eq!(problem["code"], "defender_forbidden");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Machine.Read.All and Machine.RestrictExecution")
    );
    assert_eq!(posts(&app).len(), 1);
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn defender_refusing_to_cancel_an_action_it_still_lists_as_pending_is_action_not_pending() {
    let app = spawn_in_process().await;
    let created = app.restrict(&json!({"deviceId": ALPHA_AAD})).await;
    let id = created.json()["action"]["id"].as_str().unwrap().to_owned();
    // Defender has finished it, but its reads still show it pending.
    app.sim.inject(Fault {
        method: Some("POST".into()),
        path_contains: "/cancel".into(),
        kind: FaultKind::Status {
            status: 400,
            retry_after: None,
            body: Some(json!({"error": {"code": "BadRequest", "message": "Action cannot be cancelled in its current state"}})),
        },
        times: 1,
    });

    let response = app
        .host
        .forwarded_to(
            &crate::host_emulator::Route::cancel(&id),
            &CallerRequest::empty(),
        )
        .await;

    assert_eq!(response.status, 409, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "action_not_pending");
    assert_eq!(problem["actionId"], id.as_str());
    assert_eq!(problem["actionStatus"], "Pending");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Action cannot be cancelled in its current state"),
        "{problem}"
    );
    let cancels: Vec<_> = posts(&app)
        .into_iter()
        .filter(|r| r.path.ends_with("/cancel"))
        .collect();
    assert_eq!(cancels.len(), 1, "the cancel was not re-sent");
    assert_eq!(cancels[0].path, format!("/api/machineactions/{id}/cancel"));
}

/// Defender's own message reaches the problem's `detail`; in a text answer
/// it stays on its line and shows its control and layout characters
/// escaped, so it cannot forge a line of the answer or reorder it.
#[tokio::test]
async fn defenders_message_is_one_escaped_line_in_a_text_answer() {
    let app = spawn_in_process().await;
    app.sim.inject(
        Fault::new(
            "restrictCodeExecution",
            defender_403(
                "DisabledFeature",
                "first line\nInvocation forged\u{1b}[2J \u{202E}txt.exe",
            ),
        )
        .method("POST"),
    );
    let request = CallerRequest::json(json!({"deviceId": ALPHA_AAD}).to_string())
        .header("Accept", "text/plain");
    let response = app.host.forwarded(&request).await;
    assert_eq!(response.status, 502, "{}", response.body);
    let lines: Vec<&str> = response.body.lines().collect();
    assert_eq!(lines.len(), 3, "{:?}", response.body);
    assert!(lines[2].starts_with("Invocation "), "{lines:?}");
    assert!(
        !lines[1].contains('\u{1b}') && !lines[1].contains('\u{202E}'),
        "{lines:?}"
    );
    assert_eq!(posts(&app).len(), 1);
}
