//! Building the service from settings ([`prepare`], the one composition
//! root, for real or simulated use) and serving it.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::net::TcpListener;

use crate::{
    config::{ConfigError, Settings},
    coordination::{
        CoordinationError, CoordinationSettings, Coordinator, CoordinatorOptions,
        queue::{Delivery, DeliveryRules, LocalQueue, MessageQueue, MissingQueue},
        records::{MemoryRecords, Records},
    },
    defender::{
        DefenderClient, DefenderClientOptions,
        auth::{CredentialOptions, TokenError, TokenSource},
        budget::{CallBudget, RateBudget},
        client::RetryPolicy,
    },
    host::{app_state::AppState, error::ApiError, routes, server},
    service::{
        callbacks::Outbox,
        jobs::{DeviceProblem, Explain, Jobs, QUEUE_NAME},
        reconcile::{ReconcileSettings, Reconciler},
        restrict::Restrictor,
        service_error::ServiceError,
    },
    simulator::{SimConfig, SimHandle, Simulator},
};

/// Why the service could not start. The host restarts a handler that exits
/// non-zero, and shows its last stderr lines.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot build the credential: {0}")]
    Credential(#[from] TokenError),
    #[error("cannot set up coordination through storage: {0}")]
    Coordination(#[from] CoordinationError),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot start the simulator: {0}")]
    Simulator(io::Error),
    #[error("server error: {0}")]
    Serve(io::Error),
}

/// Where Defender is: the configured API with the configured credential, or
/// an embedded simulated tenant (`--simulate`) that takes its fixed token.
#[derive(Debug, Clone)]
pub enum Backend {
    Real,
    /// Boxed: a tenant's configuration is large beside `Real`.
    Simulated(Box<SimConfig>),
}

/// The one pooled HTTP client for Defender and the identity endpoint.
pub fn http_client(settings: &Settings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // A ceiling for every request, the identity endpoint's included;
        // Defender calls also set their own per-call timeout.
        .timeout(settings.defender_timeout.max(settings.token_timeout))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!(
            "restrict-code-execution/",
            env!("CARGO_PKG_VERSION")
        ))
        .build()
}

impl From<&Settings> for CredentialOptions {
    fn from(settings: &Settings) -> Self {
        Self {
            credential: settings.credential.clone(),
            authority_host: settings.authority_host.clone(),
            scope: settings.token_scope.clone(),
            timeout: settings.token_timeout,
        }
    }
}

