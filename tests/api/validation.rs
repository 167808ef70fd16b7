//! Every invalid input gets its 400/413 naming the field, in both invocation
//! modes, and Defender receives nothing.

use serde_json::Value;

use crate::helpers::spawn_app;
use crate::host_emulator::CallerRequest;

const AAD: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";

/// (case, body, status, code, field the answer must name)
fn cases() -> Vec<(
    &'static str,
    String,
    u16,
    &'static str,
    Option<&'static str>,
)> {
    vec![
        (
            "not JSON",
            "deviceId=abc".into(),
            400,
            "invalid_request",
            None,
        ),
        (
            "truncated JSON",
            r#"{"deviceId": "#.into(),
            400,
            "invalid_request",
            None,
        ),
        (
            "an array",
            format!(r#"["{AAD}"]"#),
            400,
            "invalid_request",
            None,
        ),
        (
            "a string",
            format!(r#""{AAD}""#),
            400,
            "invalid_request",
            None,
        ),
        (
            "missing deviceId",
            r#"{"release": false}"#.into(),
            400,
            "invalid_request",
            Some("deviceId"),
        ),
        (
            "null deviceId",
            r#"{"deviceId": null}"#.into(),
            400,
            "invalid_request",
            Some("deviceId"),
        ),
        (
            "numeric deviceId",
            r#"{"deviceId": 42}"#.into(),
            400,
            "invalid_request",
            Some("deviceId"),
        ),
        (
            "device name",
            r#"{"deviceId": "DESKTOP-1"}"#.into(),
            400,
            "invalid_request",
            Some("deviceId"),
        ),
        (
            "filter injection",
            format!(r#"{{"deviceId": "{AAD} or 1 eq 1"}}"#),
            400,
            "invalid_request",
            Some("deviceId"),
        ),
        (
            "nil GUID",
            r#"{"deviceId": "00000000-0000-0000-0000-000000000000"}"#.into(),
            400,
            "invalid_request",
            Some("deviceId"),
        ),
        (
            "typo relase",
            format!(r#"{{"deviceId": "{AAD}", "relase": true}}"#),
            400,
            "invalid_request",
            Some("relase"),
        ),
        (
            "unknown field",
            format!(r#"{{"deviceId": "{AAD}", "isolationType": "Full"}}"#),
            400,
            "invalid_request",
            Some("isolationType"),
        ),
        (
            "duplicate release",
            format!(r#"{{"deviceId": "{AAD}", "release": true, "Release": false}}"#),
            400,
            "invalid_request",
            Some("Release"),
        ),
        (
            "release yes",
            format!(r#"{{"deviceId": "{AAD}", "release": "yes"}}"#),
            400,
            "invalid_request",
            Some("release"),
        ),
        (
            "release 1",
            format!(r#"{{"deviceId": "{AAD}", "release": 1}}"#),
            400,
            "invalid_request",
            Some("release"),
        ),
        (
            "release null",
            format!(r#"{{"deviceId": "{AAD}", "release": null}}"#),
            400,
            "invalid_request",
            Some("release"),
        ),
        (
            "comment too long",
            format!(
                r#"{{"deviceId": "{AAD}", "comment": "{}"}}"#,
                "x".repeat(1001)
            ),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "comment newline",
            format!(r#"{{"deviceId": "{AAD}", "comment": "a\nb"}}"#),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "comment number",
            format!(r#"{{"deviceId": "{AAD}", "comment": 7}}"#),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "callerName control",
            format!(r#"{{"deviceId": "{AAD}", "callerName": "a\u0007"}}"#),
            400,
            "invalid_request",
            Some("callerName"),
        ),
        (
            "too large",
            format!(
                r#"{{"deviceId": "{AAD}", "comment": "{}"}}"#,
                "x".repeat(70_000)
            ),
            413,
            "payload_too_large",
            None,
        ),
    ]
}

fn check(
    case: &str,
    mode: &str,
    response: &crate::host_emulator::ClientResponse,
    status: u16,
    code: &str,
    field: Option<&str>,
) -> Value {
    assert_eq!(
        response.status, status,
        "{case} ({mode}): {}",
        response.body
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{case} ({mode})"
    );
    let problem = response.json();
    assert_eq!(problem["code"], code, "{case} ({mode}): {problem}");
    assert_eq!(problem["status"], status, "{case} ({mode})");
    if let Some(field) = field {
        assert_eq!(problem["field"], field, "{case} ({mode}): {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{case} ({mode}): the detail must name {field}: {problem}"
        );
    }
    problem
}

#[tokio::test]
async fn invalid_payloads_are_rejected_in_both_modes_and_nothing_reaches_defender() {
    // Arrange
    let app = spawn_app().await;

    for (case, body, status, code, field) in cases() {
        let id = uuid::Uuid::new_v4().to_string();
        let request = CallerRequest::json(body).invocation_id(&id);

        // Act
        let forwarded = app.host.forwarded(&request).await;
        let payload = app.host.payload(&request).await;

        // Assert
        let problem = check(case, "forwarded", &forwarded, status, code, field);
        assert_eq!(problem["invocationId"], id.as_str(), "{case}");
        check(case, "payload", &payload, status, code, field);
        assert_eq!(
            forwarded.body, payload.body,
            "{case}: both modes answer the same"
        );
    }
    assert!(
        app.defender_requests().is_empty(),
        "Defender received {:?}",
        app.defender_requests()
    );
    assert!(
        app.token_requests().is_empty(),
        "no token is needed to reject input"
    );
}

#[tokio::test]
async fn a_request_without_a_body_is_a_400_in_both_modes() {
    let app = spawn_app().await;
    let request = CallerRequest::empty();

    let forwarded = app.host.forwarded(&request).await;
    let payload = app.host.payload(&request).await;

    for (mode, response) in [("forwarded", &forwarded), ("payload", &payload)] {
        assert_eq!(response.status, 400, "{mode}");
        let problem = response.json();
        assert_eq!(problem["code"], "invalid_request", "{mode}");
        assert!(
            problem["detail"].as_str().unwrap().contains("empty"),
            "{mode}: {problem}"
        );
    }
    assert!(app.defender_requests().is_empty());
}
