//! The Functions host's wire protocol: start-up, readiness, both invocation
//! modes, malformed envelopes, and exit codes.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{spawn_app, spawn_in_process, start_handler};
use crate::host_emulator::CallerRequest;

#[tokio::test]
async fn the_readiness_probe_gets_an_answer_and_the_bound_address_is_logged() {
    let app = spawn_app().await;

    let response = reqwest::get(format!("{}/", app.host.base())).await.unwrap();

    assert_eq!(response.status(), 200);
    let listening = app.log_events("listening").await;
    assert_eq!(listening.len(), 1, "{:?}", app.logs().await);
    assert_eq!(
        listening[0]["address"],
        format!("127.0.0.1:{}", app.host.port),
        "binds IPv4 loopback on FUNCTIONS_CUSTOMHANDLER_PORT"
    );
}

#[tokio::test]
async fn both_modes_give_the_same_answer_for_the_same_invocation() {
    let app = spawn_in_process().await;
    // Two devices, so that the second call is not a duplicate of the first.
    let alpha = json!({"deviceId": crate::restrict::ALPHA_AAD, "callerName": "ops"}).to_string();
    let charlie =
        json!({"deviceId": crate::restrict::CHARLIE_AAD, "callerName": "ops"}).to_string();

    let forwarded = app.host.forwarded(&CallerRequest::json(alpha)).await;
    let payload = app.host.payload(&CallerRequest::json(charlie)).await;

    assert_eq!(forwarded.status, 201, "{}", forwarded.body);
    assert_eq!(payload.status, 201, "{}", payload.body);
    assert_eq!(forwarded.header("content-type"), Some("application/json"));
    assert_eq!(payload.header("content-type"), Some("application/json"));
    let (f, p) = (forwarded.json(), payload.json());
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&f), keys(&p));
    assert_eq!(f["outcome"], "requested");
    assert_eq!(p["outcome"], "requested");
    assert_eq!(
        p["machine"]["computerDnsName"],
        "WIN11-CHARLIE.contoso.local"
    );
    // Payload mode also hands the host one readable log line.
    assert!(
        payload.logs.iter().any(|l| l.contains("WIN11-CHARLIE")),
        "{:?}",
        payload.logs
    );
}