/// The composition root: everything an invocation needs, against real
/// Defender or a simulated tenant started here. The simulator, when there is
/// one, runs as long as the returned handle is kept.
pub async fn prepare(
    mut settings: Settings,
    backend: Backend,
) -> Result<(AppState, Option<SimHandle>), StartupError> {
    let http = http_client(&settings)?;
    let (tokens, sim) = match backend {
        Backend::Real => (
            TokenSource::new(CredentialOptions::from(&settings), http.clone())?,
            None,
        ),
        Backend::Simulated(config) => {
            let tokens = TokenSource::fixed(&config.token, settings.token_timeout);
            let sim = Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), *config)
                .await
                .map_err(StartupError::Simulator)?;
            settings.api_url = url::Url::parse(&sim.url()).map_err(|e| {
                StartupError::Simulator(io::Error::other(format!("simulator URL: {e}")))
            })?;
            (tokens, Some(sim))
        }
    };
    tracing::info!(
        credential = tokens.description(),
        api_url = %settings.api_url,
        cloud = settings.cloud.as_str(),
        identity_endpoint_set = std::env::var_os("IDENTITY_ENDPOINT").is_some(),
        "Defender client configured"
    );
    // With COORDINATION=storage, the machine rounds hold blob leases and
    // every call draws from the budget all instances share.
    let coordinator = match &settings.coordination {
        CoordinationSettings::Local => None,
        CoordinationSettings::Storage(storage) => Some(Arc::new(Coordinator::new(
            storage,
            CoordinatorOptions {
                per_minute: settings.rate_limit_per_minute,
                per_hour: settings.rate_limit_per_hour,
                clock_speed: settings.rate_clock_speed,
                ..CoordinatorOptions::default()
            },
        )?)),
    };
    let budget: Arc<dyn CallBudget> = match &coordinator {
        Some(coordinator) => coordinator.clone(),
        None => Arc::new(
            RateBudget::new(settings.rate_limit_per_minute, settings.rate_limit_per_hour)
                .with_clock_speed(settings.rate_clock_speed),
        ),
    };
    let client = DefenderClient::new(
        settings.api_url.clone(),
        tokens,
        Some(DefenderClientOptions {
            http,
            timeout: settings.defender_timeout,
            budget,
            retry: RetryPolicy::default(),
            page_top: settings.page_size,
        }),
    );
    let restrictor = Restrictor::new(
        client.clone(),
        settings.comment_include_caller,
        settings.machine_cache,
        coordinator.clone(),
    )
    .with_fleet_view_max_age(settings.fleet_view_max_age);
    let jobs = jobs(
        &settings,
        restrictor.clone(),
        client.clone(),
        coordinator.as_deref(),
    )?;
    // Pending callbacks live beside the job records: blobs in the storage
    // account with `COORDINATION=storage`, this process's memory otherwise.
    let callback_records: Arc<dyn Records> = match coordinator.as_deref() {
        Some(coordinator) => Arc::new(coordinator.records()),
        None => Arc::new(MemoryRecords::new()),
    };
    let callbacks = Outbox::new(
        callback_records,
        settings.callbacks.clone(),
        restrictor.clone(),
        Some(jobs.clone()),
    );
    // The reconciler delivers the due callbacks on each of its runs.
    let reconciler = reconciler(
        &settings,
        restrictor.clone(),
        client,
        coordinator.as_deref(),
        callbacks.clone(),
    );
    jobs.keep_restrictions(reconciler.restrictions().clone());
    let state = AppState::new(
        restrictor,
        settings.request_timeout,
        settings.allowed_caller_roles.clone(),
    )
    .with_stale_pending(settings.stale_pending)
    .with_jobs(jobs)
    .with_reconciler(reconciler)
    .with_portal(settings.cloud.portal())
    .with_http_mode(settings.http_mode)
    .with_callbacks(callbacks);
    Ok((state, sim))
}

/// How long one job-worker invocation runs devices: well inside the host's
/// `functionTimeout` (5 minutes in host.json), which restarts the handler
/// when an invocation outlives it.
const JOB_WORK_TIME: Duration = Duration::from_secs(120);

/// Containment jobs: records and messages in the storage account with
/// `COORDINATION=storage`; otherwise in this process, its in-process queue
/// delivering to the same worker and poison functions as the host would.
fn jobs(
    settings: &Settings,
    restrictor: Restrictor,
    client: DefenderClient,
    coordinator: Option<&Coordinator>,
) -> Result<Jobs, StartupError> {
    let work_time = JOB_WORK_TIME.min(settings.request_timeout);
    let explain: Arc<Explain> = Arc::new(|error: &ServiceError| {
        let error = ApiError::from(error.clone());
        DeviceProblem {
            code: error.code().to_owned(),
            detail: error.problem("").detail,
        }
    });
    match (&settings.coordination, coordinator) {
        (CoordinationSettings::Storage(storage), Some(coordinator)) => {
            // Without a queue endpoint only jobs are unavailable (503 naming
            // the setting); single requests run as before.
            let queue: Arc<dyn MessageQueue> =
                match coordinator.queue(storage, QUEUE_NAME, Duration::from_secs(10)) {
                    Ok(queue) => Arc::new(queue),
                    Err(error) => {
                        tracing::warn!(error = %error, "containment jobs cannot send messages");
                        Arc::new(MissingQueue(error))
                    }
                };
            Ok(Jobs::new(
                restrictor,
                client,
                Arc::new(coordinator.records()),
                queue,
                work_time,
                explain,
            )
            .with_budget(
                settings.rate_limit_per_minute,
                settings.rate_limit_per_hour,
                settings.rate_clock_speed,
            ))
        }
        _ => {
            let queue = LocalQueue::new(DeliveryRules::default());
            let jobs = Jobs::new(
                restrictor,
                client,
                Arc::new(MemoryRecords::new()),
                Arc::new(queue.clone()),
                work_time,
                explain,
            )
            .with_budget(
                settings.rate_limit_per_minute,
                settings.rate_limit_per_hour,
                settings.rate_clock_speed,
            );
            let (worker, poison) = (jobs.clone(), jobs.clone());
            queue.start(
                Arc::new(move |delivery: Delivery| {
                    let jobs = worker.clone();
                    Box::pin(async move {
                        jobs.work(&delivery.text, delivery.dequeue_count)
                            .await
                            .map_err(|e| e.0)
                    })
                }),
                Arc::new(move |delivery: Delivery| {
                    let jobs = poison.clone();
                    Box::pin(async move { jobs.poison(&delivery.text).await.map_err(|e| e.0) })
                }),
            );
            Ok(jobs)
        }
    }
}

