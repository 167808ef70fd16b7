//! Restrict or release one device: find its machine, read its actions,
//! decide (see [`super::decision`]), and only then act.
//!
//! [`Restrictor`] owns a machine action's whole life: [`Restrictor::run`]
//! creates it from an [`Intent`], [`Restrictor::wait`] follows it,
//! [`Restrictor::status`] reads it and [`Restrictor::cancel`] cancels it.
//! `run` is the one entry for every caller (an HTTP function, a queue
//! worker, a timer); callers parse their input and word the answer.
//!
//! - [`protocol`]: what one device's request does (decide, cancel, act, see
//!   an unclear answer through), as plain async functions;
//! - [`round`]: when it runs: one round at a time per machine;
//! - [`leased`]: the machine's lease around the writes, across instances,
//!   and the answers a lease holder's handoff gives.
//!
//! Safety rules, each with a test in `tests/api/safety.rs`:
//! - read before write, one round at a time per machine
//!   ([`super::machine_queue`]), so duplicates coalesce and opposite actions
//!   cannot finish out of order;
//! - the state a request decides on comes from a read sent after it was
//!   queued ([`super::state_reads`]), plus what the requests before it in
//!   the same round did;
//! - a POST is never blindly re-sent: after an ambiguous failure the machine's
//!   actions are read again, and the POST is repeated only if no new action of
//!   that type appeared;
//! - `cancelPending` cancels only actions that existed when the request
//!   arrived: an opposite action created after that (by this instance, or by
//!   another one as Defender's creation time shows) is answered with 409.
//!   Concurrent opposite requests would otherwise cancel each other's
//!   actions in turn;
//! - after cancelling, the request decides again only on a read that shows
//!   the cancelled actions final (a cancel is not known to be immediate; reads
//!   2 s apart, slowing to 5 s), or answers 409 when none does in time;
//! - a 201 whose action Defender already had (its id was in the state read,
//!   or it was created before the POST was sent) is a duplicate answered with
//!   the pending action: `already_pending`, not a new action;
//! - across instances (`COORDINATION=storage`), each round holds the
//!   machine's lease from before its read until its last write is settled. A
//!   round waiting for another instance's lease answers `already_pending`
//!   only from that instance's handoff: a pending action of the same type
//!   that a POST sent after the request arrived was answered with, with no
//!   write sent under the lease for the machine since
//!   ([`crate::coordination::Handoff`]);
//! - a POST or cancel already sent is seen through even if its caller hangs
//!   up, and one whose outcome is unknown is given 2 s before anyone reads
//!   the machine again, so that the next read sees what it did; one Defender
//!   refused for good (403, 404, 422) frees the machine at once;
//! - a POST's answer is taken as the request's action only if it is of the
//!   type asked for, on the machine asked about;
//! - at shutdown nothing new is sent: a request that has sent no write is
//!   refused (`ShuttingDown`), one that has is seen through.

mod leased;
mod protocol;
mod round;
mod sent;

pub use sent::{OrderResult, Sent};

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::{sync::watch, time::Instant};

use crate::{
    coordination::Coordinator,
    defender::{
        DefenderClient, Endpoint,
        budget::Share,
        client::ActionRecord,
        ids::{ActionId, MachineId},
        models::{ActionStatus, ActionType, Machine, MachineAction},
        timestamp::Timestamp,
    },
    service::{
        decision::{self, Decision, Wanted},
        fleet::read::{FleetReads, View},
        machine_directory::{FindError, MachineDirectory},
        machine_queue::MachineQueues,
        platform,
        runbook::{CallerName, Comment, DeviceRef},
        service_error::ServiceError,
        state_reads::StateReads,
    },
};

use self::{
    protocol::{CancelSent, Created, ServeError, send_cancel},
    round::Ticket,
};

