//! The reconciler against Azurite and one simulated tenant: two "instances"
//! (each its own coordinator, Defender client, restrictor and reconciler,
//! sharing only the storage account, as two function app instances would),
//! their runs called directly with the time passed in (style: background
//! tasks are tested by activating them, not by waiting for the timer), and a
//! handler process whose `reconcile` function the host emulator's timer
//! fires. Every test asserts what Defender received.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use restrict_code_execution::{
    coordination::{Coordinator, CoordinatorOptions, StorageSettings},
    defender::{DefenderClient, DefenderClientOptions, auth::TokenSource},
    service::{
        expiry::ExpiryNote,
        reconcile::{ReconcileSettings, Reconciler},
        restrict::{Intent, Outcome, Restrictor, Success},
        runbook::{Comment, DeviceRef, ReleaseAfter},
    },
    simulator::{RecordedRequest, SimConfig, SimHandle, Simulator, seed::Fleet},
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    azurite::Azurite,
    instances::{IDENTITY_HEADER, Instance, TOKEN},
    queue_host::{Outcome as HostOutcome, TimerTrigger, fire_timer},
};

const TAG: &str = "CodeExecutionRestricted";

async fn tenant(fleet: &Fleet) -> SimHandle {
    let sim = Simulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            seed: false,
            token: TOKEN.to_owned(),
            identity_header: IDENTITY_HEADER.to_owned(),
            // Actions finish within a second, so that a test sees them
            // Succeeded without waiting minutes.
            pending_for: Duration::from_millis(150),
            in_progress_for: Duration::from_millis(150),
            ..SimConfig::default()
        },
    )
    .await
    .expect("simulator starts");
    sim.add_fleet(fleet);
    sim
}

/// One app instance, in process.
struct Side {
    restrictor: Restrictor,
    reconciler: Reconciler,
    client: DefenderClient,
    coordinator: Arc<Coordinator>,
}

fn side(sim: &SimHandle, storage: &StorageSettings, tag: Option<&str>) -> Side {
    side_with(
        sim,
        storage,
        tag,
        CoordinatorOptions::default(),
        Duration::from_secs(60),
    )
}