/// How long one reconcile run may take: well inside `functionTimeout`.
const RECONCILE_RUN_TIME: Duration = Duration::from_secs(120);

/// The reconciler: its records in the storage account with
/// `COORDINATION=storage`, where the host's timer runs it; otherwise in this
/// process's memory, run here every `RECONCILE_INTERVAL_SECONDS` (no host
/// runs a timer for `--simulate` or `COORDINATION=local`).
fn reconciler(
    settings: &Settings,
    restrictor: Restrictor,
    client: DefenderClient,
    coordinator: Option<&Coordinator>,
    callbacks: Outbox,
) -> Reconciler {
    let options = ReconcileSettings {
        restricted_tag: settings.restricted_tag.clone(),
        tag_every: time::Duration::try_from(settings.tag_reconcile)
            .unwrap_or(time::Duration::minutes(15)),
        budget_percent: settings.reconcile_budget_percent,
        per_hour: settings.rate_limit_per_hour,
        run_time: RECONCILE_RUN_TIME.min(settings.request_timeout),
    };
    match coordinator {
        Some(coordinator) => Reconciler::new(
            restrictor,
            client,
            Arc::new(coordinator.records()),
            false,
            options,
        )
        .with_callbacks(callbacks),
        None => {
            let reconciler = Reconciler::new(
                restrictor,
                client,
                Arc::new(MemoryRecords::new()),
                true,
                options,
            )
            .with_callbacks(callbacks);
            let every = settings.reconcile_interval;
            let local = reconciler.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // The first tick is at once: wait a whole interval first, as a timer would.
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    let started = tokio::time::Instant::now();
                    let report = local.run(time::OffsetDateTime::now_utc()).await;
                    crate::service::reconcile::log(&report, started.elapsed(), true);
                }
            });
            reconciler
        }
    }
}

/// Bind the loopback address the host connects to (IPv4: the host always
/// calls `http://127.0.0.1:<port>`).
pub async fn bind(port: u16) -> Result<TcpListener, StartupError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

/// The service the server runs: paths matched as the host matches them
/// ([`routes::normalize_path`], before routing), then the router. Tests
/// drive it in-process with `tower::ServiceExt::oneshot`.
pub fn app(state: AppState) -> App {
    tower::ServiceBuilder::new()
        .map_request(routes::normalize_path as fn(axum::extract::Request) -> axum::extract::Request)
        .service(routes::router(state))
}

/// What [`app`] builds.
pub type App =
    tower::util::MapRequest<axum::Router, fn(axum::extract::Request) -> axum::extract::Request>;

/// Serve until SIGTERM or Ctrl-C, then let in-flight invocations finish
/// (see [`server`] for what happens to the other connections), and the
/// writes that invocations whose callers hung up had already sent, with
/// their log lines.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    read_timeout: Duration,
) -> Result<(), StartupError> {
    let restrictor = state.restrictor().clone();
    let until_seen_through = state.request_timeout();
    let stopping = restrictor.clone();
    let shutdown = async move {
        shutdown_signal().await;
        // Invocations that have sent nothing stop waiting (for a lookup,
        // their machine's round or a rate-budget slot) and answer 503.
        stopping.shut_down();
    };
    server::serve(listener, app(state), read_timeout, shutdown)
        .await
        .map_err(StartupError::Serve)?;
    // No connection is left, but a round may still be seeing a POST through
    // for a caller who hung up: its outcome, and its line, are waited for.
    let until = tokio::time::Instant::now() + until_seen_through;
    restrictor.rounds_finished(until).await;
    crate::host::functions::answer::abandoned_lines_written(until).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight invocations");
}
