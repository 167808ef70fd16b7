//! Test harness: a simulator in this process, and the handler either as a
//! child process started as the Functions host starts it ([`spawn_app`]), or
//! in this process ([`spawn_in_process`]): the library's own composition root
//! and service, called without a socket. The binary is for what only a
//! process shows (its log lines, the managed identity path, signals,
//! connections); routing, validation and answers run in-process.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use restrict_code_execution::{
    config::Settings,
    simulator::{RecordedRequest, SimConfig, SimHandle, Simulator},
    startup::{self, Backend},
};
use serde_json::Value;

pub use crate::host_emulator::{HostEmulator, HttpMode};

pub const IDENTITY_HEADER: &str = "test-identity-header";
pub const TOKEN: &str = "test-access-token-3b1f";

/// A simulated tenant plus a running handler in front of it.
pub struct TestApp {
    pub sim: SimHandle,
    pub host: HostEmulator,
    /// The child process and its output; `None` in-process.
    process: Option<(Child, Arc<Mutex<Vec<String>>>)>,
}

/// Options for one test app.
pub struct AppOptions {
    pub sim: SimConfig,
    /// Extra environment for the handler (applied last, so it can override).
    pub env: Vec<(&'static str, String)>,
    /// A file descriptor limit for the handler (`ulimit -n`), to run it short of them.
    pub max_open_files: Option<u32>,
    /// How the host passes HTTP requests on: the emulator's mode, and the
    /// `host.json` the handler reads (in `FUNCTIONS_APP_ROOT_PATH`, as the
    /// host sets it).
    pub http_mode: HttpMode,
}

/// An app root holding the `host.json` of `mode`, for `FUNCTIONS_APP_ROOT_PATH`.
fn app_root(mode: HttpMode) -> String {
    let dir = std::env::temp_dir().join(format!("rce-app-root-{mode:?}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("host.json");
    if !file.exists() {
        // Written once per mode, under a unique name then renamed, so tests
        // running at once never read half a file.
        let temp = dir.join(format!("host.json.{}", uuid::Uuid::new_v4()));
        std::fs::write(&temp, mode.host_json().to_string()).unwrap();
        std::fs::rename(&temp, &file).unwrap();
    }
    dir.to_string_lossy().into_owned()
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            sim: SimConfig {
                identity_header: IDENTITY_HEADER.to_owned(),
                token: TOKEN.to_owned(),
                ..SimConfig::default()
            },
            env: Vec::new(),
            max_open_files: None,
            http_mode: HttpMode::for_tests(),
        }
    }
}

/// A test app built from the defaults: `app().sim(|s| ...).env(NAME, value)`,
/// then [`Fixture::in_process`] or [`Fixture::binary`].
pub fn app() -> Fixture {
    Fixture(AppOptions::default())
}

pub struct Fixture(AppOptions);

impl Fixture {
    /// Change the simulated tenant's configuration.
    pub fn sim(mut self, change: impl FnOnce(&mut SimConfig)) -> Self {
        change(&mut self.0.sim);
        self
    }

    /// An app setting, as the handler reads it from its environment.
    pub fn env(mut self, name: &'static str, value: impl ToString) -> Self {
        self.0.env.push((name, value.to_string()));
        self
    }

    /// The host passes HTTP requests on in `mode` (by default the shipped
    /// host.json's, see [`HttpMode::for_tests`]).
    pub fn http_mode(mut self, mode: HttpMode) -> Self {
        self.0.http_mode = mode;
        self
    }

    pub async fn in_process(self) -> TestApp {
        spawn_in_process_with(self.0).await
    }

    pub async fn binary(self) -> TestApp {
        spawn_app_with(self.0).await
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let sim = Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), options.sim)
        .await
        .expect("simulator starts");
    let mut env: Vec<(&'static str, String)> = vec![
        ("DEFENDER_API_URL", sim.url()),
        ("IDENTITY_ENDPOINT", sim.identity_endpoint()),
        ("IDENTITY_HEADER", IDENTITY_HEADER.to_owned()),
        ("TOKEN_TIMEOUT_SECONDS", "10".to_owned()),
        ("RUST_LOG", "info".to_owned()),
        ("FUNCTIONS_APP_ROOT_PATH", app_root(options.http_mode)),
    ];
    env.extend(options.env);
    let crate::handler_process::Listening { child, logs, port } =
        crate::handler_process::start_listening(&env, options.max_open_files);
    let host = HostEmulator::new(port).with_mode(options.http_mode);
    host.wait_until_ready().await;
    TestApp {
        sim,
        host,
        process: Some((child, logs)),
    }
}

pub async fn spawn_in_process() -> TestApp {
    spawn_in_process_with(AppOptions::default()).await
}

