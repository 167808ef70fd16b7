//! Safety under real Defender behaviour: idempotent, state-aware actions; no
//! duplicate or out-of-order action under retries, duplicates, races and
//! faults. Every test asserts what Defender ended up holding, not only what
//! the caller was told.

use std::time::Duration;

use restrict_code_execution::simulator::{Fault, FaultKind};
use serde_json::{Value, json};

use crate::helpers::{TestApp, app, post, posts, spawn_app, spawn_in_process};
use crate::host_emulator::CallerRequest;
use crate::restrict::{ALPHA_AAD, CHARLIE_AAD};

const ALPHA: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";

fn fault(method: &str, path: &str, kind: FaultKind, times: u32) -> Fault {
    Fault {
        method: Some(method.into()),
        path_contains: path.into(),
        kind,
        times,
    }
}

fn status(status: u16) -> FaultKind {
    FaultKind::Status {
        status,
        retry_after: None,
        body: None,
    }
}

/// The actions Defender holds for a machine, oldest first, as (type, status).
fn history(app: &TestApp, machine_id: &str) -> Vec<(String, String)> {
    let mut actions: Vec<_> = app
        .sim
        .actions()
        .into_iter()
        .filter(|a| a.machine_id.as_deref() == Some(machine_id))
        .collect();
    actions.reverse();
    actions
        .into_iter()
        .map(|a| (a.action_type.to_string(), a.status.to_string()))
        .collect()
}

/// The types of the actions Defender holds for a machine, oldest first.
fn types(app: &TestApp, machine_id: &str) -> Vec<String> {
    history(app, machine_id)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

fn restrict_pending() -> Vec<(String, String)> {
    vec![("RestrictCodeExecution".into(), "Pending".into())]
}

// --- State-aware, idempotent actions -------------------------------------

#[tokio::test]
async fn the_same_request_twice_in_a_row_returns_the_pending_action_without_a_second_post() {
    let app = spawn_in_process().await;

    let first = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    let second = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(first.status, 201);
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.json()["outcome"], "already_pending");
    assert_eq!(second.json()["action"]["id"], first.json()["action"]["id"]);
    assert_eq!(posts(&app).len(), 1);
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn an_opposite_pending_action_is_a_409_naming_it_and_nothing_is_posted() {
    let app = spawn_in_process().await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();

    let release = post(&app, json!({"deviceId": ALPHA_AAD, "release": true})).await;

    assert_eq!(release.status, 409, "{}", release.body);
    let problem = release.json();
    assert_eq!(problem["code"], "conflicting_action_pending");
    assert_eq!(problem["actionId"], restrict["action"]["id"]);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("cancelPending")
    );
    assert_eq!(posts(&app).len(), 1);
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn cancel_pending_cancels_the_opposite_action_then_acts() {
    let app = spawn_in_process().await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    let restrict_id = restrict["action"]["id"].as_str().unwrap().to_owned();

    let release = post(
        &app,
        json!({"deviceId": ALPHA_AAD, "release": true, "cancelPending": "true", "callerName": "soc"}),
    )
    .await;

    assert_eq!(release.status, 201, "{}", release.body);
    let body = release.json();
    assert_eq!(body["outcome"], "requested");
    assert_eq!(body["cancelledActionIds"], json!([restrict_id]));
    let posts = posts(&app);
    assert_eq!(posts.len(), 3, "{posts:#?}");
    assert_eq!(
        posts[1].path,
        format!("/api/machineactions/{restrict_id}/cancel")
    );
    let cancel_body: Value = serde_json::from_str(&posts[1].body).unwrap();
    assert!(
        cancel_body["Comment"]
            .as_str()
            .unwrap()
            .contains("requested by soc"),
        "{cancel_body}"
    );
    assert!(posts[2].path.ends_with("/unrestrictCodeExecution"));
    assert_eq!(
        history(&app, ALPHA),
        vec![
            ("RestrictCodeExecution".into(), "Cancelled".into()),
            ("UnrestrictCodeExecution".into(), "Pending".into())
        ]
    );
}

#[tokio::test]
async fn a_device_already_in_the_wanted_state_is_left_alone_unless_forced() {
    let app = spawn_in_process().await;
    let first = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    app.sim.advance(Duration::from_secs(60));

    let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    let forced = post(&app, json!({"deviceId": ALPHA_AAD, "force": true})).await;

    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["outcome"], "already_in_state");
    assert_eq!(again.json()["action"]["id"], first["action"]["id"]);
    assert_eq!(again.json()["action"]["status"], "Succeeded");
    assert_eq!(forced.status, 201, "{}", forced.body);
    assert_eq!(
        posts(&app).len(),
        2,
        "one POST for the first call, one for the forced"
    );
}