/// Restricts and releases devices through one Defender client. Cheap to
/// clone: the machine lookups, state reads and queues are shared.
#[derive(Debug, Clone)]
pub struct Restrictor {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    client: DefenderClient,
    /// Append `(requested by <caller>)` to the comment (setting `COMMENT_INCLUDE_CALLER`).
    include_caller: bool,
    directory: Arc<MachineDirectory>,
    reads: StateReads,
    /// Background work's reads (jobs): fewest calls, gathered per group of
    /// devices ([`StateReads::economical`]). A round reads through them only
    /// when every order in it is background work.
    background_reads: StateReads,
    /// One round at a time per machine.
    queues: MachineQueues<Ticket>,
    /// Actions created by this instance and when.
    created: Created,
    /// Leases across instances (`COORDINATION=storage`).
    coordinator: Option<Arc<Coordinator>>,
    /// The fleet view's shared reads.
    fleet: FleetReads,
    /// `true` once the handler is shutting down: nothing new is sent.
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// Whether the handler is shutting down.
    fn stopped(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once the handler is shutting down.
    fn stopping(&self) -> impl Future<Output = ()> + use<> {
        let mut shutdown = self.shutdown.subscribe();
        async move {
            if shutdown.wait_for(|&stopping| stopping).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// What a caller wants done to a device, whichever edge it came through.
#[derive(Debug, Clone)]
pub struct Intent {
    /// Restrict, or release (unrestrict).
    pub action: ActionType,
    /// Act even when the device is already in the wanted state.
    pub force: bool,
    /// Cancel a pending action of the opposite type instead of refusing.
    pub cancel_pending: bool,
    pub comment: Comment,
    /// Who asked, kept in the comment sent to Defender unless turned off.
    pub caller: Option<CallerName>,
    /// When a restriction this creates is released automatically
    /// (`releaseAfter`): the comment ends with a readable marker saying so.
    pub release_at: Option<OffsetDateTime>,
    /// The containment job this runs for: the comment carries
    /// [`job_marker`] (last but for an auto-release marker), so that a delivery of the job's message can tell an
    /// action an earlier delivery created (see [`made_by_job`]).
    pub job_id: Option<String>,
}

/// The marker a job's actions carry near the end of their comment (only an
/// auto-release marker comes after it).
pub fn job_marker(job_id: &str) -> String {
    format!("[job {job_id}]")
}

/// Whether `action` was requested for the job `job_id`: its comment, as
/// Defender keeps it, carries the job's marker. The job id is a random
/// UUID, so no other caller's comment carries it by chance.
pub fn made_by_job(action: &MachineAction, job_id: &str) -> bool {
    action
        .requestor_comment
        .as_deref()
        .is_some_and(|comment| comment.contains(&job_marker(job_id)))
}

/// What happened, as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A new machine action was created.
    Requested,
    /// A same-type action is still pending; it is returned, nothing was sent.
    AlreadyPending,
    /// The newest successful action already did what is asked; nothing was sent.
    AlreadyInState,
}

impl Outcome {
    /// The name used in answers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::AlreadyPending => "already_pending",
            Self::AlreadyInState => "already_in_state",
        }
    }
}

/// A successful invocation.
#[derive(Debug, Clone)]
pub struct Success {
    pub outcome: Outcome,
    pub machine: Machine,
    /// How many Defender records matched the device.
    pub candidates: usize,
    /// The machine action, typed, and as Defender sent it when it answered
    /// with this one action (see [`ActionRecord`]).
    pub action: ActionRecord,
    /// Pending opposite-type actions cancelled first (`cancelPending`).
    pub cancelled: Vec<ActionId>,
}

impl Success {
    /// When Defender created the returned action, if it is an
    /// `already_pending` action still pending: the caller may tell how long
    /// it has been waiting (a stuck action; see microsoft-365-docs#5903).
    pub fn pending_since(&self) -> Option<OffsetDateTime> {
        if self.outcome != Outcome::AlreadyPending || self.terminal() {
            return None;
        }
        self.action.action.creation_date_time_utc.map(Timestamp::at)
    }

