//! Input and output hygiene: what a caller or Defender's free text can do to
//! an answer or a log line, and the lenient corners that must be refused.
//! Each test asserts what Defender received (nothing, where a request is
//! refused).

use std::time::Duration;

use restrict_code_execution::{
    defender::models::Machine,
    simulator::{Fault, FaultKind},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TOKEN, TestApp, app};
use crate::host_emulator::{CallerRequest, ClientResponse, Route};

const AAD: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";

/// A restrict whose body is `body` as is (not re-serialized), in forwarded mode.
async fn raw_restrict(app: &TestApp, body: &str, accept: Option<&str>) -> ClientResponse {
    let mut request = CallerRequest::json(body);
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    app.host.forwarded(&request).await
}

#[tokio::test]
async fn an_unknown_field_name_is_echoed_escaped_on_one_line() {
    let app = app().in_process().await;
    // A key that would forge a line of the text answer and clear a terminal.
    let body = format!(r#"{{"deviceId":"{AAD}","x\n\u001b[2JError: forged":1}}"#);

    let text = raw_restrict(&app, &body, Some("text/plain")).await;
    assert_eq!(text.status, 400, "{}", text.body);
    assert!(
        !text.body.lines().any(|l| l.starts_with("Error: forged")),
        "{}",
        text.body
    );
    assert!(!text.body.contains('\u{1b}'), "{}", text.body);
    assert!(
        text.body
            .contains(r"unknown field `x\u{000A}\u{001B}[2JError: forged`"),
        "{}",
        text.body
    );

    let json = raw_restrict(&app, &body, None).await;
    assert_eq!(json.status, 400);
    assert_eq!(
        json.json()["field"],
        r"x\u{000A}\u{001B}[2JError: forged",
        "{}",
        json.body
    );
    assert!(app.defender_requests().is_empty());
}

/// A 60 KB key (the payload limit is 64 KiB) is echoed cut to 64 characters,
/// in the answer's `detail` and `field` and in the log line, in both modes.
#[tokio::test]
async fn a_60_kb_field_name_is_cut_in_the_answer_and_the_log() {
    let app = app().binary().await;
    let key = "k".repeat(60 * 1024);
    let body = format!(r#"{{"deviceId":"{AAD}","{key}":true}}"#);
    let cut = format!("{}…", "k".repeat(64));

    let forwarded = raw_restrict(&app, &body, None).await;
    let payload = app.host.payload(&CallerRequest::json(body.clone())).await;
    for answer in [forwarded, payload] {
        assert_eq!(answer.status, 400, "{}", answer.body);
        let problem = answer.json();
        assert_eq!(problem["field"], cut.as_str());
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.len() < 400, "{} bytes", detail.len());
        assert!(detail.contains(&format!("`{cut}`")), "{detail}");
    }
    let rejected = app.log_events("invocation rejected").await;
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    for line in rejected {
        let error = line["error"].as_str().unwrap();
        assert!(error.len() < 400, "{} bytes logged", error.len());
    }
    assert!(app.defender_requests().is_empty());
}

/// Characters the payload refuses can still reach Defender's records through
/// other tools (the portal, a script): a machine name and a comment holding
/// a right-to-left override, a line separator, ESC and a newline.
#[tokio::test]
async fn defender_text_cannot_break_or_reorder_the_fleet_views() {
    let app = app().in_process().await;
    let machine_id = "d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0";
    let name = "PC\u{202E}cod.exe\u{2028}FAKE-ROW";
    let machine: Machine = serde_json::from_value(json!({
        "id": machine_id, "computerDnsName": name,
        "aadDeviceId": "5b000000-0000-4000-8000-000000000001",
        "healthStatus": "Active", "osPlatform": "Windows11",
        "onboardingStatus": "Onboarded", "lastSeen": "2026-11-28T08:00:00Z",
    }))
    .unwrap();
    app.sim.add_machine(machine);
    // Restricted through Defender's API directly, as another tool would.
    let comment = "ok\u{1b}[2J\u{202E}txt.exe\nsecond line";
    let created = reqwest::Client::new()
        .post(format!(
            "{}/api/machines/{machine_id}/restrictCodeExecution",
            app.sim.url()
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"Comment": comment}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let created_id = created["id"].as_str().unwrap().to_owned();
    app.sim.advance(Duration::from_secs(120));

    let devices = |accept: &'static str| {
        let request = CallerRequest::empty()
            .query("state", "all")
            .header("Accept", accept);
        let app = &app;
        async move { app.host.forwarded_to(&Route::devices(), &request).await }
    };
    let text = devices("text/plain").await;
    assert_eq!(text.status, 200, "{}", text.body);
    // One line for the device, one for the count.
    assert_eq!(text.body.split_terminator('\n').count(), 2, "{}", text.body);
    for raw in ['\u{202E}', '\u{2028}', '\u{1b}'] {
        assert!(!text.body.contains(raw), "{:?}", text.body);
    }
    assert!(
        text.body.starts_with(&format!(
            "PC\\u{{202E}}cod.exe\\u{{2028}}FAKE-ROW ({machine_id})"
        )),
        "{}",
        text.body
    );
    assert!(
        text.body
            .contains(r#""ok\u{001B}[2J\u{202E}txt.exe second line""#),
        "{}",
        text.body
    );

    // The action status and a restrict of the machine name it on one line too.
    let action_id = created_id;
    let status = app
        .host
        .forwarded_to(
            &Route::status(&action_id),
            &CallerRequest::empty().header("Accept", "text/plain"),
        )
        .await;
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(
        status.body.split_terminator('\n').count(),
        1,
        "{}",
        status.body
    );
    assert!(
        status.body.contains(r"PC\u{202E}cod.exe\u{2028}FAKE-ROW"),
        "{}",
        status.body
    );
    let restrict = app
        .host
        .forwarded(
            &CallerRequest::json(json!({"deviceId": machine_id}).to_string())
                .header("Accept", "text/plain"),
        )
        .await;
    assert_eq!(restrict.status, 200, "{}", restrict.body);
    assert!(!restrict.body.contains('\u{202E}'), "{}", restrict.body);
    assert!(!restrict.body.contains('\u{2028}'), "{}", restrict.body);

    let page = devices("text/html").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(&format!("<strong><bdi>{name}</bdi></strong>")),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(
            "<div class=\"comment\" dir=\"auto\">ok\u{1b}[2J\u{202E}txt.exe\nsecond line</div>"
        ),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn wait_takes_digits_only() {
    let app = app().in_process().await;
    for wait in ["+5", " +5", "-0", "5s"] {
        let body = json!({"deviceId": AAD, "wait": wait}).to_string();
        let answer = raw_restrict(&app, &body, None).await;
        assert_eq!(answer.status, 400, "{wait}: {}", answer.body);
        assert_eq!(answer.json()["field"], "wait");
    }
    assert!(app.defender_requests().is_empty());
}

/// `?State=released` used to be ignored: the caller saw the restricted
/// devices and took them for the released ones.
#[tokio::test]
async fn unknown_and_wrong_case_query_parameters_are_refused_in_both_modes() {
    let app = app().in_process().await;
    let cases = [
        (Route::devices(), "State", "released"),
        (Route::devices(), "PageSize", "10"),
        (Route::restrict(), "dryRun", "true"),
        (
            Route::status("6c8e2d6b-94d6-4f1b-9b1d-2e0bb5f3c1a7"),
            "wait",
            "30",
        ),
    ];
    for (route, name, value) in cases {
        let mut request = CallerRequest::json(json!({"deviceId": AAD}).to_string())
            .query("code", "the-function-key")
            .query(name, value);
        if route.method == "GET" {
            request.body = None;
        }
        let forwarded = app.host.forwarded_to(&route, &request).await;
        let payload = app.host.payload_to(&route, &request).await;
        for answer in [forwarded, payload] {
            assert_eq!(answer.status, 400, "{name}: {}", answer.body);
            let problem = answer.json();
            assert_eq!(problem["code"], "invalid_request");
            assert_eq!(problem["field"], name);
            let detail = problem["detail"].as_str().unwrap();
            assert!(
                detail.contains(&format!("unknown query parameter `{name}`")),
                "{detail}"
            );
        }
    }
    assert!(app.defender_requests().is_empty(), "{:?}", app.call_kinds());

    // The function key is the host's, in any case; a known name passes.
    let ok = CallerRequest::empty()
        .query("Code", "the-function-key")
        .query("state", "released");
    let answer = app.host.forwarded_to(&Route::devices(), &ok).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["state"], "released");
}

/// axum would run a GET handler for HEAD (Defender reads included) and drop
/// the body. HEAD is refused before anything runs, in both modes.
#[tokio::test]
async fn head_on_a_get_function_reads_nothing_from_defender() {
    let app = app().in_process().await;
    for route in [
        Route::devices(),
        Route::status("6c8e2d6b-94d6-4f1b-9b1d-2e0bb5f3c1a7"),
        Route {
            function: "list-jobs",
            method: "GET",
            path: "/api/restrict-code-execution/jobs".to_owned(),
            params: Vec::new(),
        },
    ] {
        let head = Route {
            method: "HEAD",
            ..route.clone()
        };
        let forwarded = app.host.forwarded_to(&head, &CallerRequest::empty()).await;
        assert_eq!(forwarded.status, 405, "{}: {}", route.path, forwarded.body);
        assert!(
            forwarded.header("allow").unwrap().contains("GET"),
            "{:?}",
            forwarded.headers
        );
        let payload = app.host.payload_to(&head, &CallerRequest::empty()).await;
        assert_eq!(payload.status, 405, "{}: {}", route.path, payload.body);
    }
    assert!(app.defender_requests().is_empty(), "{:?}", app.call_kinds());
}

#[tokio::test]
async fn retry_after_zero_from_defender_is_one_second_in_header_and_detail() {
    let app = app().in_process().await;
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machines".into(),
        kind: FaultKind::Status {
            status: 429,
            retry_after: Some(0),
            body: None,
        },
        times: 1000,
    });
    let answer = app.restrict(&json!({"deviceId": AAD})).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.header("retry-after"), Some("1"));
    let detail = answer.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("Retry after 1 s"), "{detail}");
    assert!(!detail.contains(" 0 s"), "{detail}");
    assert!(
        app.defender_requests().iter().all(|r| r.method == "GET"),
        "{:?}",
        app.call_kinds()
    );
}

