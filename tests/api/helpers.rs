//! Test harness: a simulator in this process, the handler as a child process.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use restrict_code_execution::simulator::{RecordedRequest, SimConfig, SimHandle, Simulator};
use serde_json::Value;

pub use crate::host_emulator::HostEmulator;

pub const IDENTITY_HEADER: &str = "test-identity-header";
pub const TOKEN: &str = "test-access-token-3b1f";

/// A simulated tenant plus a running handler in front of it.
pub struct TestApp {
    pub sim: SimHandle,
    pub host: HostEmulator,
    handler: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Options for one test app.
pub struct AppOptions {
    pub sim: SimConfig,
    /// Extra environment for the handler (applied last, so it can override).
    pub env: Vec<(&'static str, String)>,
    /// A file descriptor limit for the handler (`ulimit -n`), to run it short of them.
    pub max_open_files: Option<u32>,
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
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let sim = Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), options.sim)
        .await
        .expect("simulator starts");
    let port = free_port();
    let mut env: Vec<(&'static str, String)> = vec![
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()),
        ("DEFENDER_API_URL", sim.url()),
        ("IDENTITY_ENDPOINT", sim.identity_endpoint()),
        ("IDENTITY_HEADER", IDENTITY_HEADER.to_owned()),
        ("TOKEN_TIMEOUT_SECONDS", "10".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    env.extend(options.env);
    let (handler, logs) = start_handler_with(&env, &[], options.max_open_files);
    let host = HostEmulator::new(port);
    host.wait_until_ready().await;
    TestApp {
        sim,
        host,
        handler,
        logs,
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

/// A free loopback port, picked the way the host picks one (bind :0, release).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/_identity/"))
            .collect()
    }

    /// Every line the handler printed so far (stdout and stderr).
    pub async fn logs(&self) -> Vec<String> {
        // Give the reader threads a moment to catch up with the pipe.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.logs.lock().unwrap().clone()
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
            .args(["-TERM", &self.handler.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Wait for the handler to exit.
    pub async fn exit_status(&mut self) -> std::process::ExitStatus {
        for _ in 0..200 {
            if let Some(status) = self.handler.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the handler did not exit within 5 s");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.handler.kill();
        let _ = self.handler.wait();
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