#[tokio::test]
async fn the_invocation_id_is_in_the_error_body_and_every_log_line_of_the_invocation() {
    let app = spawn_app().await;
    let id = "6d1a3e9c-1f0b-4c55-9a0e-7d2b8f3c4a11";

    let response = app
        .host
        .forwarded(&CallerRequest::json(r#"{"deviceId":"nope"}"#).invocation_id(id))
        .await;

    assert_eq!(response.json()["invocationId"], id);
    // Every line after start-up (the "listening" line) belongs to this, the
    // only invocation.
    let lines: Vec<serde_json::Value> = app
        .logs()
        .await
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .skip_while(|v: &serde_json::Value| v["message"] != "listening")
        .skip(1)
        .collect();
    assert!(!lines.is_empty());
    for line in lines {
        assert_eq!(line["span"]["invocation_id"], id, "{line}");
    }
}

#[tokio::test]
async fn routes_match_case_insensitively_and_with_a_trailing_slash_as_the_host_does() {
    let app = spawn_app().await;
    let client = reqwest::Client::new();

    let response = client
        .post(format!(
            "{}/api/Restrict-Code-Execution/?code=k",
            app.host.base()
        ))
        .header("Content-Type", "application/json")
        .body(json!({"deviceId": crate::restrict::ALPHA_AAD}).to_string())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(app.sim.actions().len(), 1);
}

#[tokio::test]
async fn a_malformed_envelope_gets_a_well_formed_envelope_carrying_a_400() {
    let app = spawn_in_process().await;
    for envelope in [
        "this is not json".to_owned(),
        json!({"Data": {}}).to_string(),
        json!({"Data": {"req": {"Body": {"deviceId": "x"}}}}).to_string(),
        "null".to_owned(),
    ] {
        // payload_raw applies the host's rules: a non-200 or non-JSON answer fails here.
        let response = app.host.payload_raw(envelope.clone(), "inv-1").await;
        assert_eq!(response.status, 400, "{envelope}");
        assert_eq!(response.json()["code"], "invalid_envelope", "{envelope}");
    }
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn payload_mode_reads_a_chunked_envelope_with_double_encoded_metadata() {
    let app = spawn_in_process().await;
    // A long comment makes the envelope span many chunks.
    let body = json!({
        "DeviceId": crate::restrict::ALPHA_AAD,
        "Release": "false",
        "Comment": "c".repeat(900),
    })
    .to_string();

    let response = app.host.payload(&CallerRequest::json(body)).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let post = app
        .defender_requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(post.body, json!({"Comment": "c".repeat(900)}).to_string());
}

#[tokio::test]
async fn a_bad_port_setting_is_a_startup_error_naming_the_variable() {
    let (mut child, logs) =
        start_handler(&[("FUNCTIONS_CUSTOMHANDLER_PORT", "70000".to_owned())], &[]);

    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();

    assert!(
        !status.success(),
        "the host does not restart a handler that exits 0"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let output = logs.lock().unwrap().join("\n");
    assert!(output.contains("FUNCTIONS_CUSTOMHANDLER_PORT"), "{output}");
}

#[tokio::test]
async fn a_taken_port_is_a_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (mut child, logs) =
        start_handler(&[("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())], &[]);

    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();

    assert!(!status.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        logs.lock()
            .unwrap()
            .join("\n")
            .contains(&format!("127.0.0.1:{port}"))
    );
}

#[tokio::test]
async fn wrong_method_and_unknown_route_are_problem_answers() {
    let app = spawn_app().await;
    let client = reqwest::Client::new();

    let get = client
        .get(format!("{}/api/restrict-code-execution", app.host.base()))
        .send()
        .await
        .unwrap();
    let unknown = client
        .post(format!("{}/api/something-else", app.host.base()))
        .send()
        .await
        .unwrap();

    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST");
    assert_eq!(unknown.status(), 404);
    let problem: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(problem["code"], "route_not_found");
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_invocation_finish_then_exits_cleanly() {
    let mut app = spawn_app().await;
    // Defender takes a while to answer the POST.
    app.sim.inject(restrict_code_execution::simulator::Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: restrict_code_execution::simulator::FaultKind::Delay { millis: 1500 },
        times: 1,
    });
    let body = json!({"deviceId": crate::restrict::ALPHA_AAD}).to_string();
    let request = CallerRequest::json(body);
    let in_flight = app.host.forwarded(&request);
    let terminate = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.terminate();
    };

    let (response, ()) = tokio::join!(in_flight, terminate);

    assert_eq!(response.status, 201, "{}", response.body);
    let status = app.exit_status().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(app.sim.actions().len(), 1);
    assert!(
        !app.log_events("shutdown signal received; finishing in-flight invocations")
            .await
            .is_empty()
    );
}

/// The host's HTTP client gives up on a handler that never answers; so must
/// the emulator when it calls the service in this process, or a hung
/// invocation hangs the test run instead of failing its test.
#[tokio::test(start_paused = true)]
async fn an_in_process_invocation_that_never_answers_fails_its_test_instead_of_hanging() {
    use crate::host_emulator::HostEmulator;
    type Request = axum::extract::Request;
    let never: restrict_code_execution::startup::App = tower::ServiceBuilder::new()
        .map_request(std::convert::identity as fn(Request) -> Request)
        .service(axum::Router::new().fallback(|| async { std::future::pending::<()>().await }));
    let host = HostEmulator::in_process(never);

    let call = tokio::spawn(async move {
        host.forwarded(&CallerRequest::json("{}")).await;
    });
    let ended = tokio::time::timeout(Duration::from_secs(600), call).await;

    let Ok(ended) = ended else {
        panic!("the emulator waited for the service forever");
    };
    assert!(
        ended.is_err_and(|e| e.is_panic()),
        "a call the service never answers fails"
    );
}
