//! `handler`: the binary the Azure Functions host starts (see host.json).
//!
//! Run `handler --help` for the commands; `handler --simulate` serves against
//! an embedded simulated Defender tenant.

use std::process::ExitCode;

use clap::Parser;
use restrict_code_execution::{cli, telemetry};

// One worker thread: the handler waits on Defender (whose rate limits cap it
// far below one core's worth of work), and a second worker only adds
// cross-thread wake-ups. Measured with `cargo bench --bench e2e`
// (docs/benchmarks.md): about a quarter less CPU per invocation, more
// throughput and a lower latency tail than the default of one per CPU.
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    telemetry::init(cli.log_target());
    cli::run(cli).await
}