#[tokio::test]
async fn release_after_a_finished_restrict_acts() {
    let app = spawn_in_process().await;
    post(&app, json!({"deviceId": ALPHA_AAD})).await;
    app.sim.advance(Duration::from_secs(60));

    let release = post(&app, json!({"deviceId": ALPHA_AAD, "release": true})).await;

    assert_eq!(release.status, 201, "{}", release.body);
    assert_eq!(
        history(&app, ALPHA),
        vec![
            ("RestrictCodeExecution".into(), "Succeeded".into()),
            ("UnrestrictCodeExecution".into(), "Pending".into())
        ]
    );
}

#[tokio::test]
async fn defenders_already_in_progress_answer_becomes_already_pending() {
    let app = spawn_in_process().await;
    let first = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    // The state read misses the pending action once (a lagging list), so the
    // second call POSTs and Defender refuses the duplicate.
    app.sim.inject(fault(
        "GET",
        "/api/machineactions",
        FaultKind::Status {
            status: 200,
            retry_after: None,
            body: Some(json!({"value": []})),
        },
        1,
    ));

    let second = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.json()["outcome"], "already_pending");
    assert_eq!(second.json()["action"]["id"], first["action"]["id"]);
    let posts = posts(&app);
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[1].status, 400, "Defender refused the duplicate");
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

// --- Concurrency -----------------------------------------------------------

#[tokio::test]
async fn the_same_request_twice_at_once_in_both_modes_makes_one_action() {
    let app = spawn_in_process().await;
    let body = json!({"deviceId": ALPHA_AAD}).to_string();

    let (first, second) = (CallerRequest::json(body.clone()), CallerRequest::json(body));
    let (a, b) = tokio::join!(app.host.forwarded(&first), app.host.payload(&second));

    let (a, b) = (a.json(), b.json());
    assert_eq!(a["action"]["id"], b["action"]["id"], "{a}\n{b}");
    let mut outcomes = [
        a["outcome"].as_str().unwrap(),
        b["outcome"].as_str().unwrap(),
    ];
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["already_pending", "requested"]);
    assert_eq!(posts(&app).len(), 1);
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn restrict_and_release_racing_for_one_device_never_leave_two_pending_actions() {
    let app = spawn_in_process().await;

    let (restrict, release) = tokio::join!(
        post(&app, json!({"deviceId": ALPHA_AAD})),
        post(&app, json!({"deviceId": ALPHA_AAD, "release": true}))
    );

    let mut statuses = [restrict.status, release.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "{}\n{}", restrict.body, release.body);
    let history = history(&app, ALPHA);
    assert_eq!(history.len(), 1, "{history:?}");
    let (winner, loser) = if restrict.status == 201 {
        (&restrict, &release)
    } else {
        (&release, &restrict)
    };
    assert_eq!(loser.json()["actionId"], winner.json()["action"]["id"]);
}

#[tokio::test]
async fn fifty_concurrent_invocations_over_ten_devices_make_ten_actions() {
    let app = spawn_in_process().await;
    let devices = app.add_fleet(10);

    let calls = (0..50).map(|n| {
        let body = json!({"deviceId": devices[n % 10]}).to_string();
        let app = &app;
        async move {
            if n % 2 == 0 {
                app.host.forwarded(&CallerRequest::json(body)).await
            } else {
                app.host.payload(&CallerRequest::json(body)).await
            }
        }
    });
    let answers = futures_util::future::join_all(calls).await;

    let mut action_per_device = std::collections::HashMap::new();
    for (n, answer) in answers.iter().enumerate() {
        assert!(
            answer.status == 201 || answer.status == 200,
            "{}",
            answer.body
        );
        let id = answer.json()["action"]["id"].as_str().unwrap().to_owned();
        let previous = action_per_device
            .entry(n % 10)
            .or_insert_with(|| id.clone());
        assert_eq!(*previous, id, "device {} got two different actions", n % 10);
    }
    assert_eq!(app.sim.actions().len(), 10);
    assert_eq!(posts(&app).len(), 10);
    assert_eq!(answers.iter().filter(|a| a.status == 201).count(), 10);
}

