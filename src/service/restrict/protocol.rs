//! What one device's request does, whoever asks: decide on the machine's
//! actions, cancel a pending opposite action if asked, create the action,
//! and see an unclear answer through.
//!
//! Plain async functions over what they need: the Defender client, the
//! machine's state reads, the machine's actions (kept up to date in place)
//! and a [`Writer`] that every write goes out through. When and under which
//! lock they run is the caller's ([`super::round`], [`super::leased`]).

use std::{collections::HashSet, time::Duration};

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    defender::{
        DefenderClient, DefenderError,
        client::{ActionRecord, BeforeSend},
        ids::{ActionId, MachineId},
        models::{ActionType, MachineAction},
        timestamp::Timestamp,
    },
    service::{
        decision::{self, Decision, Wanted},
        machine_directory::Swept,
        service_error::ServiceError,
        state_reads::StateReads,
    },
};

use super::{Outcome, POLL_EVERY};

/// POSTs of one action per request at most: the first, and re-sends after
/// ambiguous failures that left no action behind.
const MAX_POSTS: usize = 3;
/// Pause before re-reading after an ambiguous POST, so that an action
/// Defender committed late is seen rather than duplicated.
pub(super) const SETTLE: Duration = Duration::from_secs(2);

/// How far Defender's clock may be behind ours when telling an action it
/// created for our POST from one it already had. A duplicate POST can be
/// answered 201 with the existing pending action; an action created before
/// the POST was sent cannot be the POST's, but the two clocks are not the
/// same clock: a second of skew must not make a new action look old. A clock
/// off by more only relabels the answer (`already_pending` instead of
/// `requested`): the action returned is the one Defender answered with
/// either way.
pub(super) const CLOCK_SKEW: time::Duration = time::Duration::seconds(1);

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

/// What one caller asked of one machine.
#[derive(Debug)]
pub(super) struct Order {
    pub wanted: Wanted,
    /// The comment as sent to Defender.
    pub comment: String,
    /// When the caller asked.
    pub arrived: Instant,
    /// The same on the wall clock, to compare with Defender's creation times
    /// of actions other instances created.
    pub arrived_utc: OffsetDateTime,
    pub deadline: Instant,
    /// Background work (a job's device): read through the background reads.
    pub background: bool,
}

/// What serving one order did, before the machine record is added.
#[derive(Debug)]
pub(super) struct Acted {
    pub outcome: Outcome,
    pub action: ActionRecord,
    pub cancelled: Vec<ActionId>,
}

/// Why an order did not succeed. `Clone`: a definite refusal answers the
/// orders of the round that ask the same thing ([`Refusals`]).
#[derive(Debug, Clone)]
pub(super) enum ServeError {
    /// A POST for the machine answered 404: the record may be stale.
    MachineGone(DefenderError),
    /// Defender refused this order's POST for good (403, 422, a 400 that
    /// is not "already in progress"): nothing was created, the state the
    /// order decided on stands.
    Refused(ServiceError),
    Failed(ServiceError),
}

impl From<ServiceError> for ServeError {
    fn from(e: ServiceError) -> Self {
        Self::Failed(e)
    }
}

impl From<DefenderError> for ServeError {
    fn from(e: DefenderError) -> Self {
        Self::Failed(e.into())
    }
}

/// The answer to one order.
pub(super) type Served = Result<Acted, ServeError>;

/// What every write to Defender goes out through: the client runs it as its
/// hook before each attempt, and the protocol tells it where a write begins
/// and what a POST created (across instances, the machine's lease keeps
/// both; see [`super::leased`]).
#[async_trait::async_trait]
pub(super) trait Writer: BeforeSend {
    /// Fails when writes may no longer go out (the machine's lease was lost).
    fn still_held(&self) -> Result<(), ServiceError>;

    /// Before an order's first write: what the last write handed off to
    /// waiting instances would no longer be true once this one may land.
    async fn withdraw_handoff(&self) -> Result<(), ServiceError>;

    /// After a POST answered with `created`: hand its pending action to the
    /// instances waiting for the machine (best effort).
    async fn hand_off(&self, created: &ActionRecord);
}

/// Actions this instance created, and when (see `cancelPending`).
#[derive(Debug, Default)]
pub(super) struct Created(Mutex<Swept<ActionId, Instant>>);

