//! Answers and logs at the edges: what the caller is told and what is
//! logged, for requests that never reach Defender as much as for those that do.

use restrict_code_execution::simulator::{Fault, FaultKind};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};
use crate::host_emulator::CallerRequest;
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

    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceId": ALPHA_AAD}).to_string(),
        ))
        .await;

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