fn side_with(
    sim: &SimHandle,
    storage: &StorageSettings,
    tag: Option<&str>,
    options: CoordinatorOptions,
    run_time: Duration,
) -> Side {
    let coordinator = Arc::new(Coordinator::new(storage, options).unwrap());
    let client = DefenderClient::new(
        url::Url::parse(&sim.url()).unwrap(),
        TokenSource::fixed(TOKEN, Duration::from_secs(5)),
        Some(DefenderClientOptions {
            budget: coordinator.clone(),
            timeout: Duration::from_secs(10),
            ..DefenderClientOptions::default()
        }),
    );
    let restrictor = Restrictor::new(
        client.clone(),
        true,
        Duration::ZERO,
        Some(coordinator.clone()),
    );
    let reconciler = Reconciler::new(
        restrictor.clone(),
        client.clone(),
        Arc::new(coordinator.records()),
        false,
        ReconcileSettings {
            restricted_tag: tag.map(str::to_owned),
            tag_every: time::Duration::minutes(15),
            budget_percent: 20,
            per_hour: 1500,
            run_time,
        },
    );
    Side {
        restrictor,
        reconciler,
        client,
        coordinator,
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

impl Side {
    /// A restrict through the service, as the restrict function does it:
    /// the protocol, then the record with its expiry.
    async fn restrict(
        &self,
        machine_id: &str,
        release_after: Option<ReleaseAfter>,
        force: bool,
    ) -> (Success, ExpiryNote) {
        let release_at = release_after.and_then(|r| r.release_at(OffsetDateTime::now_utc()));
        let intent = Intent {
            action: restrict_code_execution::defender::models::ActionType::RestrictCodeExecution,
            force,
            cancel_pending: false,
            comment: Comment::parse(Some(&json!("Incident 4711"))).unwrap(),
            caller: None,
            release_at,
            job_id: None,
        };
        let device = DeviceRef::parse(machine_id).unwrap();
        let success = self.restrictor.run(&device, &intent, soon()).await.unwrap();
        let note = self
            .reconciler
            .restrictions()
            .after(&success, release_after, release_at)
            .await
            .unwrap();
        (success, note)
    }
}

/// Wait until Defender reports every action of the machines final.
async fn settle(sim: &SimHandle) {
    for _ in 0..50 {
        let open = sim
            .actions()
            .iter()
            .any(|a| matches!(a.status.to_string().as_str(), "Pending" | "InProgress"));
        if !open {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("actions did not finish");
}

fn posts(sim: &SimHandle, verb: &str) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with(verb))
        .collect()
}

fn comment(request: &RecordedRequest) -> String {
    let body: Value = serde_json::from_str(&request.body).unwrap();
    body["Comment"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_is_released_once_even_by_two_reconcilers_at_once() {
    let azurite = Azurite::start();
    let storage = azurite.settings("reconcile-once");
    let fleet = Fleet::new("expiry", "wave-e", 2);
    let sim = tenant(&fleet).await;
    let (a, b) = (side(&sim, &storage, None), side(&sim, &storage, None));
    let machine = fleet.devices()[0].machine_id.clone();

    let (restricted, note) = a
        .restrict(
            &machine,
            Some(ReleaseAfter::After(time::Duration::hours(4))),
            false,
        )
        .await;
    assert_eq!(restricted.outcome, Outcome::Requested);
    let release_at = note.release_at().expect("the expiry is set");
    // The comment Defender received ends with the readable marker.
    let sent = posts(&sim, "/restrictCodeExecution");
    assert_eq!(sent.len(), 1);
    assert!(
        comment(&sent[0]).ends_with(&format!(
            "[auto-release {}]",
            restrict_code_execution::service::expiry::rfc3339(release_at)
        )),
        "{}",
        comment(&sent[0])
    );
    settle(&sim).await;

    // Before its time: nothing is read or sent.
    sim.clear_requests();
    let early = a.reconciler.run(OffsetDateTime::now_utc()).await;
    assert_eq!((early.due, early.calls.total()), (0, 0), "{early:?}");
    assert!(sim.requests().is_empty());

    // Both instances run at once, after the time: one release.
    let later = release_at + time::Duration::seconds(1);
    let (ra, rb) = tokio::join!(a.reconciler.run(later), b.reconciler.run(later));
    assert_eq!(ra.released + rb.released, 1, "{ra:?} {rb:?}");
    assert_eq!(ra.failed + rb.failed, 0, "{ra:?} {rb:?}");
    let releases = posts(&sim, "/unrestrictCodeExecution");
    assert_eq!(releases.len(), 1, "exactly one release POST");
    assert!(releases[0].path.contains(&machine));
    let said = comment(&releases[0]);
    assert!(
        said.contains("Automatic release")
            && said.contains(&restricted.action.action.id.to_string()),
        "{said}"
    );
    // Only the due machine was read: the calls follow the work.
    assert!(
        sim.requests()
            .iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.filter.as_deref().unwrap_or("").contains(&machine)
                || r.path.contains(&machine)),
        "{:?}",
        sim.requests()
    );

    // A second run right after, on either instance, does nothing.
    settle(&sim).await;
    sim.clear_requests();
    let (again_a, again_b) = tokio::join!(a.reconciler.run(later), b.reconciler.run(later));
    assert!(again_a.idle() && again_b.idle(), "{again_a:?} {again_b:?}");
    assert_eq!(again_a.calls.total() + again_b.calls.total(), 0);
    assert!(sim.requests().is_empty(), "{:?}", sim.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_restrict_moves_removes_or_cancels_the_expiry_and_one_made_elsewhere_gets_none() {
    let azurite = Azurite::start();
    let storage = azurite.settings("reconcile-later");
    let fleet = Fleet::new("later", "wave-l", 4);
    let sim = tenant(&fleet).await;
    let a = side(&sim, &storage, None);
    let ids: Vec<String> = fleet.devices().into_iter().map(|d| d.machine_id).collect();
    let hours = |h| Some(ReleaseAfter::After(time::Duration::hours(h)));

    // [0]: a later restrict through the service (force, no releaseAfter)
    // creates a new restriction: the expiry of the first one is gone.
    a.restrict(&ids[0], hours(1), false).await;
    settle(&sim).await;
    let (second, note) = a.restrict(&ids[0], None, true).await;
    assert_eq!(second.outcome, Outcome::Requested);
    assert_eq!(note, ExpiryNote::Untouched);

    // [1]: the same restrict again with a new releaseAfter moves the expiry
    // (no new action); "none" removes it.
    let (_, first) = a.restrict(&ids[1], hours(1), false).await;
    settle(&sim).await;
    let before = posts(&sim, "/restrictCodeExecution").len();
    let (again, moved) = a.restrict(&ids[1], hours(8), false).await;
    assert_eq!(again.outcome, Outcome::AlreadyInState);
    assert!(moved.release_at() > first.release_at());
    assert_eq!(posts(&sim, "/restrictCodeExecution").len(), before);
    let (_, removed) = a.restrict(&ids[1], Some(ReleaseAfter::Never), false).await;
    assert_eq!(removed, ExpiryNote::Removed);

    // [2]: restricted elsewhere (the portal): an expiry cannot attach.
    a.client
        .create_action(
            &ids[2],
            restrict_code_execution::defender::models::ActionType::RestrictCodeExecution,
            "restricted in the portal",
            soon(),
        )
        .await
        .unwrap();
    settle(&sim).await;
    let (_, elsewhere) = a.restrict(&ids[2], hours(1), false).await;
    assert_eq!(elsewhere, ExpiryNote::NotOurs);

    // [3]: ours, then replaced elsewhere by a new restrict: the reconciler
    // sees it in Defender's history and ends the expiry without a release.
    a.restrict(&ids[3], hours(1), false).await;
    settle(&sim).await;
    a.client
        .create_action(
            &ids[3],
            restrict_code_execution::defender::models::ActionType::RestrictCodeExecution,
            "restricted again in the portal",
            soon(),
        )
        .await
        .unwrap();
    settle(&sim).await;

    sim.clear_requests();
    let past_all = OffsetDateTime::now_utc() + time::Duration::hours(9);
    let report = a.reconciler.run(past_all).await;
    assert_eq!(report.released, 0, "{report:?}");
    assert_eq!(report.ended, 1, "only [3] was due: {report:?}");
    assert!(
        posts(&sim, "/unrestrictCodeExecution").is_empty(),
        "nothing is released"
    );
    let again = a.reconciler.run(past_all).await;
    assert!(again.idle() && again.calls.total() == 0, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_is_added_to_restricted_machines_and_removed_from_the_others_only_that_tag() {
    let azurite = Azurite::start();
    let storage = azurite.settings("reconcile-tags");
    let fleet = Fleet::new("tags", "wave-t", 3);
    let sim = tenant(&fleet).await;
    // The tags API needs Machine.ReadWrite.All beside the usual roles.
    sim.set_roles(&[
        "Machine.Read.All",
        "Machine.RestrictExecution",
        "Machine.ReadWrite.All",
    ]);
    let a = side(&sim, &storage, Some(TAG));
    let b = side(&sim, &storage, Some(TAG));
    let ids: Vec<String> = fleet.devices().into_iter().map(|d| d.machine_id).collect();

    // [0] restricted; [1] carries the tag but is not restricted; [2] neither.
    a.restrict(&ids[0], None, false).await;
    a.client
        .tag_machines(TAG, true, std::slice::from_ref(&ids[1]), soon())
        .await
        .unwrap();
    settle(&sim).await;
    sim.clear_requests();

    let now = OffsetDateTime::now_utc();
    let (ra, rb) = tokio::join!(a.reconciler.run(now), b.reconciler.run(now));
    // One full read between the two instances.
    assert!(ra.tags_read ^ rb.tags_read, "{ra:?} {rb:?}");
    let report = if ra.tags_read { ra } else { rb };
    assert_eq!(
        (report.tags_added, report.tags_removed),
        (1, 1),
        "{report:?}"
    );

    let tag_posts: Vec<Value> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.contains("/tags"))
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    assert_eq!(tag_posts.len(), 2, "{tag_posts:?}");
    assert!(tag_posts.contains(&json!({"Value": TAG, "Action": "Add"})));
    assert!(tag_posts.contains(&json!({"Value": TAG, "Action": "Remove"})));

    let tags_of = |id: &str| -> Vec<String> {
        let machine = sim
            .machines()
            .into_iter()
            .find(|m| m.id.to_string().eq_ignore_ascii_case(id))
            .unwrap();
        serde_json::from_value(
            machine
                .extra
                .get("machineTags")
                .cloned()
                .unwrap_or(json!([])),
        )
        .unwrap()
    };
    assert_eq!(tags_of(&ids[0]), vec!["wave-t".to_owned(), TAG.to_owned()]);
    assert_eq!(tags_of(&ids[1]), vec!["wave-t".to_owned()]);
    assert_eq!(tags_of(&ids[2]), vec!["wave-t".to_owned()]);

    // Within TAG_RECONCILE_MINUTES: no full read again.
    sim.clear_requests();
    let next = a.reconciler.run(now + time::Duration::minutes(1)).await;
    assert!(!next.tags_read && next.calls.total() == 0, "{next:?}");
    assert!(sim.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_emulators_timer_runs_the_reconcile_function_in_payload_mode() {
    let azurite = Azurite::start();
    let fleet = Fleet::new("timer", "wave-x", 2);
    let sim = tenant(&fleet).await;
    let handler = Instance::start(&sim, &azurite.connection_string(), "reconcile-timer", &[]);
    let url = format!("http://127.0.0.1:{}", handler.port);
    let every_minute = |n: &str| (n == "RECONCILE_SCHEDULE").then(|| "0 */1 * * * *".to_owned());
    let trigger = TimerTrigger::from_app(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "reconcile",
        &every_minute,
    )
    .unwrap();
    assert_eq!(trigger.name, "timer");
    assert_eq!(trigger.period(), Some(Duration::from_secs(60)));

    // A restrict with an expiry through the HTTP function: releaseAt in the
    // answer, the marker in what Defender received.
    let machine = &fleet.devices()[0].machine_id;
    let answer: Value = reqwest::Client::new()
        .post(format!("{url}/api/restrict-code-execution"))
        .json(&json!({"deviceId": machine, "releaseAfter": "PT4H"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["outcome"], "requested", "{answer}");
    let release_at = answer["releaseAt"].as_str().expect("releaseAt").to_owned();
    assert!(release_at.ends_with('Z'));
    assert!(answer.get("warning").is_none(), "{answer}");
    let sent = posts(&sim, "/restrictCodeExecution");
    assert!(comment(&sent[0]).ends_with(&format!("[auto-release {release_at}]")));

    // The timer fires as the host does, twice; nothing is due, so Defender
    // hears nothing (its calls follow the work, not the tenant).
    sim.clear_requests();
    let http = reqwest::Client::new();
    for past_due in [true, false] {
        let (envelope, outcome) = fire_timer(
            &http,
            &url,
            &trigger,
            None,
            past_due,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(outcome, HostOutcome::Succeeded { status: 200 });
        assert!(envelope["Data"]["timer"].is_object());
    }
    assert!(sim.requests().is_empty(), "{:?}", sim.requests());
    // The run's line is written as its answer goes; read until both are in.
    let runs_logged = || {
        handler
            .logs()
            .iter()
            .filter(|l| l.contains("reconcile run"))
            .count()
    };
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while runs_logged() < 2 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        runs_logged() >= 2,
        "one log line per run: {:?}",
        handler.logs()
    );
}

/// The whole path as deployed, on the host's own triggers: a job with
/// `releaseAfter` run by the queue trigger, then the timer firing
/// `reconcile` every few seconds until the expiry passes. Each device is
/// released exactly once, not before its time, with an automatic-release
/// comment naming its restriction. (`PT1M` is the shortest expiry, so this
/// test waits a minute; it runs beside the others.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_expiry_is_released_once_by_the_host_timer_after_its_time() {
    use crate::queue_host::{QueueHost, QueueOptions, QueueTrigger, TimerHost};

    let azurite = Azurite::shared();
    let fleet = Fleet::new("expire-job", "wave-xj", 3);
    let sim = tenant(&fleet).await;
    let connection = azurite.connection_string();
    let handler = Instance::start(&sim, &connection, "reconcile-job-expiry", &[]);
    let url = format!("http://127.0.0.1:{}", handler.port);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let settings = {
        let connection = connection.clone();
        move |name: &str| (name == "AzureWebJobsStorage").then(|| connection.clone())
    };
    let host_json: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("host.json")).unwrap()).unwrap();
    let mut options = QueueOptions::from_host_json(&host_json, 1).unwrap();
    options.max_polling_interval = Duration::from_millis(200);
    let worker = QueueHost::start(
        &url,
        QueueTrigger::from_app(root, "job-worker", &settings).unwrap(),
        options,
        &settings,
    )
    .unwrap();

    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{url}/api/restrict-code-execution/jobs"))
        .json(&json!({"machineTag": "wave-xj", "releaseAfter": "PT1M"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = started["jobId"].as_str().expect("a job id").to_owned();
    let release_at = OffsetDateTime::parse(
        started["releaseAt"]
            .as_str()
            .expect("releaseAt in the answer"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(50);
    loop {
        let response = http
            .get(format!("{url}/api/restrict-code-execution/jobs/{job}"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["counts"]["requested"], 3, "{body}");
            break;
        }
        assert!(std::time::Instant::now() < until, "the job did not finish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    worker.stop().await;
    let restricts = posts(&sim, "/restrictCodeExecution");
    assert_eq!(restricts.len(), 3);
    for sent in &restricts {
        assert!(
            comment(sent).ends_with(&format!(
                "[auto-release {}]",
                restrict_code_execution::service::expiry::rfc3339(release_at)
            )),
            "{}",
            comment(sent)
        );
    }

    // The timer fires as the host does, every 2 s, until the three releases
    // are sent; none goes before releaseAt.
    let every = |n: &str| (n == "RECONCILE_SCHEDULE").then(|| "*/2 * * * * *".to_owned());
    let trigger = TimerTrigger::from_app(root, "reconcile", &every).unwrap();
    let timer = TimerHost::start(
        &url,
        trigger,
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    let until = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let released = posts(&sim, "/unrestrictCodeExecution");
        if !released.is_empty() {
            assert!(
                OffsetDateTime::now_utc() >= release_at,
                "released before {release_at}"
            );
        }
        if released.len() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "not released: {released:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A few more runs change nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let runs = timer.stop().await;
    assert!(runs.len() >= 3, "{runs:?}");
    assert!(
        runs.iter()
            .all(|(_, outcome)| *outcome == HostOutcome::Succeeded { status: 200 }),
        "{runs:?}"
    );
    let released = posts(&sim, "/unrestrictCodeExecution");
    assert_eq!(released.len(), 3, "one release per device: {released:?}");
    for device in fleet.devices() {
        let mine: Vec<_> = released
            .iter()
            .filter(|r| r.path.contains(device.machine_id.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "{}", device.machine_id);
        let restriction = sim
            .actions()
            .into_iter()
            .find(|a| {
                a.machine_id.as_deref() == Some(device.machine_id.as_str())
                    && a.action_type == "RestrictCodeExecution"
            })
            .expect("the job's restriction");
        let said = comment(mine[0]);
        assert!(
            said.contains("Automatic release") && said.contains(&restriction.id.to_string()),
            "{said}"
        );
    }
}

/// Priority: interactive requests, then the reconciler, then jobs. With
/// nine of the minute's ten release slots taken by interactive callers, a
/// due expiry does not take the tenth (the reconciler's share is nine
/// tenths of each minute): it is left for a later run, nothing is sent, and
/// the slot is still there for an interactive release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_expiry_leaves_the_rest_of_the_window_to_interactive_callers() {
    use restrict_code_execution::defender::{api::Endpoint, budget::CallBudget};

    let azurite = Azurite::shared();
    let storage = azurite.settings("reconcile-share");
    let fleet = Fleet::new("share", "wave-s", 1);
    let sim = tenant(&fleet).await;
    let a = side_with(
        &sim,
        &storage,
        None,
        CoordinatorOptions {
            per_minute: 10,
            ..CoordinatorOptions::default()
        },
        Duration::from_secs(5),
    );
    let machine = fleet.devices()[0].machine_id.clone();
    let (_, note) = a
        .restrict(
            &machine,
            Some(ReleaseAfter::After(time::Duration::hours(4))),
            false,
        )
        .await;
    let release_at = note.release_at().expect("the expiry is set");
    settle(&sim).await;

    for _ in 0..9 {
        a.coordinator
            .acquire(Endpoint::Unrestrict, soon())
            .await
            .expect("an interactive slot");
    }
    sim.clear_requests();
    let run = a
        .reconciler
        .run(release_at + time::Duration::seconds(1))
        .await;
    assert_eq!((run.due, run.deferred, run.released), (1, 1, 0), "{run:?}");
    assert!(
        posts(&sim, "/unrestrictCodeExecution").is_empty(),
        "{:?}",
        sim.requests()
    );
    // The tenth slot is the interactive callers' at once.
    tokio::time::timeout(
        Duration::from_millis(500),
        a.coordinator.acquire(Endpoint::Unrestrict, soon()),
    )
    .await
    .expect("no wait for the last slot")
    .expect("the last slot");
}
