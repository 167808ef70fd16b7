//! Every invalid input gets its 400/413 naming the field, in both invocation
//! modes, and Defender receives nothing.

use serde_json::Value;

use crate::helpers::{spawn_app, spawn_in_process};
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
            "comment of newlines only",
            format!(r#"{{"deviceId": "{AAD}", "comment": "\n\n"}}"#),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "comment ending in a newline",
            format!(r#"{{"deviceId": "{AAD}", "comment": "Ticket 42\n"}}"#),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "comment with a line separator",
            format!(r#"{{"deviceId": "{AAD}", "comment": "Ticket 42\u2028approved"}}"#),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "comment with a bidirectional isolate",
            format!(r#"{{"deviceId": "{AAD}", "comment": "\u2066Ticket\u2069"}}"#),
            400,
            "invalid_request",
            Some("comment"),
        ),
        (
            "callerName with a right-to-left override",
            format!(r#"{{"deviceId": "{AAD}", "callerName": "alice\u202Emoc.nimda"}}"#),
            400,
            "invalid_request",
            Some("callerName"),
        ),
        (
            "deviceIds with a null deviceId",
            format!(r#"{{"deviceIds": ["{AAD}"], "deviceId": null}}"#),
            400,
            "invalid_request",
            Some("deviceIds"),
        ),
        (
            "deviceId with a null deviceIds",
            format!(r#"{{"deviceId": "{AAD}", "deviceIds": null}}"#),
            400,
            "invalid_request",
            Some("deviceIds"),
        ),
        (
            "truncated array",
            "[1,2".into(),
            400,
            "invalid_request",
            None,
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
        (
            "releaseAfter below a minute",
            format!(r#"{{"deviceId":"{AAD}","releaseAfter":"PT30S"}}"#),
            400,
            "invalid_request",
            Some("releaseAfter"),
        ),
        (
            "releaseAfter in months",
            format!(r#"{{"deviceId":"{AAD}","releaseAfter":"P1M"}}"#),
            400,
            "invalid_request",
            Some("releaseAfter"),
        ),
        (
            "releaseAfter on a release",
            format!(r#"{{"deviceId":"{AAD}","release":true,"releaseAfter":"PT4H"}}"#),
            400,
            "invalid_request",
            Some("releaseAfter"),
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
        if case.starts_with("truncated") {
            let detail = problem["detail"].as_str().unwrap();
            assert!(detail.contains("not valid JSON"), "{case}: {detail}");
        }
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
    let app = spawn_in_process().await;
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

#[tokio::test]
async fn an_envelope_over_its_limit_names_the_envelope_limit() {
    let app = spawn_app().await;
    let envelope = serde_json::json!({
        "Data": {"req": {"Body": "x".repeat(1024 * 1024 + 1)}},
        "Metadata": {},
    });

    let response = app.host.payload_raw(envelope.to_string(), "inv-big").await;

    assert_eq!(response.status, 413, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "payload_too_large");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("1048576 bytes"), "{detail}");
    assert!(app.defender_requests().is_empty());
}

/// A raw exchange: what an HTTP client library would not send.
async fn raw_exchange(app: &crate::helpers::TestApp, request: &[u8], close_write: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.host.port))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    if close_write {
        stream.shutdown().await.unwrap();
    }
    let mut answer = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test]
async fn a_content_length_over_the_limit_is_413_at_once_without_100_continue() {
    let app = spawn_app().await;
    for (path, limit) in [
        ("/api/restrict-code-execution", "65536"),
        ("/restrict-code-execution", "1048576"),
    ] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost:7071\r\nContent-Type: application/json\r\n\
             Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
        );

        let answer = raw_exchange(&app, request.as_bytes(), false).await;

        assert!(!answer.contains("100 Continue"), "{answer}");
        if path.starts_with("/api/") {
            assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        } else {
            // Payload mode: the host's envelope, HTTP 200, carries the 413.
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.contains(r#"\"status\":413"#), "{answer}");
        }
        assert!(answer.contains("payload_too_large"), "{answer}");
        // The body was never read: the client must not reuse the connection.
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert!(answer.contains(&format!("{limit} bytes")), "{answer}");
    }
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn a_forwarded_body_cut_short_is_invalid_request_not_invalid_envelope() {
    let app = spawn_app().await;
    let request = "POST /api/restrict-code-execution HTTP/1.1\r\nHost: localhost:7071\r\n\
                   Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"deviceId\":";

    let answer = raw_exchange(&app, request.as_bytes(), true).await;

    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"invalid_request""#), "{answer}");
    assert!(answer.contains("could not be read"), "{answer}");
    assert!(app.defender_requests().is_empty());
}
