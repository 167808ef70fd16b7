//! Restrict or release one device: find its machine, read its actions,
//! decide (see [`super::decision`]), and only then act.
//!
//! [`Restrictor`] owns a machine action's whole life: [`Restrictor::run`]
//! creates it from an [`Intent`], [`Restrictor::wait`] follows it,
//! [`Restrictor::status`] reads it and [`Restrictor::cancel`] cancels it. The
//! functions only parse the request and shape the answer.
//!
//! Safety rules, each with a test in `tests/api/safety.rs`:
//! - read before write, one round at a time per machine
//!   ([`super::machine_queue`]), so duplicates coalesce and opposite actions
//!   cannot finish out of order;
//! - the state a job decides on comes from a read sent after the job was
//!   queued ([`super::state_reads`]), plus what the jobs before it in the
//!   same round did;
//! - a POST is never blindly re-sent: after an ambiguous failure the machine's
//!   actions are read again, and the POST is repeated only if no new action of
//!   that type appeared;
//! - `cancelPending` cancels only actions that existed when the request
//!   arrived: an opposite action created after that (by this instance, or by
//!   another one as Defender's creation time shows) is answered with 409.
//!   Concurrent opposite requests would otherwise cancel each other's
//!   actions in turn;
//! - after cancelling, the job decides again only on a read that shows the
//!   cancelled actions final (a cancel is not known to be immediate; reads
//!   2 s apart, slowing to 5 s), or answers 409 when none does in time;
//! - a 201 whose action Defender already had (its id was in the state read,
//!   or it was created before the POST was sent) is a duplicate answered with
//!   the pending action: `already_pending`, not a new action;
//! - across instances (`COORDINATION=storage`), each round holds the
//!   machine's lease from before its read until its last write is settled. A
//!   round waiting for another instance's lease answers `already_pending`
//!   only from that instance's handoff: a pending action of the same type
//!   that a POST sent after the job arrived was answered with, with no write
//!   sent under the lease for the machine since
//!   ([`crate::coordination::Handoff`]);
//! - a POST or cancel already sent is seen through even if its caller hangs
//!   up, and one whose outcome is unknown is given [`SETTLE`] before anyone
//!   reads the machine again, so that the next read sees what it did.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering as AtomicOrdering},
    },
    time::{Duration, SystemTime},
};

use futures_util::future::FutureExt as _;
use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::{sync::oneshot, time::Instant};

use crate::{
    coordination::{CoordinationError, Coordinator, Handoff, Locked, MachineLease},
    defender::{
        DefenderClient, DefenderError, Endpoint,
        client::{ActionListing, ActionRecord, BeforeSend},
        error::Refusal,
        ids::{ActionId, MachineId},
        models::{ActionStatus, ActionType, Machine, MachineAction},
    },
    service::{
        decision::{self, Decision, Wanted},
        machine_directory::{FindError, MachineDirectory, Swept},
        machine_queue::MachineQueues,
        runbook::{CallerName, Comment, DeviceRef},
        service_error::ServiceError,
        state_reads::StateReads,
    },
};

/// POSTs of one action per invocation at most: the first, and re-sends after
/// ambiguous failures that left no action behind.
const MAX_POSTS: usize = 3;
/// Pause before re-reading after an ambiguous POST, so that an action
/// Defender committed late is seen rather than duplicated.
const SETTLE: Duration = Duration::from_secs(2);

/// How far Defender's clock may be behind ours when telling an action it
/// created for our POST from one it already had. A duplicate POST can be
/// answered 201 with the existing pending action (defender-api.md A3); an
/// action created before the POST was sent cannot be the POST's, but the two
/// clocks are not the same clock: a second of skew must not make a new
/// action look old. A clock off by more only relabels the answer
/// (`already_pending` instead of `requested`): the action returned is the
/// one Defender answered with either way.
const CLOCK_SKEW: time::Duration = time::Duration::seconds(1);

/// First pause between the reads that wait for a cancelled action to be
/// final; it grows by half each time up to [`POLL_EVERY`]. The reads share
/// the hourly budget with every other invocation.
const CANCEL_POLL_FIRST: Duration = Duration::from_secs(2);
/// Time kept after waiting for a cancel, for the POST that follows.
const ACT_RESERVE: Duration = Duration::from_secs(2);

