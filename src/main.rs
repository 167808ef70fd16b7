//! `handler`: the binary the Azure Functions host starts (see host.json).
//!
//! Run `handler --help` for the commands; `handler --simulate` serves against
//! an embedded simulated Defender tenant.

use std::process::ExitCode;

use clap::Parser;
use restrict_code_execution::{cli, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    telemetry::init();
    cli::run(cli).await
}
