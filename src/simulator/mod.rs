//! A simulated Microsoft Defender for Endpoint tenant, for tests and local runs.
//!
//! The simulator is an axum server over in-memory state. It serves the same
//! paths and the same serde wire types ([`crate::defender::models`]) that the
//! real client reads, following Microsoft's documentation of the API
//! (<https://learn.microsoft.com/defender-endpoint/api/exposed-apis-list>: the
//! machine and machine action entities, their list, get and action calls,
//! common errors and rate limits). It is **not** a fidelity guarantee: where
//! the real API's behaviour is unknown or not modelled, the simulator answers
//! `501` with code `NotImplementedInSimulator` and a message naming what is
//! missing, instead of guessing quietly.
//!
//! # Surfaces
//!
//! **Defender API** (`/api/...`, bearer token required: any non-empty token
//! except one the identity endpoint issued for another resource; the app's
//! roles are [`SimConfig::roles`]):
//!
//! | Call | Notes |
//! |---|---|
//! | `GET /api/machines` | `$filter` on `aadDeviceId` (quoted or bare GUID), `id`, `computerDnsName`, `healthStatus`, `rbacGroupId` (bare integer) and `machineTags/any(tag: tag eq '...')`, joined with `and`; `$top`, `$skip`, `@odata.nextLink` paging |
//! | `GET /api/machines/{id}` | by machine id or computer name |
//! | `POST /api/machines/{id}/restrictCodeExecution` | body `{"Comment": "..."}`, `201` with a `MachineAction` |
//! | `POST /api/machines/{id}/unrestrictCodeExecution` | same |
//! | `GET /api/machineactions` | `$filter` on `machineId`, `type`, `status`, `id`, `requestor`; newest first |
//! | `GET /api/machineactions/{id}` | |
//! | `POST /api/machineactions/{id}/cancel` | body `{"Comment": "..."}` |
//! | `POST /api/machines/{id}/tags` | body `{"Value": "tag", "Action": "Add"\|"Remove"}`, `200` with the machine; needs `Machine.ReadWrite.All` |
//! | `POST /api/machines/AddOrRemoveTagForMultipleMachines` | adds `"MachineIds"` (1 to 500), `200` with the machines |
//!
//! Actions move `Pending` → `InProgress` → `Succeeded` on the simulated clock
//! ([`SimConfig::speed`]), computed lazily on every read. An action on an
//! offline machine ([`SimHandle::set_offline`]) stays `Pending` and becomes
//! `TimeOut` three simulated days after its creation.
//!
//! **Fake managed identity endpoint** (`GET /_identity/token`), speaking the
//! App Service 2019-08-01 protocol that `azure_identity`'s
//! `ManagedIdentityCredential` uses when `IDENTITY_ENDPOINT` and
//! `IDENTITY_HEADER` are set (see [`identity`]).
//!
//! Every request to `/api/*` and `/_identity/*` is recorded
//! ([`SimHandle::requests`]) and may be hit by an injected [`Fault`].
//!
//! **Test controls** (`/_sim/...`): fenced off from the Defender surface, never
//! recorded and never faulted. The same operations are available in Rust on
//! [`SimHandle`].
//!
//! | Call | Effect |
//! |---|---|
//! | `GET /_sim` | the human-readable banner ([`SimHandle::banner`]) |
//! | `GET /_sim/requests`, `DELETE /_sim/requests` | read or clear the request log |
//! | `GET /_sim/faults`, `POST /_sim/faults`, `DELETE /_sim/faults` | list, inject ([`Fault`] JSON, camelCase) or clear faults |
//! | `GET /_sim/machines`, `POST /_sim/machines` | list machines, add or replace one ([`Machine`] JSON) |
//! | `GET /_sim/actions` | all machine actions, newest first |
//! | `POST /_sim/fleets` | add a generated fleet ([`seed::Fleet`] JSON, camelCase); answers its devices' ids |
//! | `POST /_sim/machines/{id}/offline` | body `{"offline": true}` or `false` |
//! | `POST /_sim/machines/{id}/outcome` | body `{"outcome": "Failed"}` or `"Succeeded"`: how its new actions end |
//! | `GET /_sim/clock`, `POST /_sim/clock` | read the simulated clock, or move it on with `{"advanceSeconds": 3600}` |
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use restrict_code_execution::simulator::{Fault, FaultKind, SimConfig, Simulator};
//!
//! let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), SimConfig::default()).await?;
//! sim.inject(Fault::new("restrictCodeExecution", FaultKind::DropAfterHandling).method("POST"));
//! println!("{}", sim.banner());
//! // ... point the service at sim.url() and sim.identity_endpoint() ...
//! sim.shutdown();
//! # Ok(())
//! # }
//! ```

