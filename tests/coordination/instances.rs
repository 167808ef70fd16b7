//! Three instances of the real `handler` binary with `COORDINATION=storage`,
//! sharing one Azurite and one simulated Defender tenant, as a scaled-out
//! function app does. Every test asserts what Defender received.

use std::{
    net::SocketAddr,
    process::Child,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::future::join_all;
use restrict_code_execution::{
    coordination::Coordinator,
    defender::models::Machine,
    simulator::{Fault, FaultKind, RecordedRequest, SimConfig, SimHandle, Simulator},
};
use serde_json::{Value, json};

use crate::{
    azurite::Azurite,
    handler_process::{Listening, start_listening},
};

pub const IDENTITY_HEADER: &str = "instances-identity-header";
pub const TOKEN: &str = "instances-access-token";

/// One instance: the handler as the Functions host starts it.
pub struct Instance {
    child: Child,
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    pub fn start(sim: &SimHandle, storage: &str, container: &str, extra: &[(&str, &str)]) -> Self {
        let mut env: Vec<(&str, String)> = vec![
            ("DEFENDER_API_URL", sim.url()),
            ("IDENTITY_ENDPOINT", sim.identity_endpoint()),
            ("IDENTITY_HEADER", IDENTITY_HEADER.to_owned()),
            ("COORDINATION", "storage".to_owned()),
            ("AzureWebJobsStorage", storage.to_owned()),
            ("COORDINATION_CONTAINER", container.to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let Listening { child, logs, port } = start_listening(&env, None);
        Self { child, port, logs }
    }

    /// `POST /api/restrict-code-execution` in forwarded mode.
    pub async fn post(&self, body: Value) -> (u16, Value, Option<String>) {
        let response = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/api/restrict-code-execution",
                self.port
            ))
            .header(
                "X-Azure-Functions-InvocationId",
                uuid::Uuid::new_v4().to_string(),
            )
            .json(&body)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .expect("the instance answered");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, retry_after)
    }

    /// The handler's log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// SIGKILL: no clean-up, the lease is left to expire.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A simulator with `n` healthy Windows 11 machines; their Entra device ids.
pub(crate) async fn tenant(n: usize, config: SimConfig) -> (SimHandle, Vec<String>) {
    let sim = Simulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            seed: false,
            identity_header: IDENTITY_HEADER.to_owned(),
            token: TOKEN.to_owned(),
            ..config
        },
    )
    .await
    .expect("simulator starts");
    let devices = (0..n)
        .map(|i| {
            let aad = format!("5b000000-0000-4000-8000-{i:012}");
            let machine: Machine = serde_json::from_value(json!({
                "id": format!("{:040x}", i + 1),
                "computerDnsName": format!("SCALED-{i}"),
                "aadDeviceId": aad,
                "healthStatus": "Active",
                "osPlatform": "Windows11",
                "lastSeen": "2026-11-28T08:00:00Z",
            }))
            .unwrap();
            sim.add_machine(machine);
            aad
        })
        .collect();
    (sim, devices)
}

pub(crate) fn posts(sim: &SimHandle) -> Vec<RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/api/"))
        .collect()
}

/// Each test here starts three handler processes: at most two such tests run
/// at once (the harness's default on two cores), so that the pauses they
/// rely on ("its lookup and lease take well under 3 s") hold when the other
/// coordination tests run alongside.
pub(crate) async fn turn() -> tokio::sync::SemaphorePermit<'static> {
    static TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    TURNS.acquire().await.unwrap()
}

