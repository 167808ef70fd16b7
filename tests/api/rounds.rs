//! A machine's round under real traffic: what a refusal leaves for the next
//! request, what a POST's answer must be, what shutdown and a caller who
//! hangs up leave behind. Each test asserts what Defender received.

use std::time::Duration;

use futures_util::future::join_all;
use restrict_code_execution::simulator::{Fault, FaultKind, RecordedRequest};
use serde_json::json;
use tokio::time::Instant;

use crate::helpers::{TestApp, app, post};
use crate::restrict::{ALPHA_AAD, BRAVO_AAD};

const ALPHA: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";

fn requests(app: &TestApp, method: &str, path_end: &str) -> Vec<RecordedRequest> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == method && r.path.ends_with(path_end))
        .collect()
}

fn state_reads(app: &TestApp) -> usize {
    requests(app, "GET", "/api/machineactions").len()
}

#[tokio::test]
async fn a_conflict_passes_the_state_read_on_to_the_next_request_of_the_round() {
    let app = app().in_process().await;

    // 40 alternating restricts and releases for one device, at once.
    let answers = join_all(
        (0..40).map(|i| post(&app, json!({"deviceId": ALPHA_AAD, "release": i % 2 == 1}))),
    )
    .await;

    let reads = state_reads(&app);
    println!("40 alternating requests: {reads} state reads");
    // One read per round: the first request may start a round of its own
    // before the others are queued.
    assert!(reads <= 2, "{reads} state reads for one device");
    assert_eq!(requests(&app, "POST", "/restrictCodeExecution").len(), 1);
    assert!(requests(&app, "POST", "/unrestrictCodeExecution").is_empty());
    for (i, answer) in answers.iter().enumerate() {
        match i % 2 {
            0 => assert!(matches!(answer.status, 200 | 201), "{}", answer.body),
            _ => {
                assert_eq!(answer.status, 409, "{}", answer.body);
                assert_eq!(answer.json()["code"], "conflicting_action_pending");
            }
        }
    }
}

#[tokio::test]
async fn a_definite_refusal_answers_the_whole_round_at_once_with_one_post() {
    let app = app().in_process().await;
    // Defender refuses the first POST for a missing role; a second POST
    // would be accepted.
    app.sim.inject(
        Fault::new(
            "/restrictCodeExecution",
            FaultKind::Status {
                status: 403,
                retry_after: None,
                body: Some(json!({"error": {
                    "code": "Forbidden",
                    "message": "The application does not have any of the required application roles",
                }})),
            },
        )
        .method("POST"),
    );
    let started = Instant::now();

    let answers = join_all((0..10).map(|_| post(&app, json!({"deviceId": ALPHA_AAD})))).await;

    let took = started.elapsed();
    for answer in &answers {
        assert_eq!(answer.status, 502, "{}", answer.body);
        assert_eq!(
            answer.json()["code"],
            "defender_forbidden",
            "{}",
            answer.body
        );
    }
    assert_eq!(
        requests(&app, "POST", "/restrictCodeExecution").len(),
        1,
        "one POST for the round"
    );
    assert_eq!(state_reads(&app), 1, "one read for the round");
    assert!(app.sim.actions().is_empty());
    // The refusal is not an unknown outcome: nobody waits the 2 s a write
    // of unknown outcome is given to show. (Not a speed check: the bound
    // is the hold itself, which every answer would otherwise include.)
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // The machine is free at once: the next request (after the role is
    // granted) reads and POSTs.
    let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(requests(&app, "POST", "/restrictCodeExecution").len(), 2);
}

#[tokio::test]
async fn a_post_answered_with_another_machines_action_is_a_defender_error() {
    let app = app().in_process().await;
    let other_machine = "0123456789abcdef0123456789abcdef01234567";
    let future = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    app.sim.inject(
        Fault::new(
            "/restrictCodeExecution",
            FaultKind::Status {
                status: 201,
                retry_after: None,
                body: Some(json!({
                    "id": "e2b3c4d5-0000-4000-8000-00000000beef",
                    "type": "UnrestrictCodeExecution",
                    "status": "Pending",
                    "machineId": other_machine,
                    "creationDateTimeUtc": future,
                })),
            },
        )
        .method("POST"),
    );

    let answer = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(answer.status, 502, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["code"], "defender_error", "{}", answer.body);
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(ALPHA), "{detail}");
    assert!(detail.contains(other_machine), "{detail}");
    assert!(detail.contains("restrictCodeExecution"), "{detail}");
    assert!(detail.contains("UnrestrictCodeExecution"), "{detail}");
    let posts = requests(&app, "POST", "CodeExecution");
    assert_eq!(posts.len(), 1);
    assert_eq!(
        posts[0].path,
        format!("/api/machines/{ALPHA}/restrictCodeExecution")
    );

    // Not remembered as the device's pending action: the next request reads
    // the machine again and creates the real one.
    let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_ne!(
        again.json()["action"]["id"],
        "e2b3c4d5-0000-4000-8000-00000000beef"
    );
    assert_eq!(requests(&app, "POST", "/restrictCodeExecution").len(), 2);
}

