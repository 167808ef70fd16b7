//! Defender corners the simulator models on request: a duplicate POST
//! answered with the pending action, a cancel that takes effect late (or
//! loses the race), stuck duplicates, and the fidelity of actions, tokens,
//! roles and lookups. Each test asserts what Defender
//! received, not only what the service answered.

use std::time::Duration;

use restrict_code_execution::simulator::{
    ActionFields, ActionOutcome, DuplicateBehaviour, Fault, FaultKind, NoMatch, RecordedRequest,
    SimConfig,
};
use serde_json::{Value, json};

use crate::helpers::{TOKEN, TestApp, app, post, posts};
use crate::host_emulator::{CallerRequest, Route};
use crate::restrict::ALPHA_AAD;

const ALPHA: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";

/// The actions Defender holds for ALPHA, oldest first, as (type, status).
fn history(app: &TestApp) -> Vec<(String, String)> {
    let mut actions: Vec<(String, String)> = app
        .sim
        .actions()
        .into_iter()
        .filter(|a| a.machine_id.as_deref() == Some(ALPHA))
        .map(|a| (a.action_type.to_string(), a.status.to_string()))
        .collect();
    actions.reverse();
    actions
}

/// Another caller (a second app instance, the portal) creates an action
/// straight on Defender.
async fn restrict_directly(app: &TestApp) -> String {
    let created: Value = reqwest::Client::new()
        .post(format!(
            "{}/api/machines/{ALPHA}/restrictCodeExecution",
            app.sim.url()
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"Comment": "another caller"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

fn reads_of_actions(app: &TestApp) -> usize {
    app.defender_requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machineactions")
        .count()
}

// --- Point 1: a duplicate POST answered with the existing action ------------

#[tokio::test]
async fn a_201_with_an_action_created_before_the_post_is_already_pending() {
    let app = app()
        .sim(|s| {
            s.duplicate = DuplicateBehaviour::ReturnPending;
            s.pending_for = Duration::from_secs(600);
        })
        .in_process()
        .await;
    // The state read is answered late: the action another caller creates
    // meanwhile is not in it, so the service POSTs, and Defender answers 201
    // with that action.
    app.sim.inject(
        Fault::new(
            "/api/machineactions",
            FaultKind::DelayAfterHandling { millis: 3500 },
        )
        .method("GET"),
    );
    let (answer, other) = tokio::join!(post(&app, json!({"deviceId": ALPHA_AAD})), async {
        // The state read follows the machine lookup at once; create the
        // other action just after Defender handled that read.
        while !app
            .defender_requests()
            .iter()
            .any(|r| r.path == "/api/machines")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        restrict_directly(&app).await
    });

    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["outcome"], "already_pending");
    assert_eq!(body["action"]["id"], other.as_str());
    let posts = posts(&app);
    assert_eq!(posts.len(), 2, "the other caller's and ours: {posts:#?}");
    assert!(
        posts
            .iter()
            .all(|p| p.path == format!("/api/machines/{ALPHA}/restrictCodeExecution")),
        "{posts:#?}"
    );
    assert_eq!(
        history(&app),
        vec![("RestrictCodeExecution".into(), "Pending".into())],
        "Defender holds one action"
    );
}

#[tokio::test]
async fn a_201_with_an_action_the_state_read_held_is_already_pending() {
    let app = app()
        .sim(|s| {
            s.duplicate = DuplicateBehaviour::ReturnPending;
            s.pending_for = Duration::from_secs(600);
        })
        .in_process()
        .await;
    let existing = restrict_directly(&app).await;
    // The read lists that action as Succeeded (a stale or inconsistent
    // listing), so with `force` the service POSTs; Defender answers 201 with
    // the same, still pending, action, created well within the clock-skew
    // allowance: only its id tells it is not new.
    let mut listed = serde_json::to_value(&app.sim.actions()[0]).unwrap();
    listed["status"] = json!("Succeeded");
    app.sim.inject(
        Fault::new(
            "/api/machineactions",
            FaultKind::Status {
                status: 200,
                retry_after: None,
                body: Some(json!({"value": [listed]})),
            },
        )
        .method("GET"),
    );

    let answer = post(&app, json!({"deviceId": ALPHA_AAD, "force": true})).await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["outcome"], "already_pending");
    assert_eq!(body["action"]["id"], existing.as_str());
    assert_eq!(body["action"]["status"], "Pending");
    assert_eq!(posts(&app).len(), 2, "the other caller's and ours");
    assert_eq!(
        history(&app),
        vec![("RestrictCodeExecution".into(), "Pending".into())]
    );
}

#[tokio::test]
async fn a_201_with_a_new_action_is_still_requested_with_return_pending() {
    let app = app()
        .sim(|s| s.duplicate = DuplicateBehaviour::ReturnPending)
        .in_process()
        .await;
    let answer = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.json()["outcome"], "requested");
    assert_eq!(posts(&app).len(), 1);
}

