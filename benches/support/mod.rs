//! What the end-to-end benchmarks share (`benches/e2e.rs`, `benches/fleet.rs`):
//! the `handler` binary cargo built for the run, started as the simulator and
//! as the custom handler on loopback, and the memory of a process.

// Each benchmark is its own crate and uses a part of this module.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The binary cargo built for this very run (bench profile = release settings).
pub const HANDLER: &str = env!("CARGO_BIN_EXE_handler");
/// The simulator's default `x-identity-header` secret.
pub const IDENTITY_HEADER: &str = "sim-identity-header";

pub type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `handler simulator --port 0 <args>`, and the port it printed.
pub fn spawn_simulator(args: &[&str]) -> Result<(Proc, u16)> {
    let mut child = Command::new(HANDLER)
        .args(["simulator", "--port", "0"])
        .args(args)
        .env_clear()
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no simulator stdout")?;
    let proc = Proc { child };
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let line = lines
            .next()
            .ok_or("the simulator exited before printing its URL")??;
        if let Some(url) = line.strip_prefix("Simulated Defender tenant at http://") {
            let addr: SocketAddr = url.trim().parse()?;
            break addr.port();
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((proc, port))
}

/// The custom handler on `port`, started the way the Functions host starts
/// it, pointed at the simulator on `sim_port`; `extra` settings last.
pub fn spawn_handler(sim_port: u16, port: u16, extra: &[(&str, &str)]) -> Result<Proc> {
    let child = handler_command(sim_port, port, extra)
        // The host reads these log lines; formatting them is part of the cost.
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Proc { child })
}

/// The command [`spawn_handler`] runs, for a caller that wants its stdout.
pub fn handler_command(sim_port: u16, port: u16, extra: &[(&str, &str)]) -> Command {
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let mut command = Command::new(HANDLER);
    command
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .env("DEFENDER_API_URL", &sim_url)
        .env("IDENTITY_ENDPOINT", format!("{sim_url}/_identity/token"))
        .env("IDENTITY_HEADER", IDENTITY_HEADER)
        .env("RUST_LOG", "info")
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Poll `GET /` the way the host does (but every 100 µs instead of 25 ms)
/// until it answers 200.
pub fn wait_ready(proc: &mut Proc, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ready_once(port) {
            return Ok(());
        }
        if let Some(status) = proc.child.try_wait()? {
            return Err(format!("the handler exited during start-up: {status}").into());
        }
        if Instant::now() > deadline {
            return Err("the handler did not answer GET / within 10 s".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn ready_once(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_nodelay(true);
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .ok_or_else(|| format!("{name} missing from /proc/{pid}/status"))?;
            Ok(line
                .trim_start_matches(name)
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()?)
        };
        Ok(Self {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

/// The 1-minute load average: other work on the machine skews every timing.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}
