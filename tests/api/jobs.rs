//! Containment jobs in local mode: the real handler, its in-process queue
//! delivering to the worker as the host would, the simulated tenant over real
//! HTTP. Assertions are on what Defender received.

use std::time::{Duration, Instant};

use restrict_code_execution::simulator::{RecordedRequest, seed};
use serde_json::{Value, json};

use crate::helpers::{AppOptions, TestApp, spawn_app, spawn_app_with};
use crate::host_emulator::{CallerRequest, ClientResponse, Route};

const JOBS: &str = "/api/restrict-code-execution/jobs";

fn route(function: &'static str, method: &'static str, path: String, job: Option<&str>) -> Route {
    Route {
        function,
        method,
        path,
        params: job.map(|j| ("jobId", j.to_owned())).into_iter().collect(),
    }
}

fn start_route() -> Route {
    route("start-job", "POST", JOBS.to_owned(), None)
}

fn status_route(job: &str) -> Route {
    route("job-status", "GET", format!("{JOBS}/{job}"), Some(job))
}

async fn start(app: &TestApp, body: Value) -> ClientResponse {
    app.host
        .forwarded_to(&start_route(), &CallerRequest::json(body.to_string()))
        .await
}

async fn status(app: &TestApp, job: &str) -> ClientResponse {
    app.host
        .forwarded_to(&status_route(job), &CallerRequest::empty())
        .await
}