impl Created {
    /// Whether this instance created the action after `arrived`.
    fn after(&self, action_id: &ActionId, arrived: Instant) -> bool {
        self.0.lock().get(action_id).is_some_and(|at| *at > arrived)
    }

    /// Remember an action this instance created, for a while.
    fn remember(&self, action_id: &ActionId) {
        let mut created = self.0.lock();
        created.sweep(|_, at| at.elapsed() < CREATED_MEMORY);
        created.insert(action_id.clone(), Instant::now());
    }
}

/// Definite refusals of a POST in one round, per action type: Defender
/// answered 403, 404 or 422 (or 400 for the device's platform or client
/// version), so nothing was created and the machine's
/// actions are as they were. A later order of the round that would send the
/// same POST on the same state gets the same answer, without sending it.
#[derive(Debug, Default)]
pub(super) struct Refusals(Mutex<Vec<(ActionType, ServeError)>>);

impl Refusals {
    fn get(&self, action: ActionType) -> Option<ServeError> {
        self.0
            .lock()
            .iter()
            .find(|(refused, _)| *refused == action)
            .map(|(_, error)| error.clone())
    }

    fn note(&self, action: ActionType, error: &ServeError) {
        let mut refusals = self.0.lock();
        if !refusals.iter().any(|(refused, _)| *refused == action) {
            refusals.push((action, error.clone()));
        }
    }
}

/// Whether Defender refused a POST for good: the request was understood and
/// turned down (a missing role, no such machine, an unsupported device, a
/// bad request), so no action exists because of it. Unlike a timeout or a
/// 5xx, its outcome is known: nobody need wait for it to show.
pub(super) fn definite_refusal(error: &DefenderError) -> bool {
    match error {
        DefenderError::Status { status: 400, .. } => !error.is_already_in_progress(),
        DefenderError::Status { status, .. } => matches!(status, 403 | 404 | 422),
        _ => false,
    }
}

/// Whether a definite refusal is about the machine or the app rather than
/// the one request (its comment): any POST of the same type for the machine
/// would be refused the same way.
fn refusal_for_any_post(error: &DefenderError) -> bool {
    match error {
        DefenderError::Status {
            status: 400, code, ..
        } => matches!(
            code.as_str(),
            "OsPlatformNotSupported" | "ClientVersionNotSupported"
        ),
        DefenderError::Status { status, .. } => matches!(status, 403 | 404 | 422),
        _ => false,
    }
}

/// Whether an order's answer leaves the machine's actions as the order found
/// them (or as it last read them): it succeeded, or it was refused on the
/// state (a conflicting action pending) or by Defender for good. The next
/// order of the round can then decide on the same state without reading it
/// again, and no write of unknown outcome needs time to show.
pub(super) fn state_known_after(served: &Served) -> bool {
    match served {
        Ok(_) => true,
        Err(ServeError::MachineGone(_)) => true,
        Err(ServeError::Failed(ServiceError::ConflictingActionPending { .. })) => true,
        Err(ServeError::Refused(_)) => true,
        // Any other failure, a 4xx on a cancel or on a read after one
        // included: what the order did to the state is not known.
        Err(ServeError::Failed(_)) => false,
    }
}

/// One machine, and what the protocol acts on it with.
pub(super) struct Device<'a, W> {
    pub client: &'a DefenderClient,
    pub reads: &'a StateReads,
    pub created: &'a Created,
    pub refusals: &'a Refusals,
    pub machine_id: &'a MachineId,
    pub writer: &'a W,
}