mod actions;
mod clock;
mod conn;
mod control;
mod faults;
mod filter;
mod identity;
mod intercept;
mod odata;
mod ratelimit;
mod requests;
mod respond;
mod routes;
pub mod seed;
mod state;
mod tags;
#[cfg(test)]
mod tags_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::defender::models::{Machine, MachineAction};

pub use faults::{Fault, FaultKind};
pub use requests::RecordedRequest;
pub use tags::{BulkTagUnknown, MAX_BULK_MACHINES};

use state::Sim;

/// How the simulator is set up. [`Default`] gives the seeded demo tenant at real
/// time with the documented rate limits.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `true`: the seeded demo devices ([`seed`]); `false`: an empty tenant.
    pub seed: bool,
    /// Simulated clock speed: sim time = real elapsed time × `speed`. Must be
    /// finite and positive; `1.0` is real time.
    pub speed: f64,
    /// Sim time a new action stays `Pending` (the device has not picked it up).
    pub pending_for: Duration,
    /// Sim time an action then stays `InProgress` before it is `Succeeded`.
    pub in_progress_for: Duration,
    /// Per-endpoint rate limits; `None` switches them off.
    pub rate_limits: Option<RateLimits>,
    /// Maximum rows per collection page before `@odata.nextLink`. At least 1.
    pub page_size: usize,
    /// The secret the identity endpoint expects in `x-identity-header`.
    pub identity_header: String,
    /// The access token the identity endpoint issues.
    pub token: String,
    /// What a request for an action that is already pending on the machine gets.
    pub duplicate: DuplicateBehaviour,
    /// Whether `$orderby` on machine actions is honoured. Defender documents
    /// only `$filter`, `$top` and `$skip` for that list.
    pub orderby: OrderBy,
    /// The order of a list of machine actions without `$orderby`, which
    /// Defender does not document.
    pub list_order: ListOrder,
    /// Whether a page cut short under `$top` carries `@odata.nextLink`. With
    /// `false`, a `$top` request is answered with up to `$top` rows and no
    /// nextLink (microsoft-365-docs#8489): the client pages with `$skip`.
    pub next_link_with_top: bool,
    /// Sim time between a cancel call and the cancellation taking effect.
    /// `ZERO` (the default) cancels at once. Defender documents neither way
    /// (`api/cancel-machine-action`): while the cancel waits the action goes
    /// on, and one that finishes first keeps its final status (the cancel
    /// lost the race).
    pub cancel_takes: Duration,
    /// When an action reports `computerDnsName` and `lastUpdateDateTimeUtc`.
    pub action_fields: ActionFields,
    /// Token audiences (`resource`s) the identity endpoint issues a Defender
    /// token for. A token issued for any other resource is answered 401 by
    /// the API, as Defender answers a token for another API.
    pub audiences: Vec<String>,
    /// The app's application roles, carried by every token
    /// ([`SimHandle::set_roles`] changes them later). Reads need
    /// `Machine.Read.All` or `Machine.ReadWrite.All`; restrict and unrestrict
    /// need `Machine.RestrictExecution`; cancel any one response role. A
    /// missing role is a 403 with Defender's "Missing application roles" text.
    pub roles: Vec<String>,
    /// What `GET /api/machines` answers when nothing matches.
    pub no_match: NoMatch,
    /// How far behind the wall clock the simulated clock starts, so that
    /// actions created now look old to the service (stale pending actions).
    pub clock_behind: Duration,
    /// What a bulk tag call naming an unknown machine id gets (undocumented).
    pub bulk_tag_unknown: BulkTagUnknown,
    /// Generated fleets seeded beside (or, with `seed: false`, instead of)
    /// the demo devices ([`seed::Fleet`]).
    pub fleets: Vec<seed::Fleet>,
}