/// How long this instance remembers when it created an action: longer than
/// any invocation lasts, so a `cancelPending` request can tell whether an
/// action was created after it arrived.
const CREATED_MEMORY: Duration = Duration::from_secs(240);

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
    /// One round at a time per machine (lower-cased id).
    queues: MachineQueues<Job>,
    /// Actions created by this instance and when.
    created: Mutex<Swept<ActionId, Instant>>,
    /// Leases across instances (`COORDINATION=storage`).
    coordinator: Option<Arc<Coordinator>>,
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
    /// The machine action, typed and exactly as Defender returned it.
    pub action: ActionRecord,
    /// Pending opposite-type actions cancelled first (`cancelPending`).
    pub cancelled: Vec<String>,
}

impl Success {
    /// When Defender created the returned action, if it is an
    /// `already_pending` action still pending: the caller may tell how long
    /// it has been waiting (a stuck action; see microsoft-365-docs#5903).
    pub fn pending_since(&self) -> Option<OffsetDateTime> {
        if self.outcome != Outcome::AlreadyPending || self.terminal() {
            return None;
        }
        self.action
            .raw
            .get("creationDateTimeUtc")
            .and_then(Value::as_str)
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
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

/// The answer of one job served by a machine's round.
type JobResult = Result<Acted, JobError>;

/// What serving one job did, before the machine record is added.
#[derive(Debug)]
struct Acted {
    outcome: Outcome,
    action: ActionRecord,
    cancelled: Vec<String>,
}

/// Why a job did not succeed.
#[derive(Debug)]
enum JobError {
    /// A POST for the machine answered 404: the record may be stale.
    MachineGone(DefenderError),
    Failed(ServiceError),
}

impl From<ServiceError> for JobError {
    fn from(e: ServiceError) -> Self {
        Self::Failed(e)
    }
}

impl From<DefenderError> for JobError {
    fn from(e: DefenderError) -> Self {
        Self::Failed(e.into())
    }
}

/// One invocation's request for one machine, queued for the machine's round.
#[derive(Debug)]
struct Job {
    wanted: Wanted,
    /// The comment as sent to Defender.
    comment: String,
    /// When the invocation queued it.
    arrived: Instant,
    /// The same on the wall clock, to compare with Defender's creation times
    /// of actions other instances created.
    arrived_utc: OffsetDateTime,
    deadline: Instant,
    stage: Arc<AtomicU8>,
    reply: oneshot::Sender<JobResult>,
    /// Resolves when the invocation went away (its caller hung up): the job
    /// is then dropped, and a rate-budget slot it waited for is given back.
    departure: Departure,
}

impl Job {
    /// Claim the job for serving; `false` when its invocation gave up first.
    fn start(&self) -> bool {
        self.stage
            .compare_exchange(
                QUEUED,
                STARTED,
                AtomicOrdering::AcqRel,
                AtomicOrdering::Acquire,
            )
            .is_ok()
    }
}

/// Resolves once the invocation has gone away; clones can be waited for
/// anywhere, and again after it resolved.
type Departure = futures_util::future::Shared<oneshot::Receiver<()>>;

/// Resolves once every one of the jobs' invocations has gone away.
fn all_departed(jobs: &[Job]) -> impl Future<Output = ()> + use<> {
    let departures: Vec<Departure> = jobs.iter().map(|job| job.departure.clone()).collect();
    async move {
        futures_util::future::join_all(departures).await;
    }
}

/// Where a job is: the invocation and the round agree through it on whether
/// an abandoned job may still have acted.
const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

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
                client,
                include_caller,
                queues: MachineQueues::default(),
                created: Mutex::new(Swept::default()),
            }),
        }
    }

    /// Restrict or release `device` as `intent` asks.
    pub async fn run(
        &self,
        device: &DeviceRef,
        intent: &Intent,
        deadline: Instant,
    ) -> Result<Success, ServiceError> {
        let arrived = Instant::now();
        let wanted = Wanted {
            action: intent.action,
            force: intent.force,
            cancel_pending: intent.cancel_pending,
        };
        let comment = self.comment(&intent.comment, intent.caller.as_ref());
        // A remembered machine record is trusted for one attempt only: when
        // Defender answers 404 for it, the device is looked up afresh.
        let mut looked_up_again = false;
        loop {
            let lookup =
                self.inner
                    .directory
                    .find(device, deadline)
                    .await
                    .map_err(|e| match e {
                        FindError::NotFound(why) => ServiceError::DeviceNotFound(why),
                        FindError::Defender(e) => e.into(),
                    })?;
            let machine = lookup.found.machine;
            match self
                .submit(&machine.id, wanted, &comment, arrived, deadline)
                .await
            {
                Ok(acted) => {
                    return Ok(Success {
                        outcome: acted.outcome,
                        machine,
                        candidates: lookup.found.candidates,
                        action: acted.action,
                        cancelled: acted.cancelled,
                    });
                }
                Err(JobError::MachineGone(_)) if lookup.cached && !looked_up_again => {
                    tracing::info!(machine_id = %machine.id, "Defender no longer knows the remembered machine; looking the device up again");
                    self.inner.directory.forget(device);
                    looked_up_again = true;
                }
                Err(JobError::MachineGone(e)) => return Err(e.into()),
                Err(JobError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Queue a job for the machine's next round and wait for its answer.
    async fn submit(
        &self,
        machine_id: &str,
        wanted: Wanted,
        comment: &str,
        arrived: Instant,
        deadline: Instant,
    ) -> JobResult {
        let (reply, answer) = oneshot::channel();
        // Dropped with this future: tells the round the caller is gone.
        let (_alive, gone) = oneshot::channel::<()>();
        let stage = Arc::new(AtomicU8::new(QUEUED));
        let _abandon_if_dropped = AbandonIfQueued(Arc::clone(&stage));
        let job = Job {
            wanted,
            comment: comment.to_owned(),
            arrived,
            arrived_utc: OffsetDateTime::now_utc() - arrived.elapsed(),
            deadline,
            stage: Arc::clone(&stage),
            reply,
            departure: gone.shared(),
        };
        let key = MachineId::from(machine_id);
        if self.inner.queues.push(&key, job) {
            // No round runs for this machine: start one. It is a task of its
            // own, so that an invocation giving up never stops a round
            // half-way for the others queued with it.
            let shared = Arc::clone(&self.inner);
            let machine_id = machine_id.to_owned();
            tokio::spawn(async move { shared.serve_machine(key, machine_id).await });
        }

        let mut answer = answer;
        let gone = || JobError::Failed(ServiceError::RoundStopped);
        if let Ok(result) = tokio::time::timeout_at(deadline, &mut answer).await {
            return result.unwrap_or_else(|_| Err(gone()));
        }
        if stage
            .compare_exchange(
                QUEUED,
                ABANDONED,
                AtomicOrdering::AcqRel,
                AtomicOrdering::Acquire,
            )
            .is_ok()
        {
            return Err(ServiceError::QueuedPastDeadline {
                machine_id: machine_id.to_owned(),
            }
            .into());
        }
        // Started: its own calls end at the deadline; give its answer a moment.
        match tokio::time::timeout(Duration::from_secs(1), answer).await {
            Ok(result) => result.unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(ServiceError::ActingPastDeadline {
                machine_id: machine_id.to_owned(),
            }
            .into()),
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
        let asked = ActionId::from(action_id);
        if asked != *found.action.id {
            return Err(ServiceError::OtherActionAnswered {
                asked: action_id.to_owned(),
                answered: found.action.id,
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
            tokio::time::sleep_until(next).await;
            // Give the read a second past `until` to come back.
            let read_by = until + Duration::from_secs(1);
            match self
                .inner
                .client
                .action(&success.action.action.id, read_by)
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

        // Refused (finished meanwhile), or the answer was lost: read the
        // action again.
        let failed = match self
            .inner
            .send_cancel(action_id, &comment, None, deadline)
            .await
        {
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

    /// The tenant's restrict and unrestrict actions, for the fleet view.
    pub async fn history(&self, deadline: Instant) -> Result<ActionListing, ServiceError> {
        Ok(self.inner.client.restrict_history(deadline, None).await?)
    }

    /// The comment as sent to Defender: with the caller, unless turned off
    /// (`COMMENT_INCLUDE_CALLER`).
    fn comment(&self, comment: &Comment, caller: Option<&CallerName>) -> String {
        comment_for_defender(comment, caller, self.inner.include_caller)
    }
}

/// What a cancel request came to, when Defender answered it.
enum CancelSent {
    Accepted(Box<ActionRecord>),
    /// Defender refused it (400): the action is no longer pending, or is
    /// being finished.
    NoLongerPending {
        message: String,
    },
}

/// 409 when the action is already final.
fn check_pending(found: &ActionRecord) -> Result<(), ServiceError> {
    match found.action.status.known() {
        Some(status) if status.is_terminal() => Err(ServiceError::ActionNotPending {
            action_id: found.action.id.clone(),
            status: found.action.status.clone(),
        }),
        _ => Ok(()),
    }
}

impl Shared {
    /// Serve the machine's queued jobs, a round at a time, until none is left.
    ///
    /// A round takes every job queued so far, reads the machine's actions
    /// once (a read sent after all of them were queued), and serves the jobs
    /// in order, each deciding on the state the ones before it left behind.
    /// Duplicates arriving together thus cost one read and at most one POST,
    /// and a restrict and a release are still put in order.
    async fn serve_machine(self: Arc<Self>, key: MachineId, machine_id: String) {
        let mut guard = RoundGuard {
            queues: &self.queues,
            key: &key,
            armed: true,
        };
        while let Some(jobs) = self.queues.take(&key) {
            // Jobs whose invocation gave up are dropped before anything is read.
            let mut jobs: Vec<Job> = jobs
                .into_iter()
                .filter(|job| job.stage.load(AtomicOrdering::Acquire) == QUEUED)
                .collect();
            let Some(read_by) = jobs.iter().map(|job| job.deadline).max() else {
                continue;
            };
            // Across instances, the round holds the machine's lease from
            // before the read until its last POST is settled. If every caller
            // hangs up meanwhile, the round stops waiting and reads nothing.
            let lease = match &self.coordinator {
                None => None,
                Some(coordinator) => {
                    let departed = all_departed(&jobs);
                    let mut answer = |handoff: &Handoff| answer_from_handoff(&mut jobs, handoff);
                    let locked = tokio::select! {
                        locked = coordinator.lock_machine_unless(&machine_id, read_by, &mut answer) => Some(locked),
                        () = departed => None,
                    };
                    match locked {
                        Some(Ok(Locked::Held(lease))) => Some(lease),
                        Some(Ok(Locked::Answered)) => continue,
                        Some(Err(e)) => {
                            for job in jobs {
                                let _ = job.reply.send(Err(ServiceError::from(e.clone()).into()));
                            }
                            continue;
                        }
                        None => continue,
                    }
                }
            };
            let read = tokio::select! {
                read = self.reads.read(&machine_id, read_by) => Some(read),
                () = all_departed(&jobs) => None,
            };
            let Some(read) = read else {
                continue; // Nobody left to answer; the lease is released on drop.
            };
            let mut state = Some(read);
            let writes = Writes::default();
            for job in jobs {
                if !job.start() {
                    continue;
                }
                // A job that failed leaves the state unknown: the next one
                // reads again.
                let actions = match state.take() {
                    Some(Ok(actions)) => Ok(actions),
                    Some(Err(e)) => Err(e),
                    None => self.reads.read(&machine_id, job.deadline).await,
                };
                let started = Instant::now();
                let departure = job.departure.clone();
                let result = match actions {
                    Ok(mut actions) => {
                        let served = {
                            let serve = self.serve(
                                &machine_id,
                                &job,
                                lease.as_ref(),
                                &writes,
                                &mut actions,
                            );
                            tokio::pin!(serve);
                            tokio::select! {
                                result = &mut serve => Some(result),
                                _ = departure => {
                                    // Stopped where it stood, unless it already sent a
                                    // POST or cancel: its outcome is then waited for,
                                    // so that the next read knows what it did.
                                    if writes.sent_since(started).is_some() {
                                        Some(serve.await)
                                    } else {
                                        None
                                    }
                                }
                            }
                        };
                        if matches!(served, Some(Ok(_))) {
                            state = Some(Ok(actions));
                        }
                        served
                    }
                    Err(e) => Some(Err(JobError::from(e))),
                };
                // A write whose outcome is unknown (it failed, or timed out)
                // may still be recorded by Defender: give it time to show
                // before anyone reads this machine again, here or elsewhere.
                if !matches!(result, Some(Ok(_)))
                    && let Some(sent) = writes.sent_since(started)
                {
                    tokio::time::sleep_until(sent + SETTLE).await;
                }
                if let Some(result) = result {
                    let _ = job.reply.send(result);
                }
            }
            // Released before the next round (here or elsewhere) asks for it.
            if let Some(lease) = lease
                && let Err(e) = lease.release().await
            {
                tracing::warn!(machine_id = %machine_id, error = %e, "could not release the machine lease; it expires by itself");
            }
        }
        guard.armed = false;
    }

    /// Decide one job on `actions` and act; `actions` is kept up to date with
    /// what this job created, cancelled or read.
    async fn serve(
        &self,
        machine_id: &str,
        job: &Job,
        lease: Option<&MachineLease>,
        writes: &Writes,
        actions: &mut Vec<MachineAction>,
    ) -> JobResult {
        let wanted = job.wanted;
        let deadline = job.deadline;
        let mut cancelled = Vec::new();
        // Cancel at most once: a second round that still sees a pending
        // opposite action reports the conflict.
        let mut cancel_round_done = false;
        loop {
            let decision = decision::decide(
                machine_id,
                actions,
                Wanted {
                    cancel_pending: wanted.cancel_pending && !cancel_round_done,
                    ..wanted
                },
            );
            let listed = |outcome, action: MachineAction, cancelled| {
                Ok(Acted::from_listed(outcome, action, cancelled))
            };
            match decision {
                Decision::Conflict(action) => {
                    return Err(ServiceError::ConflictingActionPending {
                        machine_id: machine_id.to_owned(),
                        action: Box::new(action),
                        created_meanwhile: false,
                    }
                    .into());
                }
                Decision::AlreadyPending(action) => {
                    return listed(Outcome::AlreadyPending, action, cancelled);
                }
                Decision::AlreadyInState(action) => {
                    return listed(Outcome::AlreadyInState, action, cancelled);
                }
                Decision::Act => {
                    return self
                        .act(
                            machine_id,
                            wanted.action,
                            &job.comment,
                            SendGuard::new(lease, writes),
                            actions,
                            deadline,
                        )
                        .await
                        .map(|mut acted| {
                            acted.cancelled = cancelled;
                            acted
                        });
                }
                Decision::Cancel(pending) => {
                    // Created after this request arrived, here (our own record)
                    // or on another instance (Defender's creation time, past the
                    // clock skew allowance): not what the caller meant to cancel.
                    if let Some(young) = pending.iter().find(|a| {
                        self.created_after(&a.id, job.arrived)
                            || created_after_utc(a, job.arrived_utc)
                    }) {
                        return Err(ServiceError::ConflictingActionPending {
                            machine_id: machine_id.to_owned(),
                            action: Box::new(young.clone()),
                            created_meanwhile: true,
                        }
                        .into());
                    }
                    let why = format!(
                        "Cancelled to apply {}: {}",
                        wanted.action.as_str(),
                        job.comment
                    );
                    if let Some(lease) = lease {
                        lease.check().map_err(ServiceError::from)?;
                        // The last holder's handoff would no longer be true.
                        lease.withdraw_handoff().await.map_err(ServiceError::from)?;
                    }
                    let mut asked = Vec::new();
                    for action in pending {
                        // `false`: it finished meanwhile; the re-read decides.
                        let guard = SendGuard::new(lease, writes);
                        if self
                            .cancel_opposite(&action, &why, &guard, deadline)
                            .await?
                        {
                            asked.push(ActionId::from(action.id.as_str()));
                            cancelled.push(action.id);
                        }
                    }
                    cancel_round_done = true;
                    // A cancel is not known to be immediate: decide again
                    // only on a read that shows every cancelled action final.
                    *actions = self.until_final(machine_id, &asked, deadline).await?;
                }
            }
        }
    }

    /// Create the action. After an ambiguous failure, look for the action it
    /// may have created; re-send only when there is none.
    async fn act(
        &self,
        machine_id: &str,
        action_type: ActionType,
        comment: &str,
        guard: SendGuard<'_>,
        actions: &mut Vec<MachineAction>,
        deadline: Instant,
    ) -> JobResult {
        let mut known: HashSet<ActionId> = actions
            .iter()
            .map(|a| ActionId::from(a.id.as_str()))
            .collect();
        // When the first POST was sent: an action a re-sent POST is answered
        // with that is younger than this may be the first POST's own.
        let sent = OffsetDateTime::now_utc();
        if let Some(lease) = guard.lease {
            // The last holder's handoff would no longer be true.
            lease.withdraw_handoff().await.map_err(ServiceError::from)?;
        }
        let mut posts = 0;
        loop {
            posts += 1;
            let error = match self
                .client
                .create_action_with(machine_id, action_type, comment, &guard, deadline)
                .await
            {
                Ok(created) if existed_before(&created.action, &known, sent) => {
                    guard.hand_off(&created).await;
                    // A duplicate answered with the action already under
                    // way: nothing new was created.
                    tracing::info!(action_id = %created.action.id, created = ?created.action.creation_date_time_utc, "Defender answered the POST with an action that already existed");
                    if !known.contains(&ActionId::from(created.action.id.as_str())) {
                        actions.push(created.action.clone());
                    }
                    return Ok(Acted::answered(Outcome::AlreadyPending, created));
                }
                Ok(created) => {
                    guard.hand_off(&created).await;
                    self.remember_created(&created.action.id);
                    actions.push(created.action.clone());
                    return Ok(Acted::answered(Outcome::Requested, created));
                }
                Err(e) => e,
            };

            if let DefenderError::Status { status: 404, .. } = error {
                return Err(JobError::MachineGone(error));
            }
            if error.is_already_in_progress() {
                return self
                    .already_pending(machine_id, action_type, actions, deadline)
                    .await;
            }
            if !error.is_ambiguous() {
                return Err(error.into());
            }

            // Did the POST land? Give Defender a moment to record it, then
            // read the actions again (GETs are retried).
            tracing::warn!(error = %error, "creating the action failed ambiguously; checking whether it exists");
            let settle = Instant::now() + SETTLE;
            if settle < deadline {
                tokio::time::sleep_until(settle).await;
            }
            match self.reads.read(machine_id, deadline).await {
                Ok(reread) => *actions = reread,
                Err(reread) => {
                    tracing::warn!(error = %reread, "could not re-read the machine's actions");
                    return Err(error.into());
                }
            }
            if let Some(landed) = actions.iter().find(|a| {
                a.action_type.known() == Some(action_type)
                    && !known.contains(&ActionId::from(a.id.as_str()))
            }) {
                tracing::info!(action_id = %landed.id, "the action was created despite the failed answer");
                self.remember_created(&landed.id);
                return Ok(Acted::from_listed(
                    Outcome::Requested,
                    landed.clone(),
                    Vec::new(),
                ));
            }
            if posts >= MAX_POSTS || Instant::now() >= deadline {
                return Err(ServiceError::NotCreated(error).into());
            }
            known.extend(actions.iter().map(|a| ActionId::from(a.id.as_str())));
        }
    }

    /// Defender refused a duplicate: find the same-type action it says is pending.
    async fn already_pending(
        &self,
        machine_id: &str,
        action_type: ActionType,
        actions: &mut Vec<MachineAction>,
        deadline: Instant,
    ) -> JobResult {
        *actions = self.reads.read(machine_id, deadline).await?;
        let pending = actions.iter().find(|a| {
            a.action_type.known() == Some(action_type)
                && a.status.known().is_some_and(|s| !s.is_terminal())
        });
        match pending {
            Some(action) => Ok(Acted::from_listed(
                Outcome::AlreadyPending,
                action.clone(),
                Vec::new(),
            )),
            None => Err(ServiceError::InProgressNoneListed {
                machine_id: machine_id.to_owned(),
                action: action_type,
            }
            .into()),
        }
    }

    /// Cancel one pending opposite action; `false` when it had reached a
    /// final state meanwhile (the re-read that follows decides what now).
    async fn cancel_opposite(
        &self,
        action: &MachineAction,
        comment: &str,
        guard: &dyn BeforeSend,
        deadline: Instant,
    ) -> Result<bool, ServiceError> {
        match self
            .send_cancel(&action.id, comment, Some(guard), deadline)
            .await?
        {
            CancelSent::Accepted(cancelled) => {
                tracing::info!(action_id = %cancelled.action.id, status = %cancelled.action.status, "cancelled a pending opposite action");
                Ok(true)
            }
            CancelSent::NoLongerPending { .. } => Ok(false),
        }
    }

    /// Ask Defender to cancel `action_id`. A 400 means it can no longer be
    /// cancelled; any other failure is the caller's to judge.
    async fn send_cancel(
        &self,
        action_id: &str,
        comment: &str,
        guard: Option<&dyn BeforeSend>,
        deadline: Instant,
    ) -> Result<CancelSent, DefenderError> {
        match self
            .client
            .cancel_action_with(action_id, comment, guard, deadline)
            .await
        {
            Ok(cancelled) => Ok(CancelSent::Accepted(Box::new(cancelled))),
            Err(DefenderError::Status {
                status: 400,
                message,
                ..
            }) => Ok(CancelSent::NoLongerPending { message }),
            Err(e) => Err(e),
        }
    }

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

    /// Read the machine's actions until none of `ids` is
    /// Pending or InProgress, first after [`CANCEL_POLL_FIRST`], then less
    /// often, and answer the read that shows it. Gives up with [`ServiceError::CancelNotFinal`]
    /// when the next read would leave too little time to act.
    async fn until_final(
        &self,
        machine_id: &str,
        ids: &[ActionId],
        deadline: Instant,
    ) -> Result<Vec<MachineAction>, ServiceError> {
        let mut pause = CANCEL_POLL_FIRST;
        loop {
            let actions = self.reads.read(machine_id, deadline).await?;
            let unfinished = actions.iter().find(|a| {
                ids.contains(&ActionId::from(a.id.as_str()))
                    && a.status.known().is_some_and(|s| !s.is_terminal())
            });
            let Some(unfinished) = unfinished else {
                return Ok(actions);
            };
            let next = Instant::now() + pause;
            pause = (pause * 3 / 2).min(POLL_EVERY);
            if next + ACT_RESERVE > deadline {
                return Err(ServiceError::CancelNotFinal {
                    machine_id: machine_id.to_owned(),
                    action: Box::new(unfinished.clone()),
                });
            }
            tracing::info!(action_id = %unfinished.id, status = %unfinished.status, "waiting for a cancelled action to be final");
            tokio::time::sleep_until(next).await;
        }
    }

    /// Whether this instance created the action after `arrived`.
    fn created_after(&self, action_id: &str, arrived: Instant) -> bool {
        let created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        created
            .get(&ActionId::from(action_id))
            .is_some_and(|at| *at > arrived)
    }

    /// Actions this instance created, kept for a while (see `cancelPending`).
    fn remember_created(&self, action_id: &str) {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        created.sweep(|_, at| at.elapsed() < CREATED_MEMORY);
        created.insert(ActionId::from(action_id), Instant::now());
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

/// Answer the round's jobs that a [`Handoff`] answers, while they wait for
/// another instance's lease; `true` when none is left to wait.
///
/// The handoff is the action another instance's POST created (or was
/// answered with) for this machine, still pending, and no write was sent
/// under the lease for the machine after it. A job for the same action type that arrived
/// before that POST was sent (beyond the clock skew allowance) would read the
/// same: its decision is `already_pending` with that action, whatever the
/// other options ([`decision::decide`]). So it is answered so, without the
/// lease or a read of its own. Every other job keeps waiting.
fn answer_from_handoff(jobs: &mut Vec<Job>, handoff: &Handoff) -> bool {
    let Ok(action) = serde_json::from_value::<MachineAction>(handoff.action.clone()) else {
        return false;
    };
    let sent = OffsetDateTime::from(handoff.sent);
    let pending = action.status.known().is_some_and(|s| !s.is_terminal());
    let answers = |job: &Job| {
        pending
            && action.action_type.known() == Some(job.wanted.action)
            && job
                .arrived_utc
                .checked_add(CLOCK_SKEW)
                .is_some_and(|arrived| arrived < sent)
    };
    let (answered, waiting): (Vec<Job>, Vec<Job>) = std::mem::take(jobs)
        .into_iter()
        .filter(|job| job.stage.load(AtomicOrdering::Acquire) == QUEUED)
        .partition(|job| answers(job));
    *jobs = waiting;
    for job in answered {
        if job.start() {
            tracing::info!(action_id = %action.id, "answered with the action another instance just created for the machine");
            let _ = job.reply.send(Ok(Acted {
                outcome: Outcome::AlreadyPending,
                action: ActionRecord {
                    action: action.clone(),
                    raw: handoff.action.clone(),
                },
                cancelled: Vec::new(),
            }));
        }
    }
    jobs.is_empty()
}

/// When a round last sent a POST or cancel to Defender.
#[derive(Debug, Default)]
struct Writes(Mutex<Option<Instant>>);

impl Writes {
    fn sent(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the last write was sent, if that was at or after `since`.
    fn sent_since(&self, since: Instant) -> Option<Instant> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|&sent| sent >= since)
    }
}

/// What a POST or cancel is sent under. Across instances it holds the
/// machine's lease, checked right before the request goes out, after any wait
/// for the rate budget (which can be minutes): a lease lost meanwhile means
/// another instance may be deciding for the machine now, so nothing is sent,
/// and the request must be over before the lease could run out. Its budget
/// slot is announced to the instances waiting for the lease, so that they
/// sleep instead of polling. Each request sent is noted in the round's
/// [`Writes`].
struct SendGuard<'a> {
    lease: Option<&'a MachineLease>,
    writes: &'a Writes,
}

impl<'a> SendGuard<'a> {
    fn new(lease: Option<&'a MachineLease>, writes: &'a Writes) -> Self {
        Self { lease, writes }
    }
}

impl SendGuard<'_> {
    /// Leave a POST's pending action for the instances waiting for the lease.
    async fn hand_off(&self, created: &ActionRecord) {
        let pending = created
            .action
            .status
            .known()
            .is_some_and(|s| !s.is_terminal());
        if let (Some(lease), Some(sent), true) = (self.lease, self.writes.last(), pending) {
            let sent = SystemTime::now() - sent.elapsed();
            lease.hand_off(&created.raw, sent).await;
        }
    }
}

#[async_trait::async_trait]
impl BeforeSend for SendGuard<'_> {
    fn slot(&self, at: Instant) {
        if let Some(lease) = self.lease {
            lease.announce(at);
        }
    }

    async fn before_send(&self, _endpoint: Endpoint) -> Result<Option<Instant>, Refusal> {
        let until = match self.lease.map(MachineLease::check) {
            None => None,
            Some(Ok(until)) => Some(until),
            Some(Err(unavailable @ CoordinationError::Unavailable { .. })) => {
                return Err(Refusal::new(unavailable));
            }
            Some(Err(other)) => return Err(Refusal::new(other.into_unavailable())),
        };
        self.writes.sent();
        Ok(until)
    }
}

/// Marks a job abandoned when its invocation goes away before the round
/// started it, so that the round skips it and reads and sends nothing for it.
struct AbandonIfQueued(Arc<AtomicU8>);

impl Drop for AbandonIfQueued {
    fn drop(&mut self) {
        let _ = self.0.compare_exchange(
            QUEUED,
            ABANDONED,
            AtomicOrdering::AcqRel,
            AtomicOrdering::Acquire,
        );
    }
}

/// Clears a machine's queue if its round ends without emptying it (a panic),
/// so that later invocations start a new round instead of waiting forever.
struct RoundGuard<'a> {
    queues: &'a MachineQueues<Job>,
    key: &'a MachineId,
    armed: bool,
}

impl Drop for RoundGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.queues.abandon(self.key);
        }
    }
}

impl Acted {
    /// What a POST was answered with, exactly as Defender returned it.
    fn answered(outcome: Outcome, created: ActionRecord) -> Self {
        Self {
            outcome,
            action: created,
            cancelled: Vec::new(),
        }
    }

    fn from_listed(outcome: Outcome, action: MachineAction, cancelled: Vec<String>) -> Self {
        Self {
            outcome,
            action: ActionRecord {
                // The typed action keeps every field it was given (`extra`),
                // so this is the record as Defender listed it.
                raw: serde_json::to_value(&action).unwrap_or(Value::Null),
                action,
            },
            cancelled,
        }
    }
}

/// Whether Defender says the action was created after `arrived`, by more than
/// the clock skew allowance.
fn created_after_utc(action: &MachineAction, arrived: OffsetDateTime) -> bool {
    action
        .creation_date_time_utc
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .and_then(|created| created.checked_sub(CLOCK_SKEW))
        .is_some_and(|created| created > arrived)
}

/// Whether a 201's action is one Defender already had: the state read held
/// its id, or it was created before the POST was sent (beyond clock skew).
fn existed_before(action: &MachineAction, known: &HashSet<ActionId>, sent: OffsetDateTime) -> bool {
    if known.contains(&ActionId::from(action.id.as_str())) {
        return true;
    }
    action
        .creation_date_time_utc
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .and_then(|created| created.checked_add(CLOCK_SKEW))
        .is_some_and(|created| created < sent)
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

    fn action_created(id: &str, created: &str) -> MachineAction {
        serde_json::from_value(json!({
            "id": id,
            "type": "RestrictCodeExecution",
            "status": "Pending",
            "creationDateTimeUtc": created,
        }))
        .unwrap()
    }

    #[test]
    fn an_answer_with_an_action_defender_already_had_is_recognised() {
        let sent = OffsetDateTime::parse("2026-12-01T10:00:00Z", &Rfc3339).unwrap();
        let none = HashSet::new();
        // Created before the POST was sent, beyond a second of clock skew.
        let old = action_created("a", "2026-12-01T09:59:58.5000000Z");
        assert!(existed_before(&old, &none, sent));
        // Within the skew, or after: the POST's own action.
        let skewed = action_created("b", "2026-12-01T09:59:59.5000000Z");
        assert!(!existed_before(&skewed, &none, sent));
        let new = action_created("c", "2026-12-01T10:00:00.2000000Z");
        assert!(!existed_before(&new, &none, sent));
        // An id the state read held, whatever its time says.
        let known: HashSet<ActionId> = [ActionId::from("c")].into();
        assert!(existed_before(&new, &known, sent));
        let upper = action_created("C", "2026-12-01T10:00:00.2000000Z");
        assert!(existed_before(&upper, &known, sent));
        // No or unreadable creation time: not known to be old.
        let undated = action_created("d", "yesterday");
        assert!(!existed_before(&undated, &none, sent));
    }

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
