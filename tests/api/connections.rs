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