/// When an action carries `computerDnsName` and `lastUpdateDateTimeUtc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActionFields {
    /// From creation, as real answers do (SEKOIA-IO automation-library's
    /// captured responses).
    #[default]
    FromCreation,
    /// `null` until the device picks the action up (the older XSOAR capture).
    WhenPickedUp,
}

/// What listing machines answers when none matches: the docs say 404 "no
/// recent machines"; tenants seen answer an empty list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoMatch {
    #[default]
    EmptyList,
    NotFound,
}

/// How the actions created on a machine end when the device carries them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum ActionOutcome {
    #[default]
    Succeeded,
    Failed,
}

/// The documented token resources for the Defender API (commercial, legacy
/// and government hosts: <https://learn.microsoft.com/defender-endpoint/api/exposed-apis-create-app-webapp>
/// and <https://learn.microsoft.com/defender-endpoint/gov>).
pub const DEFENDER_AUDIENCES: &[&str] = &[
    "https://api.securitycenter.microsoft.com",
    "https://api.securitycenter.windows.com",
    "https://securitycenter.onmicrosoft.com/windowsatpservice",
    "https://api-gcc.securitycenter.microsoft.us",
    "https://api-gov.securitycenter.microsoft.us",
];

/// Roles an app that restricts needs: read machines and actions, restrict.
pub const DEFAULT_ROLES: &[&str] = &["Machine.Read.All", "Machine.RestrictExecution"];

/// How the simulator treats `$orderby=creationDateTimeUtc desc` on machine actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderBy {
    #[default]
    Honour,
    /// `400 ODataError`, as a tenant that does not support it would answer.
    Refuse,
}

/// The default order of machine action lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListOrder {
    #[default]
    NewestFirst,
    OldestFirst,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: true,
            speed: 1.0,
            pending_for: Duration::from_secs(2),
            in_progress_for: Duration::from_secs(3),
            rate_limits: Some(RateLimits::default()),
            page_size: 10_000,
            identity_header: "sim-identity-header".to_owned(),
            token: "sim-access-token".to_owned(),
            duplicate: DuplicateBehaviour::default(),
            orderby: OrderBy::default(),
            list_order: ListOrder::default(),
            next_link_with_top: true,
            cancel_takes: Duration::ZERO,
            action_fields: ActionFields::default(),
            audiences: DEFENDER_AUDIENCES.iter().map(|a| (*a).to_owned()).collect(),
            roles: DEFAULT_ROLES.iter().map(|r| (*r).to_owned()).collect(),
            no_match: NoMatch::default(),
            clock_behind: Duration::ZERO,
            bulk_tag_unknown: BulkTagUnknown::default(),
            fleets: Vec::new(),
        }
    }
}

/// Calls allowed per endpoint kind in sliding windows on the simulated clock.
/// The defaults are Defender's documented 100 calls/min and 1,500 calls/h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Accepted calls per endpoint in any 60 s of sim time.
    pub per_minute: u32,
    /// Accepted calls per endpoint in any 3600 s of sim time.
    pub per_hour: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            per_minute: 100,
            per_hour: 1500,
        }
    }
}

/// The docs say a repeated restrict/unrestrict for a device returns "either the
/// pending machine action or HTTP 400 'Action is already in progress'"; the
/// real choice is timing-dependent, so tests pick one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DuplicateBehaviour {
    /// `400 {"error":{"code":"ActiveRequestAlreadyExists","message":"Action is already in progress"}}`.
    #[default]
    Error,
    /// `201` with the existing pending (or in-progress) action.
    ReturnPending,
}

/// Starts simulators.
pub struct Simulator;

