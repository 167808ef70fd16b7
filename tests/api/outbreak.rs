//! Outbreak speed: shared machine lookups, batched state reads
//! that are never older than the invocation, only documented OData, and a
//! budget that holds in bursts. Each test asserts what Defender received.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::future::join_all;
use restrict_code_execution::{
    defender::{
        DefenderClient, DefenderClientOptions, DefenderError, Endpoint,
        auth::TokenSource,
        budget::RateBudget,
        ids::MachineId,
        models::{ActionType, Machine},
    },
    service::{machine_directory::MachineDirectory, runbook::DeviceRef, state_reads::StateReads},
    simulator::{
        Fault, FaultKind, ListOrder, OrderBy, RecordedRequest, SimConfig, SimHandle, Simulator,
    },
};
use serde_json::json;
use tokio::time::Instant;
use url::Url;

use crate::helpers::{AppOptions, TOKEN, TestApp, post, spawn_app_with, spawn_in_process_with};
use crate::restrict::{ALPHA_AAD, BRAVO_AAD, CHARLIE_AAD};

const ALPHA: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";

fn requests_to(app: &TestApp, method: &str, path_end: &str) -> Vec<RecordedRequest> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == method && r.path.ends_with(path_end))
        .collect()
}

async fn simulator(config: SimConfig) -> SimHandle {
    Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("simulator starts")
}

fn client_for(sim: &SimHandle) -> DefenderClient {
    client_with_budget(sim, 100)
}

/// A client whose budget allows `per_minute` calls a minute per endpoint.
fn client_with_budget(sim: &SimHandle, per_minute: u32) -> DefenderClient {
    client_on(sim, RateBudget::new(per_minute, 1500))
}

/// A client drawing from `budget`.
fn client_on(sim: &SimHandle, budget: RateBudget) -> DefenderClient {
    DefenderClient::new(
        Url::parse(&sim.url()).unwrap(),
        TokenSource::fixed(TOKEN, Duration::from_secs(5)),
        Some(DefenderClientOptions {
            timeout: Duration::from_secs(10),
            budget: Arc::new(budget),
            ..DefenderClientOptions::default()
        }),
    )
}

fn list_reads(sim: &SimHandle) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machineactions")
        .collect()
}

// --- The batching rule ------------------------------------------------------