// --- Retries, faults and budgets --------------------------------------------

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_succeeds() {
    let app = spawn_in_process().await;
    app.sim.inject(fault(
        "GET",
        "/api/machines",
        FaultKind::Status {
            status: 429,
            retry_after: Some(1),
            body: None,
        },
        1,
    ));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let lookups: Vec<u16> = app
        .defender_requests()
        .iter()
        .filter(|r| r.path == "/api/machines")
        .map(|r| r.status)
        .collect();
    assert_eq!(lookups, [429, 200]);
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn a_500_and_a_503_on_reads_are_retried() {
    let app = spawn_in_process().await;
    app.sim
        .inject(fault("GET", "/api/machineactions", status(500), 1));
    app.sim
        .inject(fault("GET", "/api/machineactions", status(503), 1));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn a_read_slower_than_the_timeout_is_retried() {
    let app = app()
        .env("DEFENDER_TIMEOUT_SECONDS", "1")
        .in_process()
        .await;
    app.sim.inject(fault(
        "GET",
        "/api/machines",
        FaultKind::Delay { millis: 2500 },
        1,
    ));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn a_malformed_body_on_a_read_is_retried() {
    let app = spawn_in_process().await;
    app.sim
        .inject(fault("GET", "/api/machines", FaultKind::MalformedBody, 1));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
}

#[tokio::test]
async fn a_connection_dropped_after_defender_accepted_the_post_finds_the_action_instead_of_reposting()
 {
    let app = spawn_in_process().await;
    app.sim.inject(fault(
        "POST",
        "restrictCodeExecution",
        FaultKind::DropAfterHandling,
        1,
    ));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.json()["outcome"], "requested");
    assert_eq!(posts(&app).len(), 1, "the POST was not re-sent");
    assert_eq!(types(&app, ALPHA), ["RestrictCodeExecution"]);
    assert_eq!(
        response.json()["action"]["id"],
        app.sim.actions()[0].id.as_str()
    );
}

#[tokio::test]
async fn a_malformed_answer_to_the_post_finds_the_action_instead_of_reposting() {
    let app = spawn_in_process().await;
    app.sim.inject(fault(
        "POST",
        "restrictCodeExecution",
        FaultKind::MalformedBody,
        1,
    ));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(posts(&app).len(), 1);
    assert_eq!(types(&app, ALPHA), ["RestrictCodeExecution"]);
}

#[tokio::test]
async fn a_post_that_failed_before_defender_acted_is_sent_again_after_checking() {
    let app = spawn_in_process().await;
    app.sim.inject(fault(
        "POST",
        "restrictCodeExecution",
        FaultKind::DropConnection,
        1,
    ));
    app.sim
        .inject(fault("POST", "restrictCodeExecution", status(503), 1));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let posts: Vec<u16> = posts(&app).iter().map(|p| p.status).collect();
    assert_eq!(posts, [0, 503, 201]);
    // Each re-send came after a re-read of the machine's actions.
    assert_eq!(
        app.call_kinds(),
        [
            "GET machines",
            "GET machineactions",
            "POST restrictCodeExecution",
            "GET machineactions",
            "POST restrictCodeExecution",
            "GET machineactions",
            "POST restrictCodeExecution"
        ]
    );
    assert_eq!(types(&app, ALPHA), ["RestrictCodeExecution"]);
}

#[tokio::test]
async fn a_post_that_keeps_failing_says_no_action_was_created() {
    let app = spawn_in_process().await;
    app.sim
        .inject(fault("POST", "restrictCodeExecution", status(500), 10));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    let problem = response.json();
    assert_eq!(problem["code"], "defender_error");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("no action was created"),
        "{problem}"
    );
    assert_eq!(
        posts(&app).len(),
        3,
        "at most three POSTs, each after a re-read"
    );
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn a_post_whose_fate_cannot_be_checked_says_an_action_may_exist() {
    let app = app().env("REQUEST_TIMEOUT_SECONDS", "4").in_process().await;
    app.sim.inject(fault(
        "POST",
        "restrictCodeExecution",
        FaultKind::DropAfterHandling,
        1,
    ));
    // The first read (the state check) passes; every re-read fails.
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machineactions".into(),
        kind: FaultKind::Delay { millis: 0 },
        times: 1,
    });
    app.sim
        .inject(fault("GET", "/api/machineactions", status(503), 100));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    let detail = response.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("may or may not have been created"),
        "{detail}"
    );
    assert_eq!(posts(&app).len(), 1, "never re-sent blindly");
}

