//! `handler invoke` runs one invocation from the command line.

use std::process::Command;

use serde_json::Value;

/// Runs the handler with logging on, as a user would, and reads the whole of
/// stdout as one JSON answer (what `handler invoke … | jq` needs).
fn handler(args: &[&str]) -> (i32, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(args)
        .env_clear()
        .env("RUST_LOG", "info")
        .output()
        .expect("handler runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not only the answer ({e}): {stdout}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invocation"),
        "the logs went to stderr: {stderr}"
    );
    (output.status.code().unwrap_or(-1), json)
}

#[test]
fn invoke_restricts_a_simulated_device_and_prints_the_answer() {
    let (code, answer) = handler(&[
        "invoke",
        "--simulate",
        "--device-id",
        crate::restrict::ALPHA_AAD,
        "--caller",
        "cli-user",
    ]);

    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["outcome"], "requested");
    assert_eq!(answer["action"]["type"], "RestrictCodeExecution");
    assert_eq!(
        answer["action"]["requestorComment"],
        "Possible security risk. (requested by cli-user)"
    );
}

#[test]
fn invoke_release_and_invalid_input_exit_codes() {
    let (code, answer) = handler(&[
        "invoke",
        "--simulate",
        "--release",
        "--device-id",
        crate::restrict::ALPHA_AAD,
    ]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["action"]["type"], "UnrestrictCodeExecution");

    let (code, answer) = handler(&["invoke", "--simulate", "--device-id", "DESKTOP-1"]);
    assert_eq!(code, 2, "{answer}");
    assert_eq!(answer["code"], "invalid_request");
}