    /// Whether the returned action is finished (Succeeded, Failed, TimeOut, Cancelled).
    pub fn terminal(&self) -> bool {
        self.action
            .action
            .status
            .known()
            .is_some_and(ActionStatus::is_terminal)
    }
}

/// How often `wait` polls the action (Defender allows 100 reads a minute).
pub const POLL_EVERY: Duration = Duration::from_secs(5);

impl Restrictor {
    /// `coordinator`: with `COORDINATION=storage`, each machine round also
    /// holds the machine's blob lease, so rounds on other instances wait.
    pub fn new(
        client: DefenderClient,
        include_caller: bool,
        machine_cache: Duration,
        coordinator: Option<Arc<Coordinator>>,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                coordinator,
                directory: MachineDirectory::new(client.clone(), machine_cache),
                reads: StateReads::new(client.clone()),
                fleet: FleetReads::new(client.clone(), FleetReads::DEFAULT_MAX_AGE),
                background_reads: StateReads::economical(client.clone()),
                client,
                include_caller,
                queues: MachineQueues::default(),
                created: Created::default(),
                shutdown: watch::Sender::new(false),
            }),
        }
    }

    /// The handler is shutting down: from now on nothing new is sent to
    /// Defender. Invocations that have sent no write (waiting for a lookup,
    /// their machine's round, a read or a rate-budget slot) are refused at
    /// once with [`ServiceError::ShuttingDown`]; a write already sent is
    /// seen through; waits for an action to finish answer with what they have.
    pub fn shut_down(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Resolves once no machine round runs (or at `until`): at shutdown, the
    /// writes already sent are seen through before the process exits.
    pub async fn rounds_finished(&self, until: Instant) {
        while !self.inner.queues.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restrict or release `device` as `intent` asks.
    pub async fn run(
        &self,
        device: &DeviceRef,
        intent: &Intent,
        deadline: Instant,
    ) -> Result<Success, ServiceError> {
        self.run_as(device, intent, deadline, false).await
    }

    /// [`Self::run`] for background work (a job's device): the same
    /// protocol, with the machine's state read through the background reads,
    /// which spend as few calls as possible and serve the devices announced
    /// with [`Self::expect_read`] together.
    pub async fn run_in_background(
        &self,
        device: &DeviceRef,
        intent: &Intent,
        deadline: Instant,
    ) -> Result<Success, ServiceError> {
        self.run_as(device, intent, deadline, true).await
    }

    /// Announce that a background run for `machine_id` is about to read its
    /// actions (see [`StateReads::expect`]).
    pub fn expect_read(&self, machine_id: &MachineId) -> crate::service::state_reads::Expected {
        self.inner.background_reads.expect(machine_id)
    }

    /// Remember a machine record read moments ago (a job's listing of its
    /// selector) for `device`, under the directory's usual rule: only an
    /// Active, unmerged record, for at most the machine cache's time.
    pub fn remember_machine(&self, device: &DeviceRef, machine: Machine, read_at: Instant) {
        self.inner.directory.remember(device, machine, read_at);
    }

    async fn run_as(
        &self,
        device: &DeviceRef,
        intent: &Intent,
        deadline: Instant,
        background: bool,
    ) -> Result<Success, ServiceError> {
        let arrived = Instant::now();
        let wanted = intent.wanted();
        let mut comment = self.comment(&intent.comment, intent.caller.as_ref());
        if let Some(job) = &intent.job_id {
            comment = format!("{comment} {}", job_marker(job));
        }
        // Last, so that the portal's comment column ends with when the
        // restriction is lifted.
        if let Some(at) = intent.release_at {
            comment = format!("{comment} {}", super::runbook::release_after::marker(at));
        }
        // A remembered machine record is trusted for one attempt only: when
        // Defender answers 404 for it, the device is looked up afresh.
        let mut looked_up_again = false;
        loop {
            let (machine, candidates, cached) = tokio::select! {
                found = self.find(device, deadline) => found?,
                () = self.inner.stopping() => return Err(ServiceError::ShuttingDown),
            };
            match round::submit(
                &self.inner,
                &machine.id,
                wanted,
                &comment,
                arrived,
                deadline,
                background,
            )
            .await
            {
                Ok(acted) => {
                    return Ok(Success {
                        outcome: acted.outcome,
                        machine,
                        candidates,
                        action: acted.action,
                        cancelled: acted.cancelled,
                    });
                }
                Err(ServeError::MachineGone(_)) if cached && !looked_up_again => {
                    tracing::info!(machine_id = %machine.id, "Defender no longer knows the remembered machine; looking the device up again");
                    self.inner.directory.forget(device);
                    looked_up_again = true;
                }
                Err(ServeError::MachineGone(e)) => return Err(e.into()),
                Err(ServeError::Failed(e) | ServeError::Refused(e)) => return Err(e),
            }
        }
    }

    /// What [`Self::run`] would do for `device`, without sending anything:
    /// the same lookup, platform check, state read and decision (`dryRun`).
    ///
    /// The read runs outside the machine's round: the round's rule (decide
    /// only on a read sent after the previous write settled) protects
    /// writes, and a plan writes nothing. It may therefore miss an action a
    /// round is creating at this moment, as any read may.
    pub async fn plan(
        &self,
        device: &DeviceRef,
        intent: &Intent,
        deadline: Instant,
    ) -> Result<Plan, ServiceError> {
        let (machine, candidates, _) = self.find(device, deadline).await?;
        let actions = self.inner.reads.read(&machine.id, deadline).await?;
        let listed = ActionRecord::from;
        let (outcome, action, would_cancel) =
            match decision::decide(&machine.id, &actions, intent.wanted()) {
                Decision::Act => (Planned::WouldRequest, None, Vec::new()),
                Decision::Cancel(pending) => (
                    Planned::WouldRequest,
                    None,
                    pending.into_iter().map(|a| a.id).collect(),
                ),
                Decision::AlreadyPending(a) => {
                    (Planned::AlreadyPending, Some(listed(a)), Vec::new())
                }
                Decision::AlreadyInState(a) => {
                    (Planned::AlreadyInState, Some(listed(a)), Vec::new())
                }
                Decision::Conflict(action) => {
                    return Err(ServiceError::ConflictingActionPending {
                        machine_id: machine.id.to_string(),
                        action: Box::new(action),
                        created_meanwhile: false,
                    });
                }
            };
        Ok(Plan {
            outcome,
            machine,
            candidates,
            action,
            would_cancel,
        })
    }

    /// The device's machine, how many records matched, and whether the
    /// record was remembered; refused before any POST when its platform is
    /// known not to support the action.
    async fn find(
        &self,
        device: &DeviceRef,
        deadline: Instant,
    ) -> Result<(Machine, usize, bool), ServiceError> {
        let lookup = self
            .inner
            .directory
            .find(device, deadline)
            .await
            .map_err(|e| match e {
                FindError::NotFound(why) => ServiceError::DeviceNotFound(why),
                FindError::Defender(e) => e.into(),
            })?;
        let machine = lookup.found.machine;
        if let Some(os) = platform::known_unsupported(machine.os_platform.as_deref()) {
            return Err(ServiceError::UnsupportedPlatform {
                machine_id: machine.id.to_string(),
                os_platform: os.to_owned(),
            });
        }
        Ok((machine, lookup.found.candidates, lookup.cached))
    }
}

/// What a dry run found would be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Planned {
    /// A POST would be sent (after cancelling `would_cancel`, if any).
    WouldRequest,
    /// A same-type action is pending: nothing would be sent.
    AlreadyPending,
    /// The device is already in the wanted state: nothing would be sent.
    AlreadyInState,
}