// --- Point 2: a cancel that is not instant ----------------------------------

#[tokio::test]
async fn cancel_pending_waits_until_the_cancel_took_effect_then_acts() {
    let app = app()
        .sim(|s| {
            s.pending_for = Duration::from_secs(600);
            s.cancel_takes = Duration::from_secs(3);
        })
        .in_process()
        .await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    let restrict_id = restrict["action"]["id"].as_str().unwrap().to_owned();
    let reads_before = reads_of_actions(&app);

    let release = post(
        &app,
        json!({"deviceId": ALPHA_AAD, "release": true, "cancelPending": true}),
    )
    .await;

    assert_eq!(release.status, 201, "{}", release.body);
    let body = release.json();
    assert_eq!(body["outcome"], "requested");
    assert_eq!(body["cancelledActionIds"], json!([restrict_id]));
    let posts = posts(&app);
    let paths: Vec<&str> = posts.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            format!("/api/machines/{ALPHA}/restrictCodeExecution").as_str(),
            format!("/api/machineactions/{restrict_id}/cancel").as_str(),
            format!("/api/machines/{ALPHA}/unrestrictCodeExecution").as_str(),
        ]
    );
    // One read to decide, then reads until the cancel showed: at 0 s and
    // 2 s still pending, at 5 s cancelled.
    let reads = reads_of_actions(&app) - reads_before;
    assert!((3..=5).contains(&reads), "{reads} reads");
    assert_eq!(
        history(&app),
        vec![
            ("RestrictCodeExecution".into(), "Cancelled".into()),
            ("UnrestrictCodeExecution".into(), "Pending".into()),
        ]
    );
}

#[tokio::test]
async fn a_cancel_not_final_in_time_is_a_409_naming_the_action() {
    let app = app()
        .sim(|s| {
            s.pending_for = Duration::from_secs(600);
            s.cancel_takes = Duration::from_secs(3600);
        })
        .env("REQUEST_TIMEOUT_SECONDS", "8")
        .in_process()
        .await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    let restrict_id = restrict["action"]["id"].as_str().unwrap().to_owned();
    let reads_before = reads_of_actions(&app);

    let release = post(
        &app,
        json!({"deviceId": ALPHA_AAD, "release": true, "cancelPending": true}),
    )
    .await;

    assert_eq!(release.status, 409, "{}", release.body);
    let problem = release.json();
    assert_eq!(problem["code"], "conflicting_action_pending");
    assert_eq!(problem["actionId"], restrict_id.as_str());
    assert_eq!(problem["actionStatus"], "Pending");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(&restrict_id), "{problem}");
    assert!(detail.contains("was cancelled"), "{problem}");
    let paths: Vec<String> = posts(&app).into_iter().map(|p| p.path).collect();
    assert_eq!(
        paths,
        vec![
            format!("/api/machines/{ALPHA}/restrictCodeExecution"),
            format!("/api/machineactions/{restrict_id}/cancel"),
        ],
        "no unrestrict was sent"
    );
    // One read to decide, then paced reads (0 s, 2 s, 5 s) within an 8 s
    // budget: several, but not a busy loop.
    let reads = reads_of_actions(&app) - reads_before;
    assert!((3..=5).contains(&reads), "{reads} reads");
}

#[tokio::test]
async fn a_cancel_that_loses_the_race_leaves_the_restrict_finished_before_the_release() {
    let app = app()
        .sim(|s| {
            s.pending_for = Duration::from_secs(1);
            s.in_progress_for = Duration::from_secs(2);
            s.cancel_takes = Duration::from_secs(30);
        })
        .in_process()
        .await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    let restrict_id = restrict["action"]["id"].as_str().unwrap().to_owned();

    let release = post(
        &app,
        json!({"deviceId": ALPHA_AAD, "release": true, "cancelPending": true}),
    )
    .await;

    assert_eq!(release.status, 201, "{}", release.body);
    let paths: Vec<String> = posts(&app).into_iter().map(|p| p.path).collect();
    assert_eq!(
        paths[1],
        format!("/api/machineactions/{restrict_id}/cancel")
    );
    assert_eq!(
        paths[2],
        format!("/api/machines/{ALPHA}/unrestrictCodeExecution")
    );
    // The release was sent only after the restrict had finished: it cannot
    // finish after it.
    assert_eq!(
        history(&app),
        vec![
            ("RestrictCodeExecution".into(), "Succeeded".into()),
            ("UnrestrictCodeExecution".into(), "Pending".into()),
        ]
    );
}