/// Poll the job until its status answers 200.
async fn finished(app: &TestApp, job: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let answer = status(app, job).await;
        if answer.status == 200 {
            return answer.json();
        }
        assert_eq!(answer.status, 202, "{}", answer.body);
        assert!(answer.header("retry-after").is_some());
        assert!(Instant::now() < until, "job not finished: {}", answer.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn posts(app: &TestApp) -> Vec<RecordedRequest> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/restrictCodeExecution"))
        .collect()
}

fn machine_of_post(request: &RecordedRequest) -> String {
    request.path.split('/').nth(3).unwrap().to_owned()
}

/// The `$filter` of every machine list Defender received.
fn machine_lists(app: &TestApp) -> Vec<String> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machines")
        .map(|r| r.filter.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn a_job_over_a_tag_restricts_each_chosen_record_once() {
    let app = spawn_app().await;
    let answer = start(
        &app,
        json!({"machineTag": seed::OUTBREAK_TAG, "comment": "INC-1"}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let body = answer.json();
    let job = body["jobId"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "running");
    assert_eq!(
        body["devices"], 3,
        "ALPHA, BRAVO's live record, the Linux server"
    );
    assert!(body["warning"].as_str().unwrap().contains("memory"));
    assert!(
        answer
            .header("location")
            .unwrap()
            .ends_with(&format!("{JOBS}/{job}"))
    );

    let done = finished(&app, &job, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "done");
    assert_eq!(done["counts"]["total"], 3);
    assert_eq!(done["counts"]["requested"], 2);
    assert_eq!(done["counts"]["failed"], 1);
    assert_eq!(done["counts"]["queued"], 0);
    let linux = done["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["machineId"] == seed::LINUX_MACHINE_ID)
        .unwrap();
    assert_eq!(linux["outcome"], "failed");
    assert_eq!(linux["problem"]["code"], "unsupported_device");

    // What Defender received: the tag's list with the documented filter,
    // twice: when the job started, and once more by the worker, which
    // re-checks the message's records with it (merged? still Active?)
    // instead of a GET per machine; one state read for the message's
    // devices together (the type-filtered tenant reads, two calls); one
    // restrict for each chosen Windows record (the Linux server is refused
    // by its osPlatform, without a POST), none for BRAVO's stale or merged
    // records, and the job's comment.
    let lists = machine_lists(&app);
    let tag_lists: Vec<&String> = lists.iter().filter(|q| q.contains("machineTags")).collect();
    assert_eq!(
        tag_lists,
        [
            "machineTags/any(tag: tag eq 'outbreak-42')",
            "machineTags/any(tag: tag eq 'outbreak-42')"
        ],
        "{lists:?}"
    );
    let requests = app.defender_requests();
    let gets: Vec<&str> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/api/machines/"))
        .map(|r| r.path.as_str())
        .collect();
    assert!(gets.is_empty(), "no machine is looked up again: {gets:?}");
    let mut action_reads: Vec<String> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machineactions")
        .map(|r| r.filter.clone().unwrap_or_default())
        .collect();
    action_reads.sort();
    assert_eq!(
        action_reads,
        [
            "type eq 'RestrictCodeExecution'",
            "type eq 'UnrestrictCodeExecution'"
        ],
        "one read of the tenant's two action types serves the message's devices"
    );
    let posts = posts(&app);
    let mut machines: Vec<String> = posts.iter().map(machine_of_post).collect();
    machines.sort();
    let mut expected = vec![
        seed::ALPHA_MACHINE_ID.to_owned(),
        seed::BRAVO_MACHINE_ID.to_owned(),
    ];
    expected.sort();
    assert_eq!(machines, expected);
    // Nothing at all about BRAVO's stale or merged records.
    for stale in [seed::BRAVO_STALE_MACHINE_ID, seed::BRAVO_MERGED_MACHINE_ID] {
        assert!(
            app.defender_requests()
                .iter()
                .all(|r| !r.path.contains(stale)
                    && !r.filter.as_deref().unwrap_or("").contains(stale)),
            "{stale}"
        );
    }
    for post in &posts {
        let body: Value = serde_json::from_str(&post.body).unwrap();
        assert!(
            body["Comment"].as_str().unwrap().starts_with("INC-1"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn bad_selectors_are_400s_naming_the_field_and_nothing_is_sent() {
    let app = spawn_app().await;
    let many: Vec<String> = (0..10_001).map(|i| format!("{i:040x}")).collect();
    for (body, field) in [
        (json!({"release": true}), None),
        (
            json!({"machineTag": "a", "deviceGroupId": 7}),
            Some("deviceGroupId"),
        ),
        (json!({"machineTags": "a"}), Some("machineTags")),
        (json!({"deviceGroupId": "seven"}), Some("deviceGroupId")),
        (json!({"deviceIds": many}), Some("deviceIds")),
        (json!({"machineTag": "a", "relase": true}), Some("relase")),
    ] {
        let answer = start(&app, body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        let problem = answer.json();
        assert_eq!(problem["code"], "invalid_request");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{body}");
        }
    }
    // The same field twice, in two casings.
    let answer = app
        .host
        .forwarded_to(
            &start_route(),
            &CallerRequest::json(r#"{"machineTag":"a","MachineTag":"b"}"#),
        )
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(app.defender_requests().is_empty(), "{:?}", app.call_kinds());
}

#[tokio::test]
async fn a_tag_that_matches_nothing_is_422_and_its_quote_is_escaped() {
    let app = spawn_app().await;
    let answer = start(&app, json!({"machineTag": "O'Brien lab typo"})).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    let problem = answer.json();
    assert_eq!(problem["code"], "no_devices_matched");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("O'Brien lab typo")
    );
    assert_eq!(
        machine_lists(&app),
        ["machineTags/any(tag: tag eq 'O''Brien lab typo')"]
    );
    assert!(posts(&app).is_empty());

    let answer = start(&app, json!({"deviceGroupId": 999})).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.json()["code"], "no_devices_matched");
}

#[tokio::test]
async fn a_device_group_job_and_a_repeated_idempotency_key_start_one_job() {
    let app = spawn_app().await;
    let request = CallerRequest::json(
        json!({"deviceGroupId": seed::WORKSTATIONS_GROUP_ID, "release": true}).to_string(),
    )
    .header("Idempotency-Key", "run-08585");
    let first = app.host.forwarded_to(&start_route(), &request).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let job = first.json()["jobId"].as_str().unwrap().to_owned();
    let again = app.host.forwarded_to(&start_route(), &request).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.json()["jobId"], job.as_str());
    assert_eq!(again.json()["replayed"], true);
    // The same request with its fields in another order and other spacing
    // is the same request.
    let reordered = CallerRequest::json(format!(
        "{{ \"release\" : true, \"deviceGroupId\": {} }}",
        seed::WORKSTATIONS_GROUP_ID
    ))
    .header("Idempotency-Key", "run-08585");
    let third = app.host.forwarded_to(&start_route(), &reordered).await;
    assert_eq!(third.json()["jobId"], job.as_str(), "{}", third.body);

    let done = finished(&app, &job, Duration::from_secs(30)).await;
    assert_eq!(done["release"], true);
    assert_eq!(
        done["selector"]["deviceGroupId"],
        seed::WORKSTATIONS_GROUP_ID
    );
    // The group's list was read twice: by the start, and by the worker
    // re-checking the records; the repeated start resolved nothing.
    let group_lists = machine_lists(&app)
        .into_iter()
        .filter(|q| q.contains("rbacGroupId"))
        .count();
    assert_eq!(group_lists, 2);
    assert!(posts(&app).is_empty(), "a release sends no restrict");
    // The key with another request (a restrict, not a release) is refused
    // by name (after the job is done, so Defender is quiet), and nothing of it reaches Defender.
    let requests_before = app.sim.requests().len();
    let other = CallerRequest::json(
        json!({"deviceGroupId": seed::WORKSTATIONS_GROUP_ID, "release": false}).to_string(),
    )
    .header("Idempotency-Key", "run-08585");
    let reused = app.host.forwarded_to(&start_route(), &other).await;
    assert_eq!(reused.status, 422, "{}", reused.body);
    assert_eq!(reused.json()["code"], "idempotency_key_reused");
    assert!(
        reused.json()["detail"]
            .as_str()
            .unwrap()
            .contains("run-08585")
    );
    assert_eq!(
        app.sim.requests().len(),
        requests_before,
        "{:?}",
        app.sim.requests()
    );

    let listed = app
        .host
        .forwarded_to(
            &route("list-jobs", "GET", JOBS.to_owned(), None),
            &CallerRequest::empty(),
        )
        .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_and_malformed_job_ids() {
    let app = spawn_app().await;
    let answer = status(&app, "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9").await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.json()["code"], "job_not_found");
    let answer = status(&app, "not-a-job").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.json()["field"], "jobId");
}

/// A fleet under one tag, with the handler's restrict budget at `per_hour`
/// an hour and its clock `speed` times faster, and a short invocation.
async fn slow_app(
    devices: usize,
    per_minute: u32,
    per_hour: u32,
    speed: u32,
) -> (TestApp, Vec<String>) {
    slow_app_timing(devices, per_minute, per_hour, speed, 6).await
}

/// [`slow_app`] with invocations of `timeout_s` seconds.
async fn slow_app_timing(
    devices: usize,
    per_minute: u32,
    per_hour: u32,
    speed: u32,
    timeout_s: u32,
) -> (TestApp, Vec<String>) {
    let options = AppOptions {
        env: vec![
            ("DEFENDER_RATE_LIMIT_PER_MINUTE", per_minute.to_string()),
            ("DEFENDER_RATE_LIMIT_PER_HOUR", per_hour.to_string()),
            ("DEFENDER_RATE_CLOCK_SPEED", speed.to_string()),
            ("REQUEST_TIMEOUT_SECONDS", timeout_s.to_string()),
        ],
        ..AppOptions::default()
    };
    let app = spawn_app_with(options).await;
    let fleet = seed::Fleet::new("jobs", "wave", devices);
    app.sim.add_fleet(&fleet);
    let ids = fleet.devices().into_iter().map(|d| d.machine_id).collect();
    (app, ids)
}

/// The jobs' share of the hour (nine tenths of three restricts: two) is
/// spent after two restricts: the other devices wait in a delayed message for
/// the hour's next slots (no failure, no poison), then finish, each
/// restricted once.
#[tokio::test]
async fn devices_past_the_hourly_budget_wait_for_it_instead_of_failing() {
    // An hour of 10 s; an invocation of 6 s cannot wait for it.
    let (app, machines) = slow_app(4, 100, 3, 360).await;
    let answer = start(&app, json!({"machineTag": "wave"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job = answer.json()["jobId"].as_str().unwrap().to_owned();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let midway = status(&app, &job).await;
    assert_eq!(midway.status, 202, "{}", midway.body);
    let counts = &midway.json()["counts"];
    assert_eq!(counts["requested"], 2, "{counts}");
    assert_eq!(counts["queued"], 2, "{counts}");
    assert_eq!(counts["failed"], 0, "{counts}");
    let deferred = app
        .log_events("no budget slot within this invocation; the devices wait in a delayed message")
        .await;
    assert!(!deferred.is_empty());

    let done = finished(&app, &job, Duration::from_secs(40)).await;
    assert_eq!(done["counts"]["requested"], 4, "{}", done["counts"]);
    let mut sent: Vec<String> = posts(&app).iter().map(machine_of_post).collect();
    sent.sort();
    let mut expected = machines.clone();
    expected.sort();
    assert_eq!(sent, expected, "each device restricted exactly once");
    assert!(
        app.log_events("message failed on its last delivery; moved to the poison queue")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn cancel_skips_the_devices_not_sent_and_counts_the_actions_created() {
    // Six restricts a minute, a minute of 10 s: the job takes a while.
    let (app, _) = slow_app(30, 6, 1500, 6).await;
    let answer = start(&app, json!({"machineTag": "wave"})).await;
    let job = answer.json()["jobId"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cancel = app
        .host
        .forwarded_to(
            &route(
                "cancel-job",
                "POST",
                format!("{JOBS}/{job}/cancel"),
                Some(&job),
            ),
            &CallerRequest::empty(),
        )
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    let body = cancel.json();
    assert_eq!(body["status"], "cancelled");
    assert!(
        body["counts"]["skipped"].as_u64().unwrap() > 0,
        "{}",
        body["counts"]
    );
    assert!(
        body["warning"]
            .as_str()
            .unwrap()
            .contains("already created stand")
    );

    // A device being acted on may still finish; after that nothing is sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = posts(&app).len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        posts(&app).len(),
        settled,
        "no restrict after the cancel settled"
    );
    let after = status(&app, &job).await;
    assert_eq!(after.status, 200);
    let counts = &after.json()["counts"];
    assert_eq!(
        counts["requested"].as_u64().unwrap() + counts["skipped"].as_u64().unwrap(),
        30,
        "{counts}"
    );
    assert_eq!(counts["requested"].as_u64().unwrap() as usize, settled);
}

#[tokio::test]
async fn a_job_answers_in_payload_mode_too() {
    let app = spawn_app().await;
    let answer = app
        .host
        .payload_to(
            &start_route(),
            &CallerRequest::json(json!({"deviceIds": [seed::ALPHA_AAD_DEVICE_ID]}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job = answer.json()["jobId"].as_str().unwrap().to_owned();
    let done = finished(&app, &job, Duration::from_secs(30)).await;
    assert_eq!(done["devices"][0]["deviceId"], seed::ALPHA_AAD_DEVICE_ID);
    assert_eq!(done["devices"][0]["outcome"], "requested");
}

/// While a job waits for its budget, a single restrict still gets its
/// lookup, read and POST at once: the job's devices never queue ahead of it
/// more than a few at a time, so it does not wait for the job.
#[tokio::test]
async fn a_single_restrict_during_a_job_is_served_before_the_job_is_done() {
    // Six calls a minute per API, a minute of 10 s: 30 devices take about
    // 50 s. Invocations of 30 s, so a request can wait a window or two.
    let (app, _) = slow_app_timing(30, 6, 1500, 6, 30).await;
    let answer = start(&app, json!({"machineTag": "wave"})).await;
    let job = answer.json()["jobId"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let asked = Instant::now();
    let single = app
        .restrict(&json!({"deviceId": seed::ALPHA_AAD_DEVICE_ID}))
        .await;
    let took = asked.elapsed();
    assert_eq!(single.status, 201, "{}", single.body);
    let midway = status(&app, &job).await;
    assert_eq!(midway.status, 202, "the job is still running");
    let queued = midway.json()["counts"]["queued"].as_u64().unwrap();
    assert!(
        queued >= 10,
        "served long before the job's end: {queued} devices still queued"
    );
    // At most the few job devices already waiting were served first: within
    // two of the budget's minute windows (10 s each here), not the job's 50 s.
    assert!(took < Duration::from_secs(20), "{took:?}");
    let alpha_posts = posts(&app)
        .iter()
        .filter(|p| machine_of_post(p) == seed::ALPHA_MACHINE_ID)
        .count();
    assert_eq!(alpha_posts, 1);
}

/// Ten thousand ids (about half a MiB) fit the forwarded body limit and the
/// host's payload-mode envelope; nothing is asked of Defender to start.
#[tokio::test]
async fn ten_thousand_ids_start_a_job_in_both_modes() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..10_000).map(|i| format!("{:040x}", i + 1)).collect();
    let body = json!({"deviceIds": ids, "comment": "mass"}).to_string();
    for payload in [false, true] {
        let request = CallerRequest::json(body.clone());
        let answer = if payload {
            app.host.payload_to(&start_route(), &request).await
        } else {
            app.host.forwarded_to(&start_route(), &request).await
        };
        assert_eq!(
            answer.status, 202,
            "payload mode {payload}: {}",
            answer.body
        );
        assert_eq!(answer.json()["devices"], 10_000);
    }
    // The worker looks the ids up as single requests would (one by one,
    // or the tenant's list when the budget is tight); nothing filters by a
    // selector, since listed ids are not resolved when the job starts.
    assert!(
        machine_lists(&app).iter().all(String::is_empty),
        "listed ids are not resolved when the job starts"
    );
}
