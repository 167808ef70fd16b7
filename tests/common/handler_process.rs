//! Starting the `handler` binary as the Functions host does (environment
//! only, output captured line by line), shared by the test binaries.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

/// Start the handler with `env` (and nothing else but `PATH`), optionally
/// under a lower open-file limit; its stdout and stderr lines are collected.
pub fn start_handler_with(
    env: &[(&str, String)],
    args: &[&str],
    max_open_files: Option<u32>,
) -> (Child, Arc<Mutex<Vec<String>>>) {
    let handler = env!("CARGO_BIN_EXE_handler");
    let mut command = match max_open_files {
        None => Command::new(handler),
        Some(limit) => {
            let mut command = Command::new("sh");
            command.args([
                "-c",
                &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
                handler,
            ]);
            command
        }
    };
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("handler starts");
    let logs = Arc::new(Mutex::new(Vec::new()));
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                logs.lock().unwrap().push(line);
            }
        });
    }
    (child, logs)
}

/// A handler that has bound its port: the child, its output, and the port.
pub struct Listening {
    pub child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub port: u16,
}

/// Start the handler on a free port (`FUNCTIONS_CUSTOMHANDLER_PORT` is added
/// to `env`) and return once it has logged that it is listening.
///
/// A port picked by binding `:0` and releasing it can be taken by another
/// test's socket before the handler binds it; the handler then exits, and a
/// connection to the port would reach that other socket. So readiness is the
/// handler's own "listening" line, not a successful connect, and a handler
/// that exited before listening is started again on a fresh port.
pub fn start_listening(env: &[(&str, String)], max_open_files: Option<u32>) -> Listening {
    const ATTEMPTS: usize = 5;
    let mut last_logs = Vec::new();
    for _ in 0..ATTEMPTS {
        let port = free_port();
        let mut with_port = env.to_vec();
        with_port.push(("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()));
        let (mut child, logs) = start_handler_with(&with_port, &[], max_open_files);
        let bound = format!("127.0.0.1:{port}");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let listening = logs
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains("listening") && line.contains(&bound));
            if listening {
                return Listening { child, logs, port };
            }
            if let Ok(Some(_)) = child.try_wait() {
                // Give the reader threads a moment to collect the last lines.
                std::thread::sleep(std::time::Duration::from_millis(50));
                last_logs = logs.lock().unwrap().clone();
                break;
            }
            if std::time::Instant::now() > until {
                let _ = child.kill();
                panic!(
                    "the handler did not listen within 30 s: {:?}",
                    logs.lock().unwrap()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    panic!("the handler exited before listening {ATTEMPTS} times; last output: {last_logs:?}");
}

/// A free loopback port, picked the way the host picks one (bind `:0`, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