impl Planned {
    /// The name used in answers, logs and job counts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WouldRequest => "would_request",
            Self::AlreadyPending => "already_pending",
            Self::AlreadyInState => "already_in_state",
        }
    }
}

/// A dry run's answer ([`Restrictor::plan`]).
#[derive(Debug, Clone)]
pub struct Plan {
    pub outcome: Planned,
    pub machine: Machine,
    pub candidates: usize,
    /// The action found (`already_*`), as Defender listed it.
    pub action: Option<ActionRecord>,
    /// Pending opposite actions `cancelPending` would cancel first.
    pub would_cancel: Vec<ActionId>,
}

impl Intent {
    fn wanted(&self) -> Wanted {
        Wanted {
            action: self.action,
            force: self.force,
            cancel_pending: self.cancel_pending,
        }
    }
}

impl Restrictor {
    /// The machine action `action_id` as Defender has it now.
    pub async fn status(
        &self,
        action_id: &str,
        deadline: Instant,
    ) -> Result<ActionRecord, ServiceError> {
        let found = self.inner.read_action(action_id, deadline).await?;
        // Answering with another action than the one asked for would tell
        // the caller the wrong device's state.
        if found.action.id != *action_id {
            return Err(ServiceError::OtherActionAnswered {
                asked: action_id.to_owned(),
                answered: found.action.id.to_string(),
            });
        }
        Ok(found)
    }

