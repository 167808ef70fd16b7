//! Azurite, the storage emulator, as a child process serving its blob and
//! queue services on free loopback ports, with in-memory persistence.
//!
//! The pinned package is installed by `scripts/azurite.sh` (shared with
//! `.ci/run`) on first use, so `cargo test` works on a fresh machine with
//! Node 20 and npm. One `azurite` process serves both services (its table
//! service listens too, on a port the OS picks, unused). Tests that never
//! stop storage share one Azurite ([`Azurite::shared`], each in its own
//! container); a test that stops or restarts it, or needs other options,
//! starts its own, and dropping it kills the process.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use restrict_code_execution::coordination::{CoordinationSettings, StorageSettings};

/// The launcher of every service (`azurite`; the script prints the path of
/// `azurite-blob`, which sits beside it), installed once per test run.
fn launcher() -> &'static PathBuf {
    static LAUNCHER: OnceLock<PathBuf> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/azurite.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/azurite.sh");
        assert!(
            out.status.success(),
            "scripts/azurite.sh failed: is npm installed?"
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).with_file_name("azurite")
    })
}

pub struct Azurite {
    child: Option<Child>,
    /// The blob service's port.
    pub port: u16,
    /// The queue service's port.
    pub queue_port: u16,
    workspace: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Azurite {
    /// Start on a free port.
    pub fn start() -> Self {
        Self::start_with_options(&[])
    }

    /// The Azurite shared by the tests that never stop it, started on first
    /// use. A static is never dropped, so it is started under a watchdog
    /// shell that kills it once this test process is gone (its stdin, a pipe
    /// from us, closes).
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<Azurite> = OnceLock::new();
        SHARED.get_or_init(|| Self::spawn(free_port(), free_port(), &[], true))
    }

    /// Start with the blob service on `port` (a restart after [`Self::stop`]
    /// reuses it) and the queue service on a free port.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, free_port(), &[])
    }

    /// Start on free ports with extra options (`--cert`, `--oauth basic`, …).
    pub fn start_with_options(extra: &[&std::ffi::OsStr]) -> Self {
        Self::start_with(free_port(), free_port(), extra)
    }

    fn start_with(port: u16, queue_port: u16, extra: &[&std::ffi::OsStr]) -> Self {
        Self::spawn(port, queue_port, extra, false)
    }

    fn spawn(port: u16, queue_port: u16, extra: &[&std::ffi::OsStr], watchdog: bool) -> Self {
        let workspace = std::env::temp_dir().join(format!("azurite-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&workspace).unwrap();
        let mut command = if watchdog {
            // `sh` runs Azurite in the background (its stdin /dev/null) and
            // kills it when `cat` sees the end of our pipe.
            let mut command = Command::new("sh");
            command
                .args(["-c", "\"$@\" & child=$!; cat >/dev/null; kill $child", "sh"])
                .arg(launcher())
                .stdin(Stdio::piped());
            command
        } else {
            let mut command = Command::new(launcher());
            command.stdin(Stdio::null());
            command
        };
        let child = command
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(port.to_string())
            .args(["--queueHost", "127.0.0.1", "--queuePort"])
            .arg(queue_port.to_string())
            .args(["--tableHost", "127.0.0.1", "--tablePort", "0"])
            .args([
                "--inMemoryPersistence",
                // No --skipApiVersionCheck: the pinned Azurite knows the API
                // version the SDK sends, and refuses one it does not, as
                // Azure does.
                "--disableTelemetry",
                "--silent",
            ])
            .args(extra)
            // Anything Azurite writes despite in-memory persistence lands here.
            .current_dir(&workspace)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start azurite");
        let mut azurite = Self {
            child: Some(child),
            port,
            queue_port,
            workspace,
        };
        azurite.wait_ready();
        azurite
    }

    fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(60);
        for port in [self.port, self.queue_port] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                assert!(exited.is_none(), "Azurite exited: {exited:?}");
                assert!(Instant::now() < until, "Azurite did not listen on {addr}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Kill the process (storage "goes away").
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `AzureWebJobsStorage` as the host would have it for this Azurite:
    /// Azurite's well-known account and key, on our ports.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={};\
             BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1;\
             QueueEndpoint=http://127.0.0.1:{}/devstoreaccount1;",
            restrict_code_execution::coordination::settings::AZURITE_KEY,
            self.port,
            self.queue_port
        )
    }

    /// Storage settings parsed the way the service parses them.
    pub fn settings(&self, container: &str) -> StorageSettings {
        let (conn, container) = (self.connection_string(), container.to_owned());
        let lookup = move |name: &str| match name {
            "COORDINATION" => Some("storage".to_owned()),
            "AzureWebJobsStorage" => Some(conn.clone()),
            "COORDINATION_CONTAINER" => Some(container.clone()),
            _ => None,
        };
        match CoordinationSettings::from_lookup(lookup).unwrap() {
            CoordinationSettings::Storage(settings) => settings,
            CoordinationSettings::Local => unreachable!(),
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.workspace);
    }
}