impl Simulator {
    /// Binds `addr` (use `127.0.0.1:0` in tests), serves in a tokio task and
    /// returns a handle to the running simulator.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if the config is unusable (non-positive or non-finite
    /// `speed`, zero `page_size`); otherwise whatever binding the socket returns.
    pub async fn start(addr: SocketAddr, config: SimConfig) -> std::io::Result<SimHandle> {
        validate(&config)?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let sim = Arc::new(Sim::new(config, format!("http://{local}")));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let app =
            routes::app(sim.clone()).into_make_service_with_connect_info::<conn::ConnControl>();
        tokio::spawn(async move {
            let stopped = async move {
                // Only an explicit shutdown() stops serving: dropping every
                // handle must not, or `Simulator::start(..).await?.url()` would
                // hand out the URL of a dead server. Otherwise the server lives
                // as long as the tokio runtime.
                if stop_rx.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let served = axum::serve(conn::KillableListener::new(listener), app)
                .with_graceful_shutdown(stopped)
                .await;
            if let Err(err) = served {
                tracing::warn!(error = %err, "simulator stopped with an error");
            }
        });
        Ok(SimHandle {
            sim,
            stop: Arc::new(stop_tx),
        })
    }
}

fn validate(config: &SimConfig) -> std::io::Result<()> {
    let invalid = |msg: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.to_owned());
    if !(config.speed.is_finite() && config.speed > 0.0) {
        return Err(invalid("SimConfig.speed must be finite and greater than 0"));
    }
    if config.page_size == 0 {
        return Err(invalid("SimConfig.page_size must be at least 1"));
    }
    Ok(())
}

/// A handle to a running simulator. Cheap to clone; all clones control the
/// same simulator.
#[derive(Clone)]
pub struct SimHandle {
    sim: Arc<Sim>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The Defender API base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        self.sim.base_url.clone()
    }

    /// The fake managed identity endpoint, for `IDENTITY_ENDPOINT`.
    pub fn identity_endpoint(&self) -> String {
        format!("{}/_identity/token", self.sim.base_url)
    }

    /// Every completed request to `/api/*` and `/_identity/*`, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.sim.requests()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.sim.clear_requests();
    }

    /// Adds a fault after the existing ones (the first matching fault wins).
    pub fn inject(&self, fault: Fault) {
        self.sim.inject(fault);
    }

    /// Removes every fault not yet used up.
    pub fn clear_faults(&self) {
        self.sim.clear_faults();
    }

    /// Adds a machine, replacing one with the same id (ids compare case-insensitively).
    pub fn add_machine(&self, machine: Machine) {
        self.sim.add_machine(machine);
    }

    /// Adds a generated fleet's records ([`seed::Fleet`]), replacing records
    /// with the same ids.
    pub fn add_fleet(&self, fleet: &seed::Fleet) {
        self.sim.add_fleet(fleet);
    }

    /// All machines, in insertion order.
    pub fn machines(&self) -> Vec<Machine> {
        self.sim.machines()
    }

    /// All machine actions with their current status, newest first.
    pub fn actions(&self) -> Vec<MachineAction> {
        self.sim.actions()
    }

    /// Takes a machine offline (its new and not yet picked-up actions stay
    /// `Pending`, then `TimeOut` three sim days after creation) or back online
    /// (held actions start their `Pending` countdown now).
    pub fn set_offline(&self, machine_id: &str, offline: bool) {
        self.sim.set_offline(machine_id, offline);
    }

    /// Replaces the app's application roles, as if an admin granted or
    /// revoked them (real tokens pick that up only when refreshed; here the
    /// next call sees it).
    pub fn set_roles(&self, roles: &[&str]) {
        self.sim
            .set_roles(roles.iter().map(|r| (*r).to_owned()).collect());
    }

    /// How the machine's actions created from now on end: `Failed` makes
    /// them fail when the device carries them out (ids compare
    /// case-insensitively).
    pub fn set_outcome(&self, machine_id: &str, outcome: ActionOutcome) {
        self.sim.tenant().set_outcome(machine_id, outcome);
    }

    /// Moves the simulated clock forward by `by` (sim time), on top of `speed`.
    /// Handy for the three-day offline timeout and for rate-limit windows.
    pub fn advance(&self, by: Duration) {
        self.sim.clock.advance(by);
    }

    /// Multi-line text for humans: the devices and the control endpoints.
    pub fn banner(&self) -> String {
        self.sim.banner()
    }

    /// Stops accepting connections and lets in-flight requests finish.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}