#[tokio::test]
async fn a_403_is_not_retried() {
    let app = spawn_in_process().await;
    app.sim
        .inject(fault("GET", "/api/machines", status(403), 5));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502);
    assert_eq!(response.json()["code"], "defender_forbidden");
    assert_eq!(app.defender_requests().len(), 1);
}

#[tokio::test]
async fn a_401_refreshes_the_token_once_and_retries() {
    let app = spawn_app().await;
    app.sim
        .inject(fault("GET", "/api/machines", status(401), 1));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(
        app.token_requests().len(),
        2,
        "the rejected token was replaced"
    );
    assert_eq!(history(&app, ALPHA), restrict_pending());
}

#[tokio::test]
async fn a_401_after_refreshing_is_an_authentication_failure() {
    let app = spawn_app().await;
    app.sim
        .inject(fault("GET", "/api/machines", status(401), 5));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 502, "{}", response.body);
    assert_eq!(response.json()["code"], "authentication_failed");
    assert_eq!(
        app.token_requests().len(),
        2,
        "refreshed once, not in a loop"
    );
}

#[tokio::test]
async fn the_rate_budget_answers_an_honest_429_before_defender_would() {
    let app = app()
        // Each invocation reads the machine's actions once.
        .env("DEFENDER_RATE_LIMIT_PER_MINUTE", "2")
        .env("REQUEST_TIMEOUT_SECONDS", "5")
        .in_process()
        .await;

    let first = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    let second = post(&app, json!({"deviceId": CHARLIE_AAD})).await;
    let third = post(&app, json!({"deviceId": crate::restrict::BRAVO_AAD})).await;

    assert_eq!((first.status, second.status), (201, 201));
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(third.json()["code"], "rate_limited");
    let retry_after: u64 = third.header("retry-after").unwrap().parse().unwrap();
    assert!((50..=61).contains(&retry_after), "{retry_after}");
    let state_reads = app
        .defender_requests()
        .iter()
        .filter(|r| r.path == "/api/machineactions")
        .count();
    assert_eq!(
        state_reads, 2,
        "the third invocation's state reads were never sent"
    );
}

#[tokio::test]
async fn a_huge_retry_after_is_passed_on_not_waited_for() {
    let app = spawn_in_process().await;
    app.sim.inject(fault(
        "GET",
        "/api/machines",
        FaultKind::Status {
            status: 429,
            retry_after: Some(u64::MAX),
            body: None,
        },
        1,
    ));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 429, "{}", response.body);
    assert_eq!(
        response.header("retry-after"),
        Some("86400"),
        "capped at a day"
    );
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn a_404_listing_machines_means_the_device_is_not_found() {
    // Defender's docs: the list answers 404 when there are "no recent machines".
    let app = spawn_in_process().await;
    app.sim
        .inject(fault("GET", "/api/machines", status(404), 1));

    let response = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(response.status, 404, "{}", response.body);
    assert_eq!(response.json()["code"], "device_not_found");
}

#[tokio::test]
async fn a_merged_machine_id_is_not_acted_on() {
    let app = spawn_in_process().await;
    let merged = "afa46e97642135c484467090b4f32bc9a5e9b21e";

    let response = post(&app, json!({"deviceId": merged})).await;

    assert_eq!(response.status, 404, "{}", response.body);
    let detail = response.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("39a7550d43b78a7757871f5c146184282381ec3d"),
        "names the surviving record: {detail}"
    );
    assert!(posts(&app).is_empty());
}

#[tokio::test]
async fn device_ids_with_wait_act_on_every_device_before_waiting() {
    // 24 devices, eight at a time, each POST slow: acting takes three rounds.
    // Waiting inside each round would leave the last devices no time at all.
    let app = app().env("REQUEST_TIMEOUT_SECONDS", "6").in_process().await;
    let devices = app.add_fleet(24);
    for i in 0..24 {
        app.sim.set_offline(&format!("{i:040x}"), true);
    }
    app.sim.inject(Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: FaultKind::Delay { millis: 1200 },
        times: 24,
    });

    let response = post(&app, json!({"deviceIds": devices, "wait": 60})).await;

    assert_eq!(response.status, 200, "{}", response.body);
    let answer = response.json();
    assert_eq!(answer["succeeded"], 24);
    assert_eq!(app.sim.actions().len(), 24);
    assert!(
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["terminal"] == false)
    );
}