#[tokio::test]
async fn the_cancel_function_reports_the_status_defender_reports() {
    let app = app()
        .sim(|s| {
            s.pending_for = Duration::from_secs(600);
            s.cancel_takes = Duration::from_secs(5);
        })
        .in_process()
        .await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    let id = restrict["action"]["id"].as_str().unwrap().to_owned();

    let cancel = app
        .host
        .forwarded_to(&Route::cancel(&id), &CallerRequest::empty())
        .await;

    assert_eq!(cancel.status, 200, "{}", cancel.body);
    let body = cancel.json();
    assert_eq!(body["status"], "Pending");
    assert_eq!(body["terminal"], false);
    let cancels: Vec<RecordedRequest> = posts(&app)
        .into_iter()
        .filter(|p| p.path.ends_with("/cancel"))
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].path, format!("/api/machineactions/{id}/cancel"));

    app.sim.advance(Duration::from_secs(6));
    let status = app
        .host
        .forwarded_to(&Route::status(&id), &CallerRequest::empty())
        .await
        .json();
    assert_eq!(status["status"], "Cancelled");
    assert_eq!(status["terminal"], true);
}

// --- Point 3: stuck duplicates ----------------------------------------------

#[tokio::test]
async fn force_warns_that_a_repeated_action_can_finish_out_of_order() {
    let app = app().in_process().await;
    let first = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert!(first.json().get("warning").is_none(), "{}", first.body);
    app.sim.advance(Duration::from_secs(60));

    let forced = post(&app, json!({"deviceId": ALPHA_AAD, "force": true})).await;

    assert_eq!(forced.status, 201, "{}", forced.body);
    let warning = forced.json()["warning"].as_str().unwrap().to_owned();
    assert!(warning.contains("microsoft-365-docs#5903"), "{warning}");
    assert!(warning.contains("opposite"), "{warning}");
    assert_eq!(posts(&app).len(), 2);
}

#[tokio::test]
async fn an_old_pending_action_is_reported_as_possibly_stuck() {
    // Defender's clock 30 h behind: the action another caller creates now
    // has been pending for 30 h as far as the service can tell.
    let stale = |s: &mut SimConfig| {
        s.clock_behind = Duration::from_secs(30 * 3600);
        s.pending_for = Duration::from_secs(3600);
    };
    let app = app().sim(stale).in_process().await;
    let stuck = restrict_directly(&app).await;

    let answer = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["outcome"], "already_pending");
    let warning = body["warning"].as_str().unwrap();
    assert!(warning.contains("may be stuck"), "{warning}");
    assert!(
        warning.contains(&format!(
            "POST /api/restrict-code-execution/actions/{stuck}/cancel"
        )),
        "{warning}"
    );
    assert_eq!(posts(&app).len(), 1, "only the other caller's POST");

    // Under the configured threshold: no warning.
    let patient = crate::helpers::app()
        .sim(stale)
        .env("STALE_PENDING_HOURS", "48")
        .in_process()
        .await;
    restrict_directly(&patient).await;
    let answer = post(&patient, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(answer.json()["outcome"], "already_pending");
    assert!(answer.json().get("warning").is_none(), "{}", answer.body);
}

// --- Point 5: simulator fidelity, through the service -----------------------

#[tokio::test]
async fn actions_carry_name_and_last_update_from_creation_or_only_once_picked_up() {
    for (fields, named) in [
        (ActionFields::FromCreation, true),
        (ActionFields::WhenPickedUp, false),
    ] {
        let app = app().sim(|s| s.action_fields = fields).in_process().await;
        let created = post(&app, json!({"deviceId": ALPHA_AAD})).await;
        assert_eq!(created.status, 201, "{}", created.body);
        let action = &created.json()["action"];
        assert_eq!(action["status"], "Pending");
        assert_eq!(action["computerDnsName"].is_string(), named, "{action}");
        assert_eq!(
            action["lastUpdateDateTimeUtc"].is_string(),
            named,
            "{action}"
        );

        // Either way the service reads the state right once it finished.
        app.sim.advance(Duration::from_secs(60));
        let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;
        assert_eq!(again.json()["outcome"], "already_in_state", "{fields:?}");
        assert_eq!(posts(&app).len(), 1, "{fields:?}");
    }
}

