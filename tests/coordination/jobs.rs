//! Containment jobs as deployed: handler processes with
//! `COORDINATION=storage` on one Azurite (blobs and queues), the host
//! emulator's queue trigger delivering the jobs' messages to each of them
//! as the Functions host does (`queue_host.rs`), and one simulated Defender
//! tenant. Every test asserts what Defender received.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use base64::Engine as _;
use restrict_code_execution::simulator::{
    Fault, FaultKind, SimConfig, SimHandle, Simulator, seed::Fleet,
};
use serde_json::{Value, json};

use crate::{
    azurite::Azurite,
    instances::Instance,
    queue_host::{HostEvent, PoisonReason, QueueHost, QueueOptions, QueueTrigger, StorageAccount},
};

const TAG: &str = "wave-7";

async fn tenant(fleet: &Fleet) -> SimHandle {
    let sim = Simulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            seed: false,
            identity_header: "instances-identity-header".to_owned(),
            token: "instances-access-token".to_owned(),
            ..SimConfig::default()
        },
    )
    .await
    .expect("simulator starts");
    sim.add_fleet(fleet);
    sim
}

/// One app instance: the handler and the host's listeners for the job
/// worker and the poison function, both read from the repository's
/// function.json and host.json.
struct AppInstance {
    handler: Instance,
    worker: Option<QueueHost>,
    poison: Option<QueueHost>,
}

fn queue_options(visibility: Option<Duration>) -> QueueOptions {
    let host_json: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("host.json")).unwrap(),
    )
    .unwrap();
    let mut options = QueueOptions::from_host_json(&host_json, 1).unwrap();
    // Polled often, so that tests do not wait for the host's backoff.
    options.max_polling_interval = Duration::from_millis(200);
    if let Some(visibility) = visibility {
        options.visibility_timeout = visibility;
    }
    options
}

impl AppInstance {
    fn start(
        sim: &SimHandle,
        azurite: &Azurite,
        container: &str,
        extra: &[(&str, &str)],
        visibility: Option<Duration>,
    ) -> Self {
        let connection = azurite.connection_string();
        let handler = Instance::start(sim, &connection, container, extra);
        let settings =
            move |name: &str| (name == "AzureWebJobsStorage").then(|| connection.clone());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let url = format!("http://127.0.0.1:{}", handler.port);
        let listen = |function: &str| {
            let trigger = QueueTrigger::from_app(root, function, &settings).unwrap();
            QueueHost::start(&url, trigger, queue_options(visibility), &settings).unwrap()
        };
        Self {
            worker: Some(listen("job-worker")),
            poison: Some(listen("job-poison")),
            handler,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.handler.port)
    }