#[tokio::test]
async fn a_read_already_in_flight_is_never_used() {
    let sim = simulator(AppOptions::default().sim).await;
    let client = client_for(&sim);
    let reads = StateReads::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    // The first read's answer is the state at its arrival, delivered late.
    sim.inject(
        Fault::new(
            "/api/machineactions",
            FaultKind::DelayAfterHandling { millis: 1500 },
        )
        .method("GET"),
    );

    let first = tokio::spawn({
        let reads = reads.clone();
        async move { reads.read(&ALPHA.into(), deadline).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An action appears while that read is in flight (as if the invocation
    // that held the machine before had just created it).
    let created = client
        .create_action(ALPHA, ActionType::RestrictCodeExecution, "test", deadline)
        .await
        .unwrap();
    let second = reads.read(&ALPHA.into(), deadline).await.unwrap();
    let first = first.await.unwrap().unwrap();

    assert!(
        first.iter().all(|a| a.id != created.action.id),
        "the first read answered the state before the action existed"
    );
    assert!(
        second.iter().any(|a| a.id == created.action.id),
        "the later waiter did not take the in-flight read's stale answer"
    );
    let lists = list_reads(&sim);
    assert_eq!(lists.len(), 2, "{lists:#?}");
    for read in &lists {
        assert_eq!(
            read.filter.as_deref(),
            Some(format!("machineId eq '{ALPHA}'").as_str())
        );
    }
}

#[tokio::test]
async fn waiters_queued_behind_a_read_share_one_tenant_read() {
    let sim = simulator(SimConfig {
        seed: false,
        ..AppOptions::default().sim
    })
    .await;
    let client = client_for(&sim);
    let machines: Vec<MachineId> = (0..6)
        .map(|i| {
            let machine: Machine = serde_json::from_value(json!({
                "id": format!("{i:040x}"),
                "healthStatus": "Active",
                "osPlatform": "Windows11",
            }))
            .unwrap();
            sim.add_machine(machine.clone());
            machine.id
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for machine in &machines[1..] {
        client
            .create_action(machine, ActionType::RestrictCodeExecution, "seed", deadline)
            .await
            .unwrap();
    }
    sim.clear_requests();
    // A tight budget: after the first read, two calls are left this minute,
    // fewer than the waiting machines, so one tenant read serves them all.
    let reads = StateReads::new(client_with_budget(&sim, 3));
    sim.inject(Fault::new("/api/machineactions", FaultKind::Delay { millis: 800 }).method("GET"));

    let first = tokio::spawn({
        let (reads, machine) = (reads.clone(), machines[0].clone());
        async move { reads.read(&machine, deadline).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rest = join_all(machines[1..].iter().map(|m| reads.read(m, deadline))).await;
    first.await.unwrap().unwrap();

    for (machine, actions) in machines[1..].iter().zip(rest) {
        let actions = actions.unwrap();
        assert_eq!(actions.len(), 1, "each waiter got its own machine's action");
        assert_eq!(actions[0].machine_id.as_deref(), Some(machine.as_str()));
    }
    let lists = list_reads(&sim);
    let mut filters: Vec<String> = lists.iter().filter_map(|r| r.filter.clone()).collect();
    assert_eq!(
        filters.len(),
        3,
        "one read for the first, one tenant read for the rest"
    );
    assert_eq!(filters[0], format!("machineId eq '{}'", machines[0]));
    filters[1..].sort();
    assert_eq!(
        filters[1..],
        [
            "type eq 'RestrictCodeExecution'".to_owned(),
            "type eq 'UnrestrictCodeExecution'".to_owned()
        ]
    );
    for read in &lists {
        let query = read.query.as_deref().unwrap_or_default();
        assert!(!query.contains("orderby"), "{query}");
        assert!(query.contains("$top=10000"), "{query}");
    }
}

#[tokio::test]
async fn with_no_slot_free_two_waiting_machines_share_a_tenant_read_that_later_waiters_join() {
    // Reading two machines one by one costs as many calls as the tenant read
    // (two type filters). With no slot free, the tenant read is the one to
    // make: it waits for its slot with the batch still open, so the waiters
    // arriving meanwhile are answered by it too, instead of waiting for a
    // read of their own after it.
    let sim = simulator(SimConfig {
        seed: false,
        ..AppOptions::default().sim
    })
    .await;
    let machines: Vec<MachineId> = (0..6)
        .map(|i| {
            let machine: Machine = serde_json::from_value(json!({
                "id": format!("{:040x}", i + 200),
                "healthStatus": "Active",
                "osPlatform": "Windows11",
            }))
            .unwrap();
            sim.add_machine(machine.clone());
            machine.id
        })
        .collect();
    // One call per (sped-up, two-second) minute: after the first read, no
    // slot is free until the next window.
    let client = DefenderClient::new(
        Url::parse(&sim.url()).unwrap(),
        TokenSource::fixed(TOKEN, Duration::from_secs(5)),
        Some(DefenderClientOptions {
            timeout: Duration::from_secs(10),
            budget: Arc::new(RateBudget::new(1, 1500).with_clock_speed(30.0)),
            ..DefenderClientOptions::default()
        }),
    );
    let reads = StateReads::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    sim.inject(Fault::new("/api/machineactions", FaultKind::Delay { millis: 100 }).method("GET"));

    let read = |machine: &MachineId| {
        let (reads, machine) = (reads.clone(), machine.clone());
        tokio::spawn(async move { reads.read(&machine, deadline).await })
    };
    let first = read(&machines[0]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Two machines wait behind the first read; three more arrive once it is
    // done, while the next read waits for its slot.
    let pair: Vec<_> = machines[1..3].iter().map(read).collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later: Vec<_> = machines[3..].iter().map(read).collect();
    first.await.unwrap().unwrap();
    for waiter in pair.into_iter().chain(later) {
        waiter.await.unwrap().unwrap();
    }

    let filters: Vec<String> = list_reads(&sim)
        .iter()
        .filter_map(|r| r.filter.clone())
        .collect();
    assert_eq!(
        filters.len(),
        3,
        "one read for the first machine, one tenant read for the other five: {filters:#?}"
    );
    assert_eq!(filters[0], format!("machineId eq '{}'", machines[0]));
}

#[tokio::test]
async fn with_slots_free_each_waiting_machine_is_read_by_itself() {
    let sim = simulator(AppOptions::default().sim).await;
    let reads = StateReads::new(client_for(&sim));
    let machines: Vec<MachineId> = sim.machines().into_iter().take(4).map(|m| m.id).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    sim.inject(Fault::new("/api/machineactions", FaultKind::Delay { millis: 500 }).method("GET"));

    let first = tokio::spawn({
        let (reads, machine) = (reads.clone(), machines[0].clone());
        async move { reads.read(&machine, deadline).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    for result in join_all(machines[1..].iter().map(|m| reads.read(m, deadline))).await {
        result.unwrap();
    }
    first.await.unwrap().unwrap();

    let mut filters: Vec<String> = list_reads(&sim)
        .iter()
        .filter_map(|r| r.filter.clone())
        .collect();
    let mut expected: Vec<String> = machines
        .iter()
        .map(|m| format!("machineId eq '{m}'"))
        .collect();
    filters.sort();
    expected.sort();
    assert_eq!(filters, expected, "small reads while the budget has room");
}

#[tokio::test]
async fn a_failed_shared_read_fails_every_waiter_alike_and_nothing_is_sent() {
    let app = spawn_in_process_with(AppOptions::default()).await;
    let devices = app.add_fleet(6);
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machineactions".into(),
        kind: FaultKind::Status {
            status: 400,
            retry_after: None,
            body: None,
        },
        times: 100,
    });

    let answers = join_all(
        devices
            .iter()
            .map(|device| post(&app, json!({"deviceId": device}))),
    )
    .await;

    let codes: Vec<String> = answers
        .iter()
        .map(|a| a.json()["code"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        answers
            .iter()
            .all(|a| a.status == answers[0].status && a.status >= 400),
        "{codes:?}"
    );
    assert!(
        codes.iter().all(|c| c == &codes[0] && !c.is_empty()),
        "{codes:?}"
    );
    assert!(requests_to(&app, "POST", "CodeExecution").is_empty());
}

#[tokio::test]
async fn a_waiter_whose_deadline_passes_gets_504_not_a_hang() {
    let app = spawn_in_process_with(AppOptions {
        env: vec![("REQUEST_TIMEOUT_SECONDS", "2".into())],
        ..AppOptions::default()
    })
    .await;
    app.sim.inject(Fault {
        method: Some("GET".into()),
        path_contains: "/api/machineactions".into(),
        kind: FaultKind::Delay { millis: 30_000 },
        times: 10,
    });

    let started = std::time::Instant::now();
    let answers = join_all(
        [ALPHA_AAD, BRAVO_AAD, CHARLIE_AAD].map(|device| post(&app, json!({"deviceId": device}))),
    )
    .await;

    for answer in &answers {
        assert_eq!(answer.status, 504, "{}", answer.body);
        assert_eq!(answer.json()["code"], "defender_timeout");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at the deadline"
    );
    assert!(requests_to(&app, "POST", "CodeExecution").is_empty());
}

// --- Machine lookups ---------------------------------------------------------

#[tokio::test]
async fn a_remembered_machine_is_looked_up_again_when_a_post_answers_404() {
    let app = spawn_in_process_with(AppOptions::default()).await;

    let restrict = post(&app, json!({"deviceId": ALPHA_AAD})).await;
    assert_eq!(restrict.status, 201, "{}", restrict.body);
    app.sim.advance(Duration::from_secs(60));
    app.sim.inject(
        Fault::new(
            "unrestrictCodeExecution",
            FaultKind::Status {
                status: 404,
                retry_after: None,
                body: None,
            },
        )
        .method("POST"),
    );
    let release = post(&app, json!({"deviceId": ALPHA_AAD, "release": true})).await;

    assert_eq!(release.status, 201, "{}", release.body);
    let lookups = requests_to(&app, "GET", "/api/machines");
    assert_eq!(
        lookups.len(),
        2,
        "the first lookup was remembered, and looked up again after the 404"
    );
    let releases: Vec<u16> = requests_to(&app, "POST", "unrestrictCodeExecution")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(releases, [404, 201]);
    assert_eq!(
        app.call_kinds(),
        [
            "GET machines",
            "GET machineactions",
            "POST restrictCodeExecution",
            "GET machineactions",
            "POST unrestrictCodeExecution",
            "GET machines",
            "GET machineactions",
            "POST unrestrictCodeExecution",
        ]
    );
}

#[tokio::test]
async fn a_duplicate_storm_costs_one_lookup_one_post_and_a_few_reads() {
    let app = spawn_in_process_with(AppOptions::default()).await;

    let answers = join_all((0..120).map(|_| post(&app, json!({"deviceId": ALPHA_AAD})))).await;

    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 200),
        "{statuses:?}"
    );
    assert_eq!(requests_to(&app, "GET", "/api/machines").len(), 1);
    assert_eq!(requests_to(&app, "POST", "restrictCodeExecution").len(), 1);
    let reads = requests_to(&app, "GET", "/api/machineactions").len();
    assert!(reads <= 3, "{reads} state reads for 120 duplicates");
    assert!(app.defender_requests().iter().all(|r| r.status != 429));
    assert_eq!(app.sim.actions().len(), 1);
}

#[tokio::test]
async fn a_caller_hanging_up_while_its_post_is_in_flight_does_not_let_the_next_request_post_again()
{
    let app = spawn_app_with(AppOptions::default()).await;
    // Defender takes 1.5 s before it handles the POST.
    app.sim.inject(
        Fault::new("restrictCodeExecution", FaultKind::Delay { millis: 1500 }).method("POST"),
    );
    let hung_up = reqwest::Client::new()
        .post(format!("{}/api/restrict-code-execution", app.host.base()))
        .header("Content-Type", "application/json")
        .body(json!({"deviceId": ALPHA_AAD}).to_string())
        .timeout(Duration::from_millis(700))
        .send()
        .await;
    assert!(hung_up.is_err(), "the first caller hung up: {hung_up:?}");

    // The same request again while the first POST is still with Defender:
    // its round must not read before that POST's outcome is known.
    let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;

    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["outcome"], "already_pending", "{}", again.body);
    assert_eq!(
        requests_to(&app, "POST", "restrictCodeExecution").len(),
        1,
        "one POST for the two requests"
    );
    assert_eq!(app.sim.actions().len(), 1);
}

#[tokio::test]
async fn concurrent_opposite_requests_that_all_cancel_make_one_action() {
    let app = spawn_in_process_with(AppOptions::default()).await;

    let answers = join_all((0..40).map(|i| {
        post(
            &app,
            json!({"deviceId": ALPHA_AAD, "release": i % 2 == 1, "cancelPending": true}),
        )
    }))
    .await;

    let actions = app.sim.actions();
    assert_eq!(actions.len(), 1, "{actions:#?}");
    assert!(
        requests_to(&app, "POST", "/cancel").is_empty(),
        "nothing was cancelled"
    );
    let created = &actions[0];
    for answer in &answers {
        let body = answer.json();
        match answer.status {
            201 | 200 => assert_eq!(body["action"]["id"], created.id.as_str()),
            409 => {
                assert_eq!(body["code"], "conflicting_action_pending");
                assert_eq!(body["actionId"], created.id.as_str());
                assert!(
                    body["detail"]
                        .as_str()
                        .unwrap()
                        .contains("after this one arrived")
                );
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert_eq!(answers.iter().filter(|a| a.status == 201).count(), 1);
}

// --- Only documented OData ---------------------------------------------------

#[tokio::test]
async fn a_tenant_that_refuses_orderby_and_lists_oldest_first_gets_right_decisions() {
    let app = spawn_in_process_with(AppOptions {
        sim: SimConfig {
            orderby: OrderBy::Refuse,
            list_order: ListOrder::OldestFirst,
            ..AppOptions::default().sim
        },
        ..AppOptions::default()
    })
    .await;
    let step = |release: bool| post(&app, json!({"deviceId": ALPHA_AAD, "release": release}));

    let mut statuses = Vec::new();
    for release in [false, true, false] {
        statuses.push(step(release).await.status);
        app.sim.advance(Duration::from_secs(60));
    }
    let again = step(false).await;

    assert_eq!(statuses, [201, 201, 201]);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["outcome"], "already_in_state");
    assert_eq!(app.sim.actions().len(), 3);
    assert!(
        app.defender_requests().iter().all(|r| !r
            .query
            .as_deref()
            .unwrap_or_default()
            .contains("orderby"))
    );
}

#[tokio::test]
async fn every_page_of_actions_is_read_with_next_links_or_skip() {
    // Defender's page is cut short with a nextLink; or, asked for `$top`, it
    // answers that many rows and no nextLink (microsoft-365-docs#8489).
    for (sim_page, next_link_with_top, client_page, calls) in
        [(1, true, "10000", 3), (10_000, false, "1", 4)]
    {
        let app = spawn_in_process_with(AppOptions {
            sim: SimConfig {
                page_size: sim_page,
                next_link_with_top,
                ..AppOptions::default().sim
            },
            env: vec![("DEFENDER_PAGE_SIZE", client_page.into())],
            ..AppOptions::default()
        })
        .await;
        for release in [false, true, false] {
            assert_eq!(
                post(&app, json!({"deviceId": ALPHA_AAD, "release": release}))
                    .await
                    .status,
                201
            );
            app.sim.advance(Duration::from_secs(60));
        }
        app.sim.clear_requests();

        let again = post(&app, json!({"deviceId": ALPHA_AAD})).await;

        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.json()["outcome"], "already_in_state");
        let pages: Vec<String> = requests_to(&app, "GET", "/api/machineactions")
            .iter()
            .map(|r| r.query.clone().unwrap_or_default())
            .collect();
        assert_eq!(pages.len(), calls, "{pages:?}");
        assert!(pages[1..].iter().all(|q| q.contains("$skip=")), "{pages:?}");
    }
}

#[tokio::test]
async fn when_the_budget_is_tight_one_list_of_machines_answers_every_waiting_lookup() {
    let sim = simulator(SimConfig {
        seed: false,
        ..AppOptions::default().sim
    })
    .await;
    let devices: Vec<(DeviceRef, MachineId)> = (0..6)
        .map(|i| {
            let aad = format!("5c000000-0000-4000-8000-{i:012}");
            let machine: Machine = serde_json::from_value(json!({
                "id": format!("{:040x}", i + 100),
                "aadDeviceId": aad,
                "healthStatus": "Active",
                "osPlatform": "Windows11",
            }))
            .unwrap();
            sim.add_machine(machine.clone());
            (DeviceRef::parse(&aad).unwrap(), machine.id)
        })
        .collect();
    // Two calls a minute: after the first lookup, one is left for five devices.
    let directory = MachineDirectory::new(client_with_budget(&sim, 2), Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(20);
    sim.inject(Fault::new("/api/machines", FaultKind::Delay { millis: 500 }).method("GET"));

    let first = tokio::spawn({
        let (directory, device) = (directory.clone(), devices[0].0.clone());
        async move { directory.find(&device, deadline).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let rest = join_all(
        devices[1..]
            .iter()
            .map(|(d, _)| directory.find(d, deadline)),
    )
    .await;

    assert_eq!(first.await.unwrap().unwrap().found.machine.id, devices[0].1);
    for ((_, machine_id), found) in devices[1..].iter().zip(rest) {
        assert_eq!(&found.unwrap().found.machine.id, machine_id);
    }
    let lookups: Vec<RecordedRequest> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machines")
        .collect();
    assert_eq!(lookups.len(), 2, "{lookups:#?}");
    assert!(
        lookups[0].filter.is_some(),
        "the first device alone, by its id"
    );
    assert_eq!(
        lookups[1].filter, None,
        "then the tenant's list for the rest"
    );
    assert!(
        lookups[1]
            .query
            .as_deref()
            .unwrap_or_default()
            .contains("$top=10000")
    );
}

#[tokio::test]
async fn cancel_pending_does_not_cancel_what_another_instance_created_after_the_request_arrived() {
    let app = spawn_app_with(AppOptions::default()).await;
    // The release's state read is slow; meanwhile another instance (here:
    // a direct call) restricts the device.
    app.sim
        .inject(Fault::new("/api/machineactions", FaultKind::Delay { millis: 3000 }).method("GET"));
    let other_instance = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        reqwest::Client::new()
            .post(format!(
                "{}/api/machines/{ALPHA}/restrictCodeExecution",
                app.sim.url()
            ))
            .bearer_auth(TOKEN)
            .json(&json!({"Comment": "restricted by another instance"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };

    let (release, other) = tokio::join!(
        post(
            &app,
            json!({"deviceId": ALPHA_AAD, "release": true, "cancelPending": true})
        ),
        other_instance
    );

    assert_eq!(other, 201);
    assert_eq!(release.status, 409, "{}", release.body);
    let problem = release.json();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("after this one arrived"),
        "{problem}"
    );
    assert!(
        requests_to(&app, "POST", "/cancel").is_empty(),
        "the other instance's restrict was not cancelled"
    );
    assert!(requests_to(&app, "POST", "unrestrictCodeExecution").is_empty());
    assert_eq!(app.sim.actions().len(), 1);
}

// --- Slots reserved ahead (a job's group) -----------------------------------

/// A job's group reserves its writes' slots before it starts: the write to
/// each of its machines uses its own slot without asking the budget again,
/// no other call can have it meanwhile, and the slots the group did not use
/// are given back when it is done.
#[tokio::test]
async fn a_group_writes_on_the_slots_it_reserved_and_gives_back_the_rest() {
    use restrict_code_execution::defender::budget::Share;

    let sim = simulator(AppOptions::default().sim).await;
    let client = client_with_budget(&sim, 2);
    let windows = windows_machines(&sim);
    let [a, b, c] = [&windows[0], &windows[1], &windows[2]];
    let restrict = ActionType::RestrictCodeExecution;
    let soon = || Instant::now() + Duration::from_millis(300);

    let group = client
        .prepay(
            Endpoint::Restrict,
            &[a.clone(), b.clone()],
            Share::ALL,
            soon(),
        )
        .await
        .expect("both slots now");
    // The minute's two slots are the group's: another write gets none.
    let other = client.create_action(c, restrict, "other", soon()).await;
    assert!(
        matches!(other, Err(DefenderError::OverBudget { .. })),
        "{other:?}"
    );
    // The group's write goes at once, on its own slot.
    client
        .create_action(a, restrict, "group", soon())
        .await
        .expect("sent on the reserved slot");
    // B never wrote: its slot comes back with the group.
    drop(group);
    client
        .create_action(c, restrict, "other", soon())
        .await
        .expect("the slot given back");
    let posts: Vec<String> = requests_to_sim(&sim, "POST")
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        posts,
        [
            format!("/api/machines/{a}/restrictCodeExecution"),
            format!("/api/machines/{c}/restrictCodeExecution"),
        ]
    );
    // With the minute full, a group is told how long until it fits.
    let full = client
        .prepay(
            Endpoint::Restrict,
            std::slice::from_ref(b),
            Share::JOBS,
            soon(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(full, DefenderError::OverBudget { wait, .. } if wait > Duration::from_secs(50)),
        "{full:?}"
    );
}

/// The ids of the seeded Windows machines (the ones a restrict can act on).
fn windows_machines(sim: &SimHandle) -> Vec<String> {
    sim.machines()
        .into_iter()
        .filter(|m| {
            m.os_platform
                .as_deref()
                .is_some_and(|p| p.starts_with("Windows"))
        })
        .map(|m| m.id.to_string())
        .collect()
}

fn requests_to_sim(sim: &SimHandle, method: &str) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == method)
        .collect()
}

/// A group's slot for a machine, once used, may be reserved again by a
/// later group; the first group ending gives back only its own unused slots.
#[tokio::test]
async fn a_finished_group_gives_back_only_its_own_slots() {
    use restrict_code_execution::defender::budget::Share;

    let sim = simulator(AppOptions::default().sim).await;
    let client = client_with_budget(&sim, 3);
    let windows = windows_machines(&sim);
    let (a, b) = (&windows[0], &windows[1]);
    let soon = || Instant::now() + Duration::from_millis(300);
    let first = client
        .prepay(
            Endpoint::Restrict,
            &[a.clone(), b.clone()],
            Share::ALL,
            soon(),
        )
        .await
        .unwrap();
    client
        .create_action(a, ActionType::RestrictCodeExecution, "first", soon())
        .await
        .unwrap();
    let second = client
        .prepay(
            Endpoint::Restrict,
            std::slice::from_ref(a),
            Share::ALL,
            soon(),
        )
        .await
        .unwrap();
    assert_eq!(client.free_slots(Endpoint::Restrict), 0);
    drop(first);
    assert_eq!(
        client.free_slots(Endpoint::Restrict),
        1,
        "only b's unused slot comes back; the second group keeps its slot for a"
    );
    drop(second);
    assert_eq!(client.free_slots(Endpoint::Restrict), 2);
}

/// Defender counts a write when it arrives. A group's writes that go out
/// later than their slots (the group's leases and state read took half a
/// simulated minute) have their slots moved to when they go, so the writes
/// after them wait for the window Defender counts, instead of drawing 429s.
/// Simulator and budget at 60x: a minute is one real second.
#[tokio::test]
async fn a_write_sent_late_on_a_reserved_slot_counts_from_when_it_goes() {
    use restrict_code_execution::{
        defender::budget::Share,
        simulator::{RateLimits, seed::Fleet},
    };

    let mut config = AppOptions::default().sim;
    config.speed = 60.0;
    config.rate_limits = Some(RateLimits {
        per_minute: 4,
        per_hour: 1500,
    });
    let sim = simulator(config).await;
    let fleet = Fleet::new("late", "late", 8);
    sim.add_fleet(&fleet);
    let ids: Vec<String> = fleet.devices().into_iter().map(|d| d.machine_id).collect();
    let client = client_on(&sim, RateBudget::new(4, 1500).with_clock_speed(60.0));
    let start = Instant::now();
    let group = client
        .prepay(
            Endpoint::Restrict,
            &ids[..4],
            Share::ALL,
            start + Duration::from_secs(1),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids[..4] {
        client
            .create_action(
                id,
                ActionType::RestrictCodeExecution,
                "group",
                Instant::now() + Duration::from_secs(2),
            )
            .await
            .unwrap();
    }
    drop(group);
    // The budget's minute (61 s / 60) is over since the reservation, not
    // since the writes.
    tokio::time::sleep_until(start + Duration::from_millis(1100)).await;
    for id in &ids[4..] {
        let _ = client
            .create_action(
                id,
                ActionType::RestrictCodeExecution,
                "later",
                Instant::now() + Duration::from_millis(300),
            )
            .await;
    }
    let posts = requests_to_sim(&sim, "POST");
    let throttled = posts.iter().filter(|r| r.status == 429).count();
    assert_eq!(throttled, 0, "{posts:#?}");
    assert_eq!(
        posts.len(),
        4,
        "the later writes wait for the window the group's writes opened"
    );
}
