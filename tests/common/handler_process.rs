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