impl<W: Writer> Device<'_, W> {
    /// Decide `order` on `actions` and act; `actions` is kept up to date with
    /// what this order created, cancelled or read.
    pub async fn serve(&self, order: &Order, actions: &mut Vec<MachineAction>) -> Served {
        let machine_id = self.machine_id;
        let wanted = order.wanted;
        let deadline = order.deadline;
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
                        machine_id: machine_id.to_string(),
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
                    // Refused for good earlier in this round, on this state.
                    if let Some(refused) = self.refusals.get(wanted.action) {
                        return Err(refused);
                    }
                    return self
                        .act(wanted.action, &order.comment, actions, deadline)
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
                        self.created.after(&a.id, order.arrived)
                            || created_after_utc(a, order.arrived_utc)
                    }) {
                        return Err(ServiceError::ConflictingActionPending {
                            machine_id: machine_id.to_string(),
                            action: Box::new(young.clone()),
                            created_meanwhile: true,
                        }
                        .into());
                    }
                    let why = format!(
                        "Cancelled to apply {}: {}",
                        wanted.action.as_str(),
                        order.comment
                    );
                    self.writer.still_held()?;
                    self.writer.withdraw_handoff().await?;
                    let mut asked = Vec::new();
                    for action in pending {
                        // `false`: it finished meanwhile; the re-read decides.
                        if self.cancel_opposite(&action, &why, deadline).await? {
                            asked.push(action.id.clone());
                            cancelled.push(action.id);
                        }
                    }
                    cancel_round_done = true;
                    // A cancel is not known to be immediate: decide again
                    // only on a read that shows every cancelled action final.
                    *actions = self.until_final(&asked, deadline).await?;
                }
            }
        }
    }

    /// Create the action. After an ambiguous failure, look for the action it
    /// may have created; re-send only when there is none.
    async fn act(
        &self,
        action_type: ActionType,
        comment: &str,
        actions: &mut Vec<MachineAction>,
        deadline: Instant,
    ) -> Served {
        let machine_id = self.machine_id;
        let mut known: HashSet<ActionId> = actions.iter().map(|a| a.id.clone()).collect();
        // When the first POST was sent: an action a re-sent POST is answered
        // with that is younger than this may be the first POST's own.
        let sent = OffsetDateTime::now_utc();
        self.writer.withdraw_handoff().await?;
        let mut posts = 0;
        loop {
            posts += 1;
            let error = match self
                .client
                .create_action_with(
                    machine_id.as_str(),
                    action_type,
                    comment,
                    self.writer,
                    deadline,
                )
                .await
            {
                // An answer about another machine, or of another type, is not
                // this POST's action: neither ours nor pending for the device.
                Ok(created) if !answers_post(&created.action, machine_id, action_type) => {
                    tracing::error!(action_id = %created.action.id, answered_machine_id = ?created.action.machine_id, answered_type = %created.action.action_type, "Defender answered the POST with an action for another machine or of another type");
                    return Err(ServiceError::OtherActionCreated {
                        machine_id: machine_id.to_string(),
                        action: action_type,
                        answered: Box::new(created.action),
                    }
                    .into());
                }
                Ok(created) if existed_before(&created.action, &known, sent) => {
                    self.writer.hand_off(&created).await;
                    // A duplicate answered with the action already under
                    // way: nothing new was created.
                    tracing::info!(action_id = %created.action.id, created = ?created.action.creation_date_time_utc, "Defender answered the POST with an action that already existed");
                    if !known.contains(&created.action.id) {
                        actions.push(created.action.clone());
                    }
                    return Ok(Acted::answered(Outcome::AlreadyPending, created));
                }
                Ok(created) => {
                    self.writer.hand_off(&created).await;
                    self.created.remember(&created.action.id);
                    actions.push(created.action.clone());
                    return Ok(Acted::answered(Outcome::Requested, created));
                }
                Err(e) => e,
            };

            if definite_refusal(&error) {
                let shared = refusal_for_any_post(&error);
                let refused = match error {
                    DefenderError::Status { status: 404, .. } => ServeError::MachineGone(error),
                    error => ServeError::Refused(error.into()),
                };
                if shared {
                    self.refusals.note(action_type, &refused);
                }
                return Err(refused);
            }
            if error.is_already_in_progress() {
                return self.already_pending(action_type, actions, deadline).await;
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
            if let Some(landed) = actions
                .iter()
                .find(|a| a.action_type.known() == Some(action_type) && !known.contains(&a.id))
            {
                tracing::info!(action_id = %landed.id, "the action was created despite the failed answer");
                self.created.remember(&landed.id);
                return Ok(Acted::from_listed(
                    Outcome::Requested,
                    landed.clone(),
                    Vec::new(),
                ));
            }
            if posts >= MAX_POSTS || Instant::now() >= deadline {
                return Err(ServiceError::NotCreated(error).into());
            }
            known.extend(actions.iter().map(|a| a.id.clone()));
        }
    }

    /// Defender refused a duplicate: find the same-type action it says is pending.
    async fn already_pending(
        &self,
        action_type: ActionType,
        actions: &mut Vec<MachineAction>,
        deadline: Instant,
    ) -> Served {
        *actions = self.reads.read(self.machine_id, deadline).await?;
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
                machine_id: self.machine_id.to_string(),
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
        deadline: Instant,
    ) -> Result<bool, ServiceError> {
        match send_cancel(
            self.client,
            action.id.as_str(),
            comment,
            Some(self.writer),
            deadline,
        )
        .await?
        {
            CancelSent::Accepted(cancelled) => {
                tracing::info!(action_id = %cancelled.action.id, status = %cancelled.action.status, "cancelled a pending opposite action");
                Ok(true)
            }
            CancelSent::NoLongerPending { .. } => Ok(false),
        }
    }

    /// Read the machine's actions until none of `ids` is
    /// Pending or InProgress, first after [`CANCEL_POLL_FIRST`], then less
    /// often, and answer the read that shows it. Gives up with [`ServiceError::CancelNotFinal`]
    /// when the next read would leave too little time to act.
    async fn until_final(
        &self,
        ids: &[ActionId],
        deadline: Instant,
    ) -> Result<Vec<MachineAction>, ServiceError> {
        let mut pause = CANCEL_POLL_FIRST;
        loop {
            let actions = self.reads.read(self.machine_id, deadline).await?;
            let unfinished = actions.iter().find(|a| {
                ids.contains(&a.id) && a.status.known().is_some_and(|s| !s.is_terminal())
            });
            let Some(unfinished) = unfinished else {
                return Ok(actions);
            };
            let next = Instant::now() + pause;
            pause = (pause * 3 / 2).min(POLL_EVERY);
            if next + ACT_RESERVE > deadline {
                return Err(ServiceError::CancelNotFinal {
                    machine_id: self.machine_id.to_string(),
                    action: Box::new(unfinished.clone()),
                });
            }
            tracing::info!(action_id = %unfinished.id, status = %unfinished.status, "waiting for a cancelled action to be final");
            tokio::time::sleep_until(next).await;
        }
    }
}