    async fn start_job(&self, body: Value) -> Value {
        let response = reqwest::Client::new()
            .post(self.url("/api/restrict-code-execution/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        response.json().await.unwrap()
    }

    async fn status(&self, job: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(self.url(&format!("/api/restrict-code-execution/jobs/{job}")))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// SIGKILL the handler mid-invocation; the host's listeners stop (the
    /// invocations in flight fail and their messages are released).
    async fn kill(&mut self) -> Vec<HostEvent> {
        self.handler.kill();
        let mut events = Vec::new();
        for host in [self.worker.take(), self.poison.take()]
            .into_iter()
            .flatten()
        {
            events.extend(host.stop().await);
        }
        events
    }

    async fn stop(&mut self) -> Vec<HostEvent> {
        let mut events = Vec::new();
        for host in [self.worker.take(), self.poison.take()]
            .into_iter()
            .flatten()
        {
            events.extend(host.stop().await);
        }
        events
    }
}

async fn until_done(app: &AppInstance, job: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = app.status(job).await;
        if status == 200 {
            return body;
        }
        assert_eq!(status, 202, "{body}");
        assert!(Instant::now() < deadline, "the job did not finish: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn restrict_posts(sim: &SimHandle) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/restrictCodeExecution"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_job_on_three_instances_with_one_killed_restricts_every_device_once() {
    let azurite = Azurite::start();
    let fleet = Fleet {
        stale_records: 3,
        merged_records: 2,
        ..Fleet::new("three", TAG, 30)
    };
    let sim = tenant(&fleet).await;
    // Thirty restricts a minute, the budget's clock six times faster: the
    // job takes some seconds, shared by three instances through storage.
    let env = [
        ("DEFENDER_RATE_LIMIT_PER_MINUTE", "30"),
        ("DEFENDER_RATE_CLOCK_SPEED", "6"),
    ];
    // Instance 0 takes the job's messages alone, and Defender holds its
    // answers to restricts for a few seconds: it is killed while its POSTs
    // have created their actions and before it heard back, so the devices
    // have actions and no outcome. The other two instances then get the
    // messages again.
    sim.inject(Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: FaultKind::DelayAfterHandling { millis: 4000 },
        times: 1000,
    });
    let mut apps = vec![AppInstance::start(&sim, &azurite, "jobs-three", &env, None)];
    let started = apps[0].start_job(json!({"machineTag": TAG})).await;
    let job = started["jobId"].as_str().unwrap().to_owned();
    assert_eq!(
        started["devices"], 30,
        "stale and merged records count once"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while sim.actions().is_empty() {
        assert!(Instant::now() < deadline, "no restrict reached Defender");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_events = apps[0].kill().await;
    let created_by_the_killed = sim.actions().len();
    sim.clear_faults();
    apps.extend((0..2).map(|_| AppInstance::start(&sim, &azurite, "jobs-three", &env, None)));

    let done = until_done(&apps[2], &job, Duration::from_secs(150)).await;
    let counts = &done["counts"];
    assert_eq!(counts["total"], 30, "{counts}");
    assert_eq!(counts["queued"], 0, "{counts}");
    assert_eq!(counts["failed"], 0, "{counts}");
    // A device whose POST went out just before the kill is found with its
    // action when its message comes back (pending, or done if Defender
    // finished it meanwhile): the action's comment names the job, so the
    // outcome is still the request this job made, never already_pending or
    // already_in_state.
    assert!(created_by_the_killed > 0);
    assert_eq!(counts["requested"], 30, "{counts} ({done})");
    for device in done["devices"].as_array().unwrap() {
        assert!(device["actionId"].is_string(), "{device}");
    }

    // Defender: exactly one restrict action per live record, none for the
    // stale or merged ones, no 429.
    let actions = sim.actions();
    let mut machines: Vec<String> = actions
        .iter()
        .filter_map(|a| a.machine_id.as_ref().map(ToString::to_string))
        .collect();
    machines.sort();
    let mut live: Vec<String> = fleet.devices().into_iter().map(|d| d.machine_id).collect();
    live.sort();
    assert_eq!(machines, live, "one action per device, on its live record");
    // The simulator logs a request when it answers: the killed instance's
    // POSTs, held until it was gone, were never answered.
    assert_eq!(restrict_posts(&sim) + created_by_the_killed, 30);
    assert!(sim.requests().iter().all(|r| r.status != 429));

    let mut events = killed_events;
    for app in &mut apps[1..] {
        events.extend(app.stop().await);
    }
    let invocations = events
        .iter()
        .filter(|e| matches!(e, HostEvent::Invoked { .. }))
        .count();
    assert!(invocations >= 3, "the messages were spread: {invocations}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, HostEvent::Poisoned { .. })),
        "nothing was poisoned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_message_delivered_again_sends_nothing_and_keeps_the_first_outcome() {
    let azurite = Azurite::start();
    let fleet = Fleet::new("again", TAG, 3);
    let sim = tenant(&fleet).await;
    let mut app = AppInstance::start(&sim, &azurite, "jobs-again", &[], None);
    let started = app.start_job(json!({"machineTag": TAG})).await;
    let job = started["jobId"].as_str().unwrap().to_owned();
    let first = until_done(&app, &job, Duration::from_secs(60)).await;
    assert_eq!(first["counts"]["requested"], 3);
    let posts_before = restrict_posts(&sim);

    // The same devices' message again, as the host would deliver a message
    // whose completion it never saw.
    let devices: Vec<Value> = first["devices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| json!({"i": i, "d": d["deviceId"], "m": d["machineId"]}))
        .collect();
    let text = json!({"job": job, "devices": devices}).to_string();
    let account = StorageAccount::from_connection_string(&azurite.connection_string()).unwrap();
    let queue = account.queue("restrict-jobs").unwrap();
    let content: azure_core::http::RequestContent<azure_storage_queue::models::QueueMessage, _> =
        azure_storage_queue::models::QueueMessage {
            message_text: Some(base64::engine::general_purpose::STANDARD.encode(&text)),
        }
        .try_into()
        .unwrap();
    queue.send_message(content, None).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = app.worker.as_ref().unwrap().events();
        let deleted = events
            .iter()
            .filter(|e| matches!(e, HostEvent::Deleted { .. }))
            .count();
        // The job's own message, then the repeated one.
        if deleted >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(restrict_posts(&sim), posts_before, "no second restrict");
    assert_eq!(sim.actions().len(), 3);
    let (status, again) = app.status(&job).await;
    assert_eq!(status, 200);
    for (before, after) in first["devices"]
        .as_array()
        .unwrap()
        .iter()
        .zip(again["devices"].as_array().unwrap())
    {
        assert_eq!(before["outcome"], after["outcome"]);
        assert_eq!(before["actionId"], after["actionId"]);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_poisoned_and_its_devices_end_failed_with_the_problem() {
    let azurite = Azurite::start();
    let fleet = Fleet::new("poison", TAG, 1);
    let sim = tenant(&fleet).await;
    // Defender keeps failing the restrict: a transient failure every time.
    sim.inject(Fault {
        method: Some("POST".into()),
        path_contains: "restrictCodeExecution".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
            body: None,
        },
        times: 1000,
    });
    let mut app = AppInstance::start(
        &sim,
        &azurite,
        "jobs-poison",
        &[("DEFENDER_TIMEOUT_SECONDS", "5")],
        Some(Duration::ZERO),
    );
    let started = app.start_job(json!({"machineTag": TAG})).await;
    let job = started["jobId"].as_str().unwrap().to_owned();
    let done = until_done(&app, &job, Duration::from_secs(120)).await;
    assert_eq!(done["counts"]["failed"], 1, "{}", done["counts"]);
    let device = &done["devices"][0];
    assert_eq!(device["outcome"], "failed");
    assert_eq!(device["problem"]["code"], "defender_error", "{device}");
    assert!(sim.actions().is_empty(), "Defender created nothing");

    let events = app.stop().await;
    let invoked = events
        .iter()
        .filter(|e| matches!(e, HostEvent::Invoked { .. }))
        .count();
    let poisoned: Vec<&HostEvent> = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                HostEvent::Poisoned {
                    reason: PoisonReason::LastAttemptFailed,
                    dequeue_count: 5,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(poisoned.len(), 1, "{events:#?}");
    // Five deliveries to the worker, one to the poison function.
    assert_eq!(invoked, 6, "{events:#?}");
}