#[tokio::test]
async fn a_failed_action_does_not_count_as_restricted() {
    let app = app().in_process().await;
    app.sim.set_outcome(ALPHA, ActionOutcome::Failed);
    let first = post(&app, json!({"deviceId": ALPHA_AAD, "wait": 30})).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.json()["action"]["status"], "Failed");
    assert_eq!(first.json()["terminal"], true);

    app.sim.set_outcome(ALPHA, ActionOutcome::Succeeded);
    let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.json()["outcome"], "requested");
    assert_eq!(posts(&app).len(), 2, "the failed restrict is sent again");
}

#[tokio::test]
async fn a_token_for_another_api_is_refused_and_nothing_is_sent() {
    // The binary: the scope reaches the managed identity endpoint.
    let app = app()
        .env(
            "DEFENDER_TOKEN_SCOPE",
            "https://graph.microsoft.com/.default",
        )
        .binary()
        .await;

    let answer = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.json()["code"], "authentication_failed");
    let tokens = app.token_requests();
    assert!(!tokens.is_empty());
    assert!(
        tokens.iter().all(|t| t
            .query
            .as_deref()
            .is_some_and(|q| q.contains("resource=https%3A%2F%2Fgraph.microsoft.com"))),
        "{tokens:#?}"
    );
    let calls = app.defender_requests();
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|c| c.status == 401), "{calls:#?}");
    assert!(posts(&app).is_empty());
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn without_the_restrict_role_the_post_is_forbidden_with_defenders_message() {
    let app = app()
        .sim(|s| s.roles = vec!["Machine.Read.All".to_owned()])
        .in_process()
        .await;

    let answer = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(answer.status, 502, "{}", answer.body);
    let problem = answer.json();
    assert_eq!(problem["code"], "defender_forbidden");
    assert!(
        problem["detail"].as_str().unwrap().contains(
            "Missing application roles. API required roles: Machine.RestrictExecution, \
             application roles: Machine.Read.All"
        ),
        "{problem}"
    );
    let posts = posts(&app);
    assert_eq!(posts.len(), 1, "{posts:#?}");
    assert_eq!(
        posts[0].path,
        format!("/api/machines/{ALPHA}/restrictCodeExecution")
    );
    assert_eq!(posts[0].status, 403);
    assert!(app.sim.actions().is_empty());
}

#[tokio::test]
async fn without_a_response_role_the_cancel_is_forbidden() {
    let app = app().in_process().await;
    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await.json();
    let id = restrict["action"]["id"].as_str().unwrap().to_owned();
    app.sim.set_roles(&["Machine.Read.All"]);

    let cancel = app
        .host
        .forwarded_to(&Route::cancel(&id), &CallerRequest::empty())
        .await;

    assert_eq!(cancel.status, 502, "{}", cancel.body);
    let problem = cancel.json();
    assert_eq!(problem["code"], "defender_forbidden");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Missing application roles. API required roles: Machine.CollectForensic,"),
        "{problem}"
    );
    let cancels: Vec<RecordedRequest> = posts(&app)
        .into_iter()
        .filter(|p| p.path.ends_with("/cancel"))
        .collect();
    assert_eq!(cancels.len(), 1, "{cancels:#?}");
    assert_eq!(cancels[0].status, 403);
    assert_eq!(
        history(&app),
        vec![("RestrictCodeExecution".into(), "Pending".into())]
    );
}

#[tokio::test]
async fn a_tenant_answering_404_for_no_match_gives_device_not_found() {
    let app = app()
        .sim(|s| s.no_match = NoMatch::NotFound)
        .in_process()
        .await;
    let unknown = "0e0e0e0e-1111-4222-8333-444444444444";

    let answer = post(&app, json!({"deviceId": unknown})).await;

    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.json()["code"], "device_not_found");
    let calls = app.defender_requests();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].path, "/api/machines");
    assert_eq!(
        calls[0].filter.as_deref(),
        Some(format!("aadDeviceId eq {unknown}").as_str())
    );
    assert_eq!(calls[0].status, 404);

    // A device that exists is still found and restricted.
    let known = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(known.status, 201, "{}", known.body);
    assert_eq!(posts(&app).len(), 1);
}