/// The service in this process: the settings read from `options.env` as the
/// binary reads its environment, and [`startup::prepare`] with a simulated
/// tenant (which takes the simulator's fixed token instead of going through
/// the managed identity endpoint; that path is tested on the binary).
pub async fn spawn_in_process_with(options: AppOptions) -> TestApp {
    assert!(
        options.max_open_files.is_none(),
        "a file descriptor limit needs the binary (spawn_app_with)"
    );
    let mut env: HashMap<String, String> = HashMap::from([
        ("TOKEN_TIMEOUT_SECONDS".to_owned(), "10".to_owned()),
        (
            "FUNCTIONS_APP_ROOT_PATH".to_owned(),
            app_root(options.http_mode),
        ),
    ]);
    env.extend(options.env.into_iter().map(|(k, v)| (k.to_owned(), v)));
    let settings = Settings::from_map(&env).expect("valid settings");
    let (state, sim) = startup::prepare(settings, Backend::Simulated(Box::new(options.sim)))
        .await
        .expect("the service starts");
    TestApp {
        sim: sim.expect("a simulated tenant"),
        host: HostEmulator::in_process(startup::app(state)).with_mode(options.http_mode),
        process: None,
    }
}

/// Start the handler binary the way the Functions host does: environment
/// only, no arguments, stdout captured.
pub fn start_handler(env: &[(&str, String)], args: &[&str]) -> (Child, Arc<Mutex<Vec<String>>>) {
    start_handler_with(env, args, None)
}

/// [`start_handler`], optionally under a file descriptor limit (through
/// `sh -c 'ulimit -n N; exec handler'`, so the handler itself is the child).
pub use crate::handler_process::start_handler_with;

/// A free loopback port, picked the way the host picks one (bind `:0`, release).
pub use crate::handler_process::free_port;

impl TestApp {
    /// Add `n` healthy Windows 11 machines; returns their Entra device ids.
    pub fn add_fleet(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let aad = format!("5a000000-0000-4000-8000-{i:012}");
                let machine: restrict_code_execution::defender::models::Machine =
                    serde_json::from_value(serde_json::json!({
                        "id": format!("{i:040x}"),
                        "computerDnsName": format!("FLEET-{i}"),
                        "aadDeviceId": aad,
                        "healthStatus": "Active",
                        "osPlatform": "Windows11",
                        "onboardingStatus": "Onboarded",
                        "lastSeen": "2026-11-28T08:00:00Z",
                    }))
                    .unwrap();
                self.sim.add_machine(machine);
                aad
            })
            .collect()
    }

    /// Requests Defender received (the /api surface), in order.
    pub fn defender_requests(&self) -> Vec<RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/api/"))
            .collect()
    }

    /// Defender's requests in order, as "METHOD last-path-segment".
    pub fn call_kinds(&self) -> Vec<String> {
        self.defender_requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path.rsplit('/').next().unwrap()))
            .collect()
    }

    /// Requests the identity endpoint received.
    pub fn token_requests(&self) -> Vec<RecordedRequest> {
        self.process();
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/_identity/"))
            .collect()
    }

    /// Every line the handler printed so far (stdout and stderr).
    pub async fn logs(&self) -> Vec<String> {
        // Give the reader threads a moment to catch up with the pipe.
        let (_, logs) = self.process();
        tokio::time::sleep(Duration::from_millis(100)).await;
        logs.lock().unwrap().clone()
    }

    /// The child process: what only the binary has (its output, its token
    /// requests through managed identity, signals). An in-process app takes
    /// the simulator's fixed token and its logs go nowhere, so asking it
    /// would make such an assertion vacuous.
    fn process(&self) -> &(Child, Arc<Mutex<Vec<String>>>) {
        self.process
            .as_ref()
            .expect("only the binary has process logs and token requests: use spawn_app")
    }

    /// The JSON log lines with a given message.
    pub async fn log_events(&self, message: &str) -> Vec<Value> {
        self.logs()
            .await
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }
}

impl TestApp {
    /// A restrict or release in forwarded mode, as a caller sends it.
    pub async fn restrict(&self, body: &Value) -> crate::host_emulator::ClientResponse {
        self.host
            .forwarded(&crate::host_emulator::CallerRequest::json(body.to_string()))
            .await
    }
}

impl TestApp {
    /// Send SIGTERM, as the platform does when it stops an instance.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.process().0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Wait for the handler to exit.
    pub async fn exit_status(&mut self) -> std::process::ExitStatus {
        let (handler, _) = self
            .process
            .as_mut()
            .expect("only the binary exits: use spawn_app");
        for _ in 0..200 {
            if let Some(status) = handler.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the handler did not exit within 5 s");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some((handler, _)) = &mut self.process {
            let _ = handler.kill();
            let _ = handler.wait();
        }
        self.sim.shutdown();
    }
}

/// `POST /api/restrict-code-execution` in forwarded mode, as a caller sends it.
pub async fn post(app: &TestApp, body: Value) -> crate::host_emulator::ClientResponse {
    app.restrict(&body).await
}

/// The POSTs Defender received, in order.
pub fn posts(app: &TestApp) -> Vec<RecordedRequest> {
    app.defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect()
}
