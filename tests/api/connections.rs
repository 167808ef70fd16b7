//! Callers that go away, connections that stall, and shutdown: what the
//! service gives back and what Defender receives.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{AppOptions, TestApp, spawn_app_with};
use crate::host_emulator::CallerRequest;

/// `GET /api/machines` calls Defender received, in order, as their filters.
fn machine_lookups(app: &TestApp) -> Vec<String> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machines")
        .map(|r| r.filter.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn callers_that_give_up_while_queued_for_the_rate_budget_give_their_slots_back() {
    // The repro, on a budget clock sixty times faster (a minute
    // window lasts about a second, the hour about a minute).
    let app = spawn_app_with(AppOptions {
        env: vec![
            ("DEFENDER_RATE_LIMIT_PER_MINUTE", "5".into()),
            ("DEFENDER_RATE_LIMIT_PER_HOUR", "20".into()),
            ("DEFENDER_RATE_CLOCK_SPEED", "60".into()),
            ("REQUEST_TIMEOUT_SECONDS", "30".into()),
        ],
        ..AppOptions::default()
    })
    .await;
    let devices = app.add_fleet(26);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!("{}/api/restrict-code-execution", app.host.base());

    // 25 restricts whose callers hang up after 300 ms: five get a lookup
    // slot at once, the rest queue for later minutes and are abandoned.
    let calls = devices[..25].iter().map(|device| {
        impatient
            .post(&url)
            .header("Content-Type", "application/json")
            .body(json!({"deviceId": device}).to_string())
            .send()
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(
        answers.iter().any(Result::is_err),
        "some callers hung up while queued"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent_before = machine_lookups(&app).len();

    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceId": devices[25]}).to_string(),
        ))
        .await;

    assert_eq!(
        response.status, 201,
        "the abandoned reservations were given back: {}",
        response.body
    );
    assert!(
        sent_before <= 5,
        "only the first minute's lookups were sent: {sent_before}"
    );
    let lookups = machine_lookups(&app);
    assert_eq!(lookups.len(), sent_before + 1, "{lookups:?}");
    assert_eq!(
        lookups.last().unwrap(),
        &format!("aadDeviceId eq {}", devices[25])
    );
    let posts: Vec<_> = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert!(
        posts.last().unwrap().path.contains(&format!("{:040x}", 25)),
        "the last POST restricts the valid caller's machine"
    );
}

/// A raw connection to the handler, for what an HTTP client will not send.
async fn connect(app: &TestApp) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", app.host.port))
        .await
        .unwrap()
}

async fn write(stream: &mut tokio::net::TcpStream, text: &str) {
    use tokio::io::AsyncWriteExt;
    stream.write_all(text.as_bytes()).await.unwrap();
}

/// Everything the handler sends until it closes the connection; `None` if
/// it is still open after `within`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
    match read {
        Ok(Ok(_)) => Some(String::from_utf8_lossy(&received).into_owned()),
        // A reset is a close too.
        Ok(Err(_)) => Some(String::from_utf8_lossy(&received).into_owned()),
        Err(_) => None,
    }
}