#[tokio::test]
async fn sigterm_refuses_invocations_queued_for_the_rate_budget_at_once() {
    // Two lookups a minute: the third device's lookup waits a minute.
    let mut app = app()
        .env("DEFENDER_RATE_LIMIT_PER_MINUTE", 2)
        .env("REQUEST_TIMEOUT_SECONDS", 120)
        .binary()
        .await;
    let devices = app.add_fleet(5);
    let calls = devices
        .iter()
        .map(|device| post(&app, json!({"deviceId": device})));
    let answers = join_all(calls);
    let terminate = async {
        // The two with a lookup slot go on; the other three wait for one.
        for _ in 0..100 {
            if requests(&app, "GET", "/api/machines").len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.terminate();
    };
    let (answers, ()) = tokio::join!(answers, terminate);

    // Exits within seconds, not after the minute the budget would take.
    let status = app.exit_status().await;
    assert!(status.success(), "{status:?}");
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(refused.len() >= 3, "{statuses:?}");
    for answer in &refused {
        assert_eq!(answer.json()["code"], "shutting_down", "{}", answer.body);
    }
    let created = answers.iter().filter(|a| a.status == 201).count();
    assert_eq!(created + refused.len(), 5, "{statuses:?}");
    // Defender: the two lookups that had their slot, no lookup for the
    // rest, and a POST only for an invocation answered 201.
    let lookups = requests(&app, "GET", "/api/machines");
    assert_eq!(lookups.len(), 2, "{lookups:?}");
    assert_eq!(requests(&app, "POST", "CodeExecution").len(), created);
    assert_eq!(app.sim.actions().len(), created);
}

#[tokio::test]
async fn a_caller_who_hangs_up_still_gets_an_invocation_line_with_what_was_sent() {
    let app = app().binary().await;
    // Defender takes 1.5 s before it handles the POST; the caller gives up
    // after 0.7 s.
    app.sim.inject(
        Fault::new("restrictCodeExecution", FaultKind::Delay { millis: 1500 }).method("POST"),
    );
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let url = format!("{}/api/restrict-code-execution", app.host.base());
    let hung_up = impatient
        .post(&url)
        .header("Content-Type", "application/json")
        .body(json!({"deviceId": ALPHA_AAD}).to_string())
        .send()
        .await;
    assert!(hung_up.is_err(), "the caller hung up: {hung_up:?}");
    // And one who hangs up before anything is sent: its lookup is slow.
    app.sim
        .inject(Fault::new("/api/machines", FaultKind::Delay { millis: 1500 }).method("GET"));
    let hung_up = impatient
        .post(&url)
        .header("Content-Type", "application/json")
        .body(json!({"deviceId": BRAVO_AAD, "release": true}).to_string())
        .send()
        .await;
    assert!(hung_up.is_err(), "the caller hung up: {hung_up:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let actions = app.sim.actions();
    assert_eq!(actions.len(), 1, "the POST was seen through");
    let lines = app.log_events("invocation abandoned").await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let posted = lines
        .iter()
        .find(|l| l["device_id"] == ALPHA_AAD)
        .expect("a line for the restrict");
    assert_eq!(posted["outcome"], "abandoned");
    assert_eq!(posted["function"], "restrict-code-execution");
    assert_eq!(posted["action_id"], actions[0].id.as_str());
    assert_eq!(posted["result"], "requested");
    let unsent = lines
        .iter()
        .find(|l| l["device_id"] == BRAVO_AAD)
        .expect("a line for the release");
    assert_eq!(unsent["outcome"], "abandoned");
    assert!(unsent["action_id"].is_null(), "{unsent}");
    assert!(
        requests(&app, "POST", "CodeExecution").len() == 1,
        "nothing was sent for the release"
    );
    assert!(
        app.log_events("invocation succeeded").await.is_empty()
            && app.log_events("invocation failed").await.is_empty()
    );
}

#[tokio::test]
async fn sigterm_sees_through_a_post_whose_caller_hung_up_before_exiting() {
    let mut app = app().binary().await;
    // Defender takes 2 s before it handles the POST; the caller gives up
    // after 0.7 s, and the instance is stopped right after.
    app.sim.inject(
        Fault::new("restrictCodeExecution", FaultKind::Delay { millis: 2000 }).method("POST"),
    );
    let hung_up = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap()
        .post(format!("{}/api/restrict-code-execution", app.host.base()))
        .header("Content-Type", "application/json")
        .body(json!({"deviceId": ALPHA_AAD}).to_string())
        .send()
        .await;
    assert!(hung_up.is_err(), "the caller hung up: {hung_up:?}");
    app.terminate();

    let status = app.exit_status().await;
    assert!(status.success(), "{status:?}");
    // The POST was waited for, and its line written, before the exit.
    let posts = requests(&app, "POST", "/restrictCodeExecution");
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].status, 201, "the POST was answered, not cut off");
    let actions = app.sim.actions();
    assert_eq!(actions.len(), 1);
    let lines = app.log_events("invocation abandoned").await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["action_id"], actions[0].id.as_str());
    assert_eq!(lines[0]["result"], "requested");
}
