//! The command line: serve (what the Functions host runs), the standalone
//! simulator, and one-shot invocations.

use std::{net::SocketAddr, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::{
    config::Settings,
    host::{
        functions::{self, Function},
        invocation::Invocation,
    },
    simulator::{SimConfig, SimHandle, Simulator},
    startup::{self, Backend, StartupError},
    telemetry,
};

/// Restrict or release app execution on devices through Microsoft Defender for Endpoint.
///
/// Without a command, serves the Azure Functions custom handler (what the
/// Functions host runs). Settings come from the environment; see the README.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the custom handler (the default).
    Serve(ServeArgs),
    /// Run the simulated Defender tenant alone, for testing a Logic App or webhook.
    Simulator(SimulatorArgs),
    /// Run one invocation from the command line and print the JSON answer.
    Invoke(InvokeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Use an embedded simulated Defender tenant instead of the real API.
    #[arg(long)]
    simulate: bool,
    /// Port to listen on (default: FUNCTIONS_CUSTOMHANDLER_PORT, else 3000).
    #[arg(long)]
    port: Option<u16>,
    /// With --simulate: the simulated clock's speed (10 makes actions finish ten times faster).
    #[arg(long, default_value_t = 1.0, requires = "simulate")]
    sim_speed: f64,
    /// With --simulate: turn the simulated tenant's rate limits off.
    #[arg(long, requires = "simulate")]
    sim_no_rate_limits: bool,
}

#[derive(Debug, Args)]
struct SimulatorArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8081)]
    port: u16,
    /// Simulated clock speed: 10 makes actions finish ten times faster.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Turn Defender's per-endpoint rate limits (100/min, 1500/h) off.
    #[arg(long)]
    no_rate_limits: bool,
}

#[derive(Debug, Args)]
struct InvokeArgs {
    /// Entra device id (GUID) or 40-hex Defender machine id.
    #[arg(long)]
    device_id: String,
    /// Lift the restriction instead of applying it.
    #[arg(long)]
    release: bool,
    /// Reason recorded in Defender.
    #[arg(long)]
    comment: Option<String>,
    /// Who asked, for the audit trail.
    #[arg(long)]
    caller: Option<String>,
    /// Run against an embedded simulated Defender tenant.
    #[arg(long)]
    simulate: bool,
}

impl Cli {
    /// `handler invoke` prints only its answer on stdout (`handler invoke … |
    /// jq` works); every other command logs there, for the Functions host.
    pub fn log_target(&self) -> telemetry::LogTarget {
        match self.command {
            Some(Command::Invoke(_)) => telemetry::LogTarget::Stderr,
            _ => telemetry::LogTarget::Stdout,
        }
    }
}

/// Run the command line. Exit codes: 0 success; 1 a failure (startup, or an
/// invocation answered 5xx); 2 an invocation answered 4xx.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Simulator(args)) => simulator(args).await,
        Some(Command::Invoke(args)) => return invoke(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // stderr: the host logs it at Error level and shows it on restart.
            eprintln!("error: {e}");
            tracing::error!(error = %e, "handler stopped");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), StartupError> {
    let settings = Settings::from_env()?;
    let port = args.port.unwrap_or(settings.port);
    let read_timeout = settings.http_read_timeout;
    let http_mode = settings.http_mode;
    let backend = if args.simulate {
        Backend::Simulated(Box::new(sim_config(
            args.sim_speed,
            args.sim_no_rate_limits,
        )))
    } else {
        Backend::Real
    };
    let (state, sim) = startup::prepare(settings, backend).await?;
    let listener = startup::bind(port).await?;
    let addr = listener.local_addr().map_err(|source| StartupError::Bind {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        source,
    })?;
    tracing::info!(
        address = %addr,
        simulate = args.simulate,
        // Which host.json mode the public URLs are built for (docs/http-modes.md).
        http_mode = http_mode.as_str(),
        "listening"
    );
    if let Some(sim) = &sim {
        println!("{}", simulate_banner(sim, addr));
    }
    startup::serve(listener, state, read_timeout).await
}

async fn simulator(args: SimulatorArgs) -> Result<(), StartupError> {
    let config = sim_config(args.speed, args.no_rate_limits);
    let sim = Simulator::start(SocketAddr::from(([127, 0, 0, 1], args.port)), config)
        .await
        .map_err(StartupError::Simulator)?;
    println!("Simulated Defender tenant at {}", sim.url());
    println!("{}", sim.banner());
    println!(
        "Point the handler at it with DEFENDER_API_URL={} IDENTITY_ENDPOINT={} IDENTITY_HEADER={}",
        sim.url(),
        sim.identity_endpoint(),
        SimConfig::default().identity_header
    );
    let _ = tokio::signal::ctrl_c().await;
    sim.shutdown();
    Ok(())
}

async fn invoke(args: InvokeArgs) -> ExitCode {
    let backend = if args.simulate {
        Backend::Simulated(Box::default())
    } else {
        Backend::Real
    };
    let prepared = async { startup::prepare(Settings::from_env()?, backend).await };
    let (state, _sim) = match prepared.await {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let payload = json!({
        "deviceId": args.device_id,
        "release": args.release,
        "comment": args.comment,
        "callerName": args.caller,
    });
    let invocation = Invocation {
        id: uuid::Uuid::new_v4().to_string(),
        method: Function::Restrict.method().to_string(),
        headers: Default::default(),
        query: Vec::new(),
        params: Default::default(),
        body: payload.to_string().into_bytes(),
        url: None,
    };
    let reply = functions::invoke(&state, Function::Restrict, invocation).await;
    println!("{}", reply.body);
    match reply.status.as_u16() {
        200..=299 => ExitCode::SUCCESS,
        400..=499 => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// The simulated tenant the flags ask for (`--sim-speed` and
/// `--sim-no-rate-limits` with `--simulate`, `--speed` and `--no-rate-limits`
/// for `handler simulator`).
fn sim_config(speed: f64, no_rate_limits: bool) -> SimConfig {
    let default = SimConfig::default();
    SimConfig {
        speed,
        rate_limits: default.rate_limits.filter(|_| !no_rate_limits),
        ..default
    }
}

fn simulate_banner(sim: &SimHandle, addr: SocketAddr) -> String {
    let device = crate::simulator::seed::ALPHA_AAD_DEVICE_ID;
    let url = format!("http://{addr}{}", Function::Restrict.route());
    let body = |release: bool| json!({"deviceId": device, "release": release, "callerName": "you@example.com"});
    let envelope = json!({"Data": {"req": {"Body": body(false).to_string()}}, "Metadata": {}});
    format!(
        "Simulated Defender tenant at {sim_url} (a fresh, in-memory tenant; nothing leaves this machine)\n\
         {banner}\n\
         Service listening on http://{addr}\n\n\
         Restrict DESKTOP-ALPHA:\n  curl -s -X POST {url} -H 'Content-Type: application/json' -d '{restrict}'\n\
         Release it again once the restriction has finished (about 5 s; until then the answer is 409\n  conflicting_action_pending, unless you add \"cancelPending\": true):\n  curl -s -X POST {url} -H 'Content-Type: application/json' -d '{release}'\n\
         The same in payload mode (the host's envelope):\n  curl -s -X POST http://{addr}{payload} -H 'Content-Type: application/json' -d '{envelope}'\n\
         Watch the action in the simulator:\n  curl -s {sim_url}/_sim/actions\n",
        sim_url = sim.url(),
        banner = sim.banner(),
        payload = Function::Restrict.payload_route(),
        restrict = body(false),
        release = body(true),
    )
}