fn three(sim: &SimHandle, azurite: &Azurite, container: &str) -> Vec<Instance> {
    let storage = azurite.connection_string();
    (0..3)
        .map(|_| Instance::start(sim, &storage, container, &[]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_spread_over_three_instances_makes_one_action_per_device_and_no_429() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let (sim, devices) = tenant(12, SimConfig::default()).await;
    let instances = three(&sim, azurite, "burst");

    // Each device's three duplicates land on three different instances.
    let answers = join_all(devices.iter().enumerate().flat_map(|(d, device)| {
        let instances = &instances;
        (0..3).map(move |k| instances[(d + k) % 3].post(json!({"deviceId": device})))
    }))
    .await;

    for (status, body, _) in &answers {
        assert!(matches!(status, 200 | 201), "{status} {body}");
    }
    assert_eq!(answers.iter().filter(|(s, _, _)| *s == 201).count(), 12);
    let actions = sim.actions();
    assert_eq!(actions.len(), 12, "one action per device");
    let mut machines: Vec<_> = actions.iter().map(|a| a.machine_id.clone()).collect();
    machines.sort();
    machines.dedup();
    assert_eq!(machines.len(), 12, "no device got two");
    assert_eq!(
        posts(&sim).len(),
        12,
        "one POST per device, from all instances together"
    );
    assert!(sim.requests().iter().all(|r| r.status != 429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restrict_on_one_instance_racing_a_release_on_another_makes_one_action_and_one_409() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let instances = three(&sim, azurite, "race");

    for round in 0..3 {
        let (restrict, release) = tokio::join!(
            instances[round % 3].post(json!({"deviceId": devices[0]})),
            instances[(round + 1) % 3].post(json!({"deviceId": devices[0], "release": true})),
        );
        if round == 0 {
            let mut statuses = [restrict.0, release.0];
            statuses.sort_unstable();
            assert_eq!(statuses, [201, 409], "{restrict:?} {release:?}");
        }
    }

    // Whatever the order, the first action stays pending and every later
    // request for either type is refused or coalesced.
    assert_eq!(sim.actions().len(), 1);
    assert_eq!(posts(&sim).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_holding_the_lease_delays_the_others_only_until_it_expires() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let mut instances = three(&sim, azurite, "killed");
    // The first instance's state read hangs: it holds the lease meanwhile.
    sim.inject(
        Fault::new("/api/machineactions", FaultKind::Delay { millis: 60_000 }).method("GET"),
    );
    let (victim_port, device) = (instances[0].port, devices[0].clone());
    let hanging = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{victim_port}/api/restrict-code-execution"
            ))
            .json(&json!({"deviceId": device}))
            .timeout(Duration::from_secs(4))
            .send()
            .await;
    });
    // Its lookup, lease and the start of its read take well under this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    instances[0].kill();
    let _ = hanging.await;

    let started = std::time::Instant::now();
    let (status, body, _) = instances[1].post(json!({"deviceId": devices[0]})).await;
    let waited = started.elapsed();

    assert_eq!(status, 201, "{body}");
    assert!(
        waited >= Duration::from_secs(5),
        "it waited for the dead instance's lease ({waited:?})"
    );
    assert!(waited <= Duration::from_secs(45), "{waited:?}");
    assert_eq!(sim.actions().len(), 1, "nothing duplicated");
    assert_eq!(posts(&sim).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_stopped_mid_run_answers_503_and_sends_nothing_then_recovers() {
    let _turn = turn().await;
    let mut azurite = Azurite::start();
    let port = azurite.port;
    let (sim, devices) = tenant(3, SimConfig::default()).await;
    let instances = three(&sim, &azurite, "outage");
    let (status, body, _) = instances[0].post(json!({"deviceId": devices[0]})).await;
    assert_eq!(status, 201, "{body}");

    azurite.stop();
    sim.clear_requests();
    let (status, body, retry_after) = instances[1].post(json!({"deviceId": devices[1]})).await;

    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "coordination_unavailable");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
    assert!(
        posts(&sim).is_empty(),
        "nothing was sent to Defender: {:?}",
        posts(&sim)
    );

    let azurite = Azurite::start_on(port);
    let (status, body, _) = instances[2].post(json!({"deviceId": devices[1]})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(posts(&sim).len(), 1);
    drop(azurite);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_whose_callers_all_hung_up_stops_waiting_for_the_lease_and_reads_nothing() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let instance = Instance::start(&sim, &azurite.connection_string(), "departed", &[]);
    // Another instance holds the machine's lease (its round is deciding).
    let other = Coordinator::new(&azurite.settings("departed"), Default::default()).unwrap();
    let lease = other
        .lock_machine(
            &format!("{:040x}", 1),
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();

    // The caller gives up while this instance's round waits for the lease.
    let hung_up = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/api/restrict-code-execution",
            instance.port
        ))
        .json(&json!({"deviceId": devices[0]}))
        .timeout(Duration::from_millis(1500))
        .send()
        .await;
    assert!(hung_up.is_err(), "the caller hung up: {hung_up:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    lease.release().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;

    let after_lookup: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/machineactions") || r.method == "POST")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        after_lookup.is_empty(),
        "nothing was read or sent for the departed caller: {after_lookup:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_waiting_on_another_instance_is_answered_from_its_handoff_without_a_read() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let storage = azurite.connection_string();
    let (a, b) = (
        Instance::start(&sim, &storage, "handoff", &[]),
        Instance::start(&sim, &storage, "handoff", &[]),
    );
    // Defender takes 2 s over A's state read: A holds the lease meanwhile,
    // and B's duplicate arrives before A's POST is sent.
    sim.inject(Fault::new("/api/machineactions", FaultKind::Delay { millis: 2000 }).method("GET"));
    let body = json!({"deviceId": devices[0]});
    let first = a.post(body.clone());
    let duplicate = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        b.post(body.clone()).await
    };
    let (first, duplicate) = tokio::join!(first, duplicate);

    assert_eq!(first.0, 201, "{}", first.1);
    assert_eq!(duplicate.0, 200, "{}", duplicate.1);
    assert_eq!(duplicate.1["outcome"], "already_pending");
    assert_eq!(duplicate.1["action"]["id"], first.1["action"]["id"]);
    let reads = |sim: &SimHandle| {
        sim.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.starts_with("/api/machineactions"))
            .count()
    };
    assert_eq!(
        reads(&sim),
        1,
        "only A read the machine's actions; B was answered from A's handoff"
    );

    // A request that arrives after that POST was sent reads for itself.
    let later = b.post(body).await;
    assert_eq!(later.0, 200, "{}", later.1);
    assert_eq!(reads(&sim), 2);
    assert_eq!(posts(&sim).len(), 1);
}