/// Over our limits: a problem answer and the invocation's log line. Beyond
/// hyper's own (a URI over 64 KiB): hyper's bare 414, and still a log line.
#[tokio::test]
async fn an_oversized_request_head_gets_a_problem_answer_and_a_log_line() {
    let app = app().binary().await;
    let client = reqwest::Client::new();
    let devices = format!("{}/api/restrict-code-execution/devices", app.host.base());

    let long_uri = client
        .get(format!("{devices}?code={}", "k".repeat(20 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(long_uri.status(), 414);
    let problem: Value = long_uri.json().await.unwrap();
    assert_eq!(problem["code"], "uri_too_long", "{problem}");

    let mut big_headers = client.get(&devices);
    for i in 0..80 {
        big_headers = big_headers.header(format!("x-filler-{i}"), "v".repeat(1024));
    }
    let big_headers = big_headers.send().await.unwrap();
    assert_eq!(big_headers.status(), 431);
    assert_eq!(
        big_headers.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = big_headers.json().await.unwrap();
    assert_eq!(problem["code"], "headers_too_large", "{problem}");

    // Past what a URL type takes: over a raw socket.
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", app.host.port))
        .await
        .unwrap();
    let request = format!(
        "GET /api/restrict-code-execution/devices?code={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "k".repeat(70 * 1024)
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer}");

    let rejected = app.log_events("invocation rejected").await;
    let statuses: Vec<u64> = rejected
        .iter()
        .map(|l| l["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [414, 431], "{rejected:?}");
    for line in &rejected {
        assert!(line["path"].as_str().unwrap().len() < 200, "{line}");
    }
    let refused = app
        .log_events("request head refused by the HTTP server before routing")
        .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["status"], 414);
    assert!(app.defender_requests().is_empty());
}