    /// Poll `success`'s action until it is finished or `until` passes; keep
    /// the last state. Polls every [`POLL_EVERY`]: reads draw from the same
    /// hourly budget.
    pub async fn wait(&self, success: &mut Success, until: Instant) -> Result<(), ServiceError> {
        // The last poll is at `until`, so a wait shorter than the interval
        // still reads the action once more before answering.
        while !success.terminal() && Instant::now() < until {
            let next = (Instant::now() + POLL_EVERY).min(until);
            // At shutdown the caller gets the state known so far.
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = self.inner.stopping() => break,
            }
            // Give the read a second past `until` to come back.
            let read_by = until + Duration::from_secs(1);
            match self
                .inner
                .client
                .action(success.action.action.id.as_str(), read_by)
                .await?
            {
                Some(latest) => {
                    success.action = latest;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Cancel the pending restrict or unrestrict action `action_id`.
    ///
    /// Only those two types are cancelled (the permission would allow any
    /// type; this tool does not), and a finished action is a 409 with its
    /// status. The answer is the action as Defender reports it after the
    /// cancel, which need not be final yet.
    pub async fn cancel(
        &self,
        action_id: &str,
        comment: &Comment,
        caller: Option<&CallerName>,
        deadline: Instant,
    ) -> Result<ActionRecord, ServiceError> {
        let comment = self.comment(comment, caller);
        let current = self.inner.read_action(action_id, deadline).await?;
        if current.action.action_type.known().is_none() {
            return Err(ServiceError::UnsupportedActionType {
                action_id: action_id.to_owned(),
                action_type: current.action.action_type,
            });
        }
        check_pending(&current)?;

        // Across instances (`COORDINATION=storage`) the cancel is a write
        // like a POST: sent under the machine's lease, with the
        // lease-conditioned storage write as its last step, so it never
        // crosses a round deciding for the machine on another instance, or
        // on this one (that round holds the lease). Local mode has no lease:
        // there a cancel is not ordered against this process's rounds.
        let lease = match (&self.inner.coordinator, &current.action.machine_id) {
            (Some(coordinator), Some(machine_id)) => Some(
                coordinator
                    .lock_machine(machine_id.as_str(), deadline)
                    .await?,
            ),
            _ => None,
        };
        let writes = round::Writes::default();
        let writer = leased::LeasedWriter::new(lease.as_ref(), &writes);
        let hook: Option<&dyn crate::defender::client::BeforeSend> = lease
            .as_ref()
            .map(|_| &writer as &dyn crate::defender::client::BeforeSend);

        // Refused (finished meanwhile), or the answer was lost: read the
        // action again.
        let failed =
            match send_cancel(&self.inner.client, action_id, &comment, hook, deadline).await {
                Ok(CancelSent::Accepted(cancelled)) => return Ok(*cancelled),
                Ok(CancelSent::NoLongerPending { message }) => Ok(message),
                Err(e) if e.is_ambiguous() => Err(e),
                Err(e) => return Err(e.into()),
            };
        let latest = self.inner.read_action(action_id, deadline).await?;
        if latest.action.status == ActionStatus::Cancelled {
            return Ok(latest);
        }
        check_pending(&latest)?;
        Err(match failed {
            // Defender says it cannot be cancelled, while the read still
            // shows it pending: it is being finished (reads lag behind).
            Ok(message) => ServiceError::CancelRefused {
                action_id: action_id.to_owned(),
                status: latest.action.status,
                message,
            },
            Err(e) => e.into(),
        })
    }

    /// How long until the list-actions budget has room within `share` of
    /// each window (nothing reserved): a background caller waits for this
    /// before its reads, so interactive requests keep the rest.
    pub async fn read_room(&self, share: Share) -> Result<Duration, ServiceError> {
        Ok(self
            .inner
            .client
            .wait_for_share(Endpoint::ListActions, share)
            .await?)
    }

    /// A machine's actions (every type), through the shared batched state
    /// reads: callers that ask at once share one read.
    pub async fn machine_actions(
        &self,
        machine_id: &MachineId,
        deadline: Instant,
    ) -> Result<Vec<MachineAction>, ServiceError> {
        Ok(self.inner.reads.read(machine_id, deadline).await?)
    }

    /// The fleet, for one view: a read shared with the other views, which
    /// yields the budget to every other caller ([`FleetReads`]).
    pub async fn fleet_view(&self, deadline: Instant) -> Result<View, ServiceError> {
        Ok(self.inner.fleet.view(deadline).await?)
    }

    /// How old a read may be and still answer a fleet view
    /// (`FLEET_VIEW_MAX_AGE_SECONDS`); set at startup, before the
    /// restrictor is shared.
    #[must_use]
    pub fn with_fleet_view_max_age(mut self, max_age: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.fleet = FleetReads::new(inner.client.clone(), max_age);
        }
        self
    }

    /// The comment as sent to Defender: with the caller, unless turned off
    /// (`COMMENT_INCLUDE_CALLER`).
    fn comment(&self, comment: &Comment, caller: Option<&CallerName>) -> String {
        comment_for_defender(comment, caller, self.inner.include_caller)
    }
}

/// 409 when the action is already final.
fn check_pending(found: &ActionRecord) -> Result<(), ServiceError> {
    match found.action.status.known() {
        Some(status) if status.is_terminal() => Err(ServiceError::ActionNotPending {
            action_id: found.action.id.to_string(),
            status: found.action.status.clone(),
        }),
        _ => Ok(()),
    }
}

impl Shared {
    /// The machine action `action_id`; 404 `action_not_found` when Defender
    /// does not know it.
    async fn read_action(
        &self,
        action_id: &str,
        deadline: Instant,
    ) -> Result<ActionRecord, ServiceError> {
        self.client
            .action(action_id, deadline)
            .await?
            .ok_or_else(|| ServiceError::ActionNotFound(action_id.to_owned()))
    }
}

/// At shutdown, the storage operations coordination took, for operators and
/// the benchmark (`docs/benchmarks.md`).
impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(coordinator) = &self.coordinator {
            tracing::info!(
                storage_operations = coordinator.storage_operations(),
                by_kind = %coordinator.storage_operations_by_kind(),
                "coordination totals"
            );
        }
    }
}