fn restrict_request(device: &str) -> String {
    let body = json!({"deviceId": device}).to_string();
    format!(
        "POST /api/restrict-code-execution HTTP/1.1\r\nHost: localhost:7071\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Three connections that run no invocation: half a request head, a head
/// with half its body, and an idle keep-alive connection after one answer.
async fn idle_and_stalled(app: &TestApp) -> [tokio::net::TcpStream; 3] {
    let mut partial_head = connect(app).await;
    write(&mut partial_head, PARTIAL_HEAD).await;
    let mut partial_body = connect(app).await;
    write(&mut partial_body, PARTIAL_BODY).await;
    let mut idle = connect(app).await;
    write(&mut idle, OPENAPI_REQUEST).await;
    [partial_head, partial_body, idle]
}

const OPENAPI_REQUEST: &str = "GET /api/openapi.json HTTP/1.1\r\nHost: localhost:7071\r\n\r\n";
const PARTIAL_HEAD: &str = "POST /api/restrict-code-execution HTTP/1.1\r\nHost: local";
const PARTIAL_BODY: &str = "POST /api/restrict-code-execution HTTP/1.1\r\nHost: localhost:7071\r\n\
     Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"deviceId\":";

#[tokio::test]
async fn partial_requests_and_idle_connections_are_closed_after_the_read_timeout() {
    let app = spawn_app_with(AppOptions {
        env: vec![("HTTP_READ_TIMEOUT_SECONDS", "1".into())],
        ..AppOptions::default()
    })
    .await;
    let [mut partial_head, mut partial_body, mut idle] = idle_and_stalled(&app).await;
    let mut never_sent = connect(&app).await;

    let within = Duration::from_secs(10);
    let (head, body, idle, never) = tokio::join!(
        read_until_closed(&mut partial_head, within),
        read_until_closed(&mut partial_body, within),
        read_until_closed(&mut idle, within),
        read_until_closed(&mut never_sent, within),
    );

    assert!(head.is_some(), "a partial head is not kept open");
    assert!(
        never.is_some(),
        "a connection that never sends is not kept open"
    );
    let idle = idle.expect("an idle keep-alive connection is closed");
    assert!(idle.starts_with("HTTP/1.1 200"), "{idle}");
    let body = body.expect("a stalled body is answered and closed");
    assert!(body.starts_with("HTTP/1.1 400"), "{body}");
    assert!(body.contains("\"code\":\"invalid_request\""), "{body}");
    assert!(
        body.contains("did not arrive within 1 s (HTTP_READ_TIMEOUT_SECONDS)"),
        "{body}"
    );
    assert!(app.defender_requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn sigterm_closes_idle_and_stalled_connections_at_once_and_answers_a_queued_request_503() {
    let mut app = spawn_app_with(AppOptions::default()).await;
    // Defender takes a while to answer the POST: the invocation is in flight
    // when SIGTERM arrives.
    app.sim.inject(restrict_code_execution::simulator::Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: restrict_code_execution::simulator::FaultKind::Delay { millis: 1500 },
        times: 1,
    });
    let [mut partial_head, mut partial_body, mut idle] = idle_and_stalled(&app).await;
    // Two requests pipelined on one kept-alive connection: the second is
    // read only once the first is answered, during shutdown.
    let mut busy = connect(&app).await;
    let pipelined = format!(
        "{}{}",
        restrict_request(crate::restrict::ALPHA_AAD),
        restrict_request(crate::restrict::CHARLIE_AAD)
    );
    write(&mut busy, &pipelined).await;
    // A request head still arriving when SIGTERM comes, completed just after.
    let mut late = connect(&app).await;
    write(&mut late, "GET /api/openapi.json HTTP/1.1\r\nHost: loc").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    app.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    write(&mut late, "alhost:7071\r\n\r\n").await;
    let within = Duration::from_secs(10);
    let (head, body, idle, busy, late) = tokio::join!(
        read_until_closed(&mut partial_head, within),
        read_until_closed(&mut partial_body, within),
        read_until_closed(&mut idle, within),
        read_until_closed(&mut busy, within),
        read_until_closed(&mut late, within),
    );

    let late = late.unwrap();
    assert!(
        late.starts_with("HTTP/1.1 503"),
        "a request completed during shutdown is answered: {late}"
    );
    assert!(late.contains("\"code\":\"shutting_down\""), "{late}");
    assert_eq!(head.as_deref(), Some(""), "closed without an answer");
    assert_eq!(body.as_deref(), Some(""), "closed without an answer");
    let idle = idle.unwrap();
    assert!(
        idle.starts_with("HTTP/1.1 200") && !idle.contains("HTTP/1.1 503"),
        "{idle}"
    );
    let busy = busy.expect("the busy connection is answered and closed");
    let first = busy
        .find("HTTP/1.1 201")
        .expect("the in-flight invocation finished");
    let second = busy
        .find("HTTP/1.1 503")
        .expect("the queued request got an answer");
    assert!(first < second, "{busy}");
    assert!(busy.contains("\"code\":\"shutting_down\""), "{busy}");
    assert!(
        busy.to_ascii_lowercase().contains("connection: close"),
        "{busy}"
    );
    let status = app.exit_status().await;
    assert!(status.success(), "{status:?}");
    // Defender: one action, for the in-flight invocation only.
    let actions = app.sim.actions();
    assert_eq!(actions.len(), 1);
    assert_eq!(
        actions[0].machine_id.as_deref(),
        Some("c5cb89852ce0d21636c0491709a4571b5f190e75")
    );
    assert!(
        app.defender_requests().iter().all(|r| !r
            .filter
            .as_deref()
            .unwrap_or("")
            .contains(crate::restrict::CHARLIE_AAD)),
        "the queued request never reached Defender"
    );
}

#[tokio::test]
async fn short_of_file_descriptors_the_handler_recovers_once_idle_connections_time_out() {
    let app = spawn_app_with(AppOptions {
        env: vec![("HTTP_READ_TIMEOUT_SECONDS", "1".into())],
        max_open_files: Some(64),
        ..AppOptions::default()
    })
    .await;
    // More idle connections than the handler has file descriptors: accept
    // fails ("Too many open files") until the read timeout frees them.
    let mut idle = Vec::new();
    for _ in 0..90 {
        idle.push(connect(&app).await);
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let response = app
        .restrict(&json!({"deviceId": crate::restrict::ALPHA_AAD}))
        .await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(app.sim.actions().len(), 1);
    let logs = app.logs().await.join("\n");
    assert!(
        logs.contains("accepting a connection failed"),
        "the handler did run short of descriptors"
    );
    drop(idle);
}