/// What a cancel request came to, when Defender answered it.
pub(super) enum CancelSent {
    Accepted(Box<ActionRecord>),
    /// Defender refused it (400): the action is no longer pending, or is
    /// being finished.
    NoLongerPending {
        message: String,
    },
}

/// Ask Defender to cancel `action_id`, through `writer` when there is one.
/// A 400 means it can no longer be cancelled; any other failure is the
/// caller's to judge.
pub(super) async fn send_cancel(
    client: &DefenderClient,
    action_id: &str,
    comment: &str,
    writer: Option<&dyn BeforeSend>,
    deadline: Instant,
) -> Result<CancelSent, DefenderError> {
    match client
        .cancel_action_with(action_id, comment, writer, deadline)
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

impl Acted {
    /// What a POST was answered with, exactly as Defender returned it.
    pub(super) fn answered(outcome: Outcome, created: ActionRecord) -> Self {
        Self {
            outcome,
            action: created,
            cancelled: Vec::new(),
        }
    }

    /// An action read from the machine's list: known only typed.
    fn from_listed(outcome: Outcome, action: MachineAction, cancelled: Vec<ActionId>) -> Self {
        Self {
            outcome,
            action: action.into(),
            cancelled,
        }
    }
}

/// Whether a POST's answer is an action of the type asked for, on the
/// machine asked about. An answer that names no machine is taken as the
/// machine's (state reads are filtered the same way).
fn answers_post(action: &MachineAction, machine_id: &MachineId, asked: ActionType) -> bool {
    action.action_type.known() == Some(asked)
        && action.machine_id.as_ref().is_none_or(|id| id == machine_id)
}

/// Whether Defender says the action was created after `arrived`, by more than
/// the clock skew allowance.
fn created_after_utc(action: &MachineAction, arrived: OffsetDateTime) -> bool {
    action
        .creation_date_time_utc
        .map(Timestamp::at)
        .and_then(|created| created.checked_sub(CLOCK_SKEW))
        .is_some_and(|created| created > arrived)
}

/// Whether a 201's action is one Defender already had: the state read held
/// its id, or it was created before the POST was sent (beyond clock skew).
fn existed_before(action: &MachineAction, known: &HashSet<ActionId>, sent: OffsetDateTime) -> bool {
    if known.contains(&action.id) {
        return true;
    }
    action
        .creation_date_time_utc
        .map(Timestamp::at)
        .and_then(|created| created.checked_add(CLOCK_SKEW))
        .is_some_and(|created| created < sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::format_description::well_known::Rfc3339;

    fn action_created(id: &str, created: &str) -> MachineAction {
        serde_json::from_value(json!({
            "id": id,
            "type": "RestrictCodeExecution",
            "status": "Pending",
            "creationDateTimeUtc": created,
        }))
        .unwrap()
    }

    fn status(status: u16, code: &str, message: &str) -> DefenderError {
        DefenderError::Status {
            endpoint: crate::defender::Endpoint::create(ActionType::RestrictCodeExecution),
            status,
            code: code.to_owned(),
            message: message.to_owned(),
            target: None,
            retry_after: None,
        }
    }

    #[test]
    fn only_a_refusal_for_good_frees_the_machine_and_answers_the_round() {
        let forbidden = status(403, "Forbidden", "Missing application roles");
        assert!(definite_refusal(&forbidden) && refusal_for_any_post(&forbidden));
        let platform = status(400, "OsPlatformNotSupported", "not supported");
        assert!(definite_refusal(&platform) && refusal_for_any_post(&platform));
        // A bad request is refused for good, but only that request.
        let bad = status(400, "InvalidRequestBody", "comment too long");
        assert!(definite_refusal(&bad) && !refusal_for_any_post(&bad));
        // Unknown outcomes, or Defender saying one is under way.
        let busy = status(
            400,
            "ActiveRequestAlreadyExists",
            "Action is already in progress",
        );
        assert!(!definite_refusal(&busy));
        for unknown in [
            status(500, "", "boom"),
            status(503, "", "busy"),
            status(429, "", ""),
        ] {
            assert!(!definite_refusal(&unknown), "{unknown}");
        }
        let gone: Served = Err(ServeError::MachineGone(status(404, "NotFound", "")));
        assert!(state_known_after(&gone));
        let stopped: Served = Err(ServeError::Failed(ServiceError::RoundStopped));
        assert!(!state_known_after(&stopped));
        let timed_out: Served = Err(ServeError::Failed(ServiceError::Defender(status(
            504, "", "",
        ))));
        assert!(!state_known_after(&timed_out));
        // The same 403 on a cancel, or on the read after one, leaves the
        // state unknown (the cancel may have been taken); only the POST's
        // own refusal leaves it as decided.
        let on_cancel: Served = Err(ServeError::Failed(ServiceError::Defender(
            forbidden.clone(),
        )));
        assert!(!state_known_after(&on_cancel));
        let on_post: Served = Err(ServeError::Refused(ServiceError::Defender(forbidden)));
        assert!(state_known_after(&on_post));
    }

    #[test]
    fn a_post_answer_must_be_the_type_asked_for_on_the_machine_asked_about() {
        let machine = MachineId::from("c5cb89852ce0d21636c0491709a4571b5f190e75");
        let answer = |machine_id: Option<&str>, kind: &str| -> MachineAction {
            serde_json::from_value(json!({
                "id": "a", "type": kind, "status": "Pending", "machineId": machine_id,
            }))
            .unwrap()
        };
        let asked = ActionType::RestrictCodeExecution;
        assert!(answers_post(
            &answer(
                Some("C5CB89852CE0D21636C0491709A4571B5F190E75"),
                "RestrictCodeExecution"
            ),
            &machine,
            asked
        ));
        assert!(answers_post(
            &answer(None, "RestrictCodeExecution"),
            &machine,
            asked
        ));
        assert!(!answers_post(
            &answer(Some("0123"), "RestrictCodeExecution"),
            &machine,
            asked
        ));
        assert!(!answers_post(
            &answer(Some(machine.as_str()), "UnrestrictCodeExecution"),
            &machine,
            asked
        ));
        assert!(!answers_post(
            &answer(Some(machine.as_str()), "Isolate"),
            &machine,
            asked
        ));
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
}