/// Defender records the app, not the person, as requestor; the comment is the
/// only place the human caller can be kept.
fn comment_for_defender(
    comment: &Comment,
    caller: Option<&CallerName>,
    include_caller: bool,
) -> String {
    match caller {
        Some(caller) if include_caller => {
            format!("{} (requested by {})", comment.as_str(), caller.as_str())
        }
        _ => comment.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn caller_is_appended_unless_turned_off() {
        let comment = Comment::parse(Some(&json!("Ticket 42"))).unwrap();
        let caller = CallerName::parse(Some(&json!("alice@contoso.com"))).unwrap();
        assert_eq!(
            comment_for_defender(&comment, caller.as_ref(), true),
            "Ticket 42 (requested by alice@contoso.com)"
        );
        assert_eq!(
            comment_for_defender(&comment, caller.as_ref(), false),
            "Ticket 42"
        );
        assert_eq!(comment_for_defender(&comment, None, true), "Ticket 42");
    }
}

#[cfg(test)]
mod job_marker_tests {
    use super::*;
    use serde_json::json;

    fn action(comment: Option<&str>) -> MachineAction {
        serde_json::from_value(json!({
            "id": "5ba7e1e0-9b7a-4a46-8b17-86a87a74c81e",
            "type": "RestrictCodeExecution",
            "status": "Succeeded",
            "requestorComment": comment,
        }))
        .unwrap()
    }

    #[test]
    fn a_jobs_action_is_known_by_the_marker_its_comment_ends_with() {
        let job = "cfb167b1-6e2d-4003-ada2-5ef599e95db6";
        let comment = format!("INC-1 (requested by Jane) {}", job_marker(job));
        assert!(made_by_job(&action(Some(&comment)), job));
        // Another job's, a single request's, or no comment at all.
        assert!(!made_by_job(
            &action(Some(&comment)),
            "0d560e2b-25e4-4741-9e84-5ebb7c1e38a4"
        ));
        assert!(!made_by_job(
            &action(Some("INC-1 (requested by Jane)")),
            job
        ));
        assert!(
            !made_by_job(&action(Some(job)), job),
            "the id alone is not the marker"
        );
        assert!(!made_by_job(&action(None), job));
    }
}
