//! When, and under which lock, a device's request runs: one round at a time
//! per machine.
//!
//! A caller's [`Ticket`] joins the machine's queue ([`MachineQueues`]); the
//! first starts a round task that takes every ticket queued so far, holds the
//! machine's lease across instances, reads the machine's actions once and
//! serves the tickets in order through the per-device protocol
//! ([`super::protocol`]). A caller that gives up before its ticket started
//! leaves nothing behind; a write already sent is seen through.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use futures_util::future::FutureExt as _;
use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::{sync::oneshot, time::Instant};

use crate::{
    coordination::Locked,
    defender::ids::MachineId,
    service::{decision::Wanted, machine_queue::MachineQueues, service_error::ServiceError},
};

use super::{
    Shared,
    leased::{LeasedWriter, answer_from_handoff},
    protocol::{Device, Order, Refusals, SETTLE, ServeError, Served, state_known_after},
    sent::{OrderReport, OrderResult},
};

/// One caller's order for one machine, queued for the machine's round.
#[derive(Debug)]
pub(super) struct Ticket {
    pub order: Order,
    stage: Arc<AtomicU8>,
    pub reply: oneshot::Sender<Served>,
    /// Resolves when the caller went away (it hung up): the ticket is then
    /// dropped, and a rate-budget slot it waited for is given back.
    departure: Departure,
    /// What the ticket came to, for its invocation's log line should the
    /// caller hang up; done with when the ticket is dropped.
    report: OrderReport,
}

impl Ticket {
    /// Claim the ticket for serving; `false` when its caller gave up first.
    pub fn start(&self) -> bool {
        self.stage
            .compare_exchange(
                QUEUED,
                STARTED,
                AtomicOrdering::AcqRel,
                AtomicOrdering::Acquire,
            )
            .is_ok()
    }

    /// Still waiting for its round (its caller has not given up).
    pub fn queued(&self) -> bool {
        self.stage.load(AtomicOrdering::Acquire) == QUEUED
    }
}

/// Resolves once the caller has gone away; clones can be waited for
/// anywhere, and again after it resolved.
type Departure = futures_util::future::Shared<oneshot::Receiver<()>>;

/// Resolves once every one of the tickets' callers has gone away.
fn all_departed(tickets: &[Ticket]) -> impl Future<Output = ()> + use<> {
    let departures: Vec<Departure> = tickets
        .iter()
        .map(|ticket| ticket.departure.clone())
        .collect();
    async move {
        futures_util::future::join_all(departures).await;
    }
}

/// Where a ticket is: the caller and the round agree through it on whether
/// an abandoned ticket may still have acted.
const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

/// Queue an order for the machine's next round and wait for its answer.
pub(super) async fn submit(
    shared: &Arc<Shared>,
    machine_id: &MachineId,
    wanted: Wanted,
    comment: &str,
    arrived: Instant,
    deadline: Instant,
    background: bool,
) -> Served {
    let (reply, answer) = oneshot::channel();
    // Dropped with this future: tells the round the caller is gone.
    let (_alive, gone) = oneshot::channel::<()>();
    let stage = Arc::new(AtomicU8::new(QUEUED));
    let _abandon_if_dropped = AbandonIfQueued(Arc::clone(&stage));
    let ticket = Ticket {
        order: Order {
            wanted,
            comment: comment.to_owned(),
            arrived,
            arrived_utc: OffsetDateTime::now_utc() - arrived.elapsed(),
            deadline,
            background,
        },
        stage: Arc::clone(&stage),
        reply,
        departure: gone.shared(),
        report: OrderReport::open(),
    };
    if shared.queues.push(machine_id, ticket) {
        // No round runs for this machine: start one. It is a task of its
        // own, so that a caller giving up never stops a round half-way for
        // the others queued with it.
        let shared = Arc::clone(shared);
        let machine_id = machine_id.clone();
        tokio::spawn(async move { serve_machine(shared, machine_id).await });
    }

    let mut answer = answer;
    let gone = || ServeError::Failed(ServiceError::RoundStopped);
    // At shutdown a ticket still queued is refused at once; one its round
    // started is answered by the round (which sees a write already sent
    // through, and refuses the rest).
    let waited = tokio::select! {
        result = tokio::time::timeout_at(deadline, &mut answer) => Some(result),
        () = shared.stopping() => None,
    };
    match waited {
        Some(Ok(result)) => return result.unwrap_or_else(|_| Err(gone())),
        Some(Err(_)) => {}
        None => {
            if abandon(&stage) {
                return Err(ServiceError::ShuttingDown.into());
            }
            if let Ok(result) = tokio::time::timeout_at(deadline, &mut answer).await {
                return result.unwrap_or_else(|_| Err(gone()));
            }
        }
    }
    past_deadline(&stage, machine_id, answer).await
}

/// Take a ticket its round has not started back out of the queue: `true`
/// when it was still queued (the round will skip it).
fn abandon(stage: &AtomicU8) -> bool {
    stage
        .compare_exchange(
            QUEUED,
            ABANDONED,
            AtomicOrdering::AcqRel,
            AtomicOrdering::Acquire,
        )
        .is_ok()
}

/// The answer of a ticket whose deadline passed while it waited.
async fn past_deadline(
    stage: &AtomicU8,
    machine_id: &MachineId,
    answer: oneshot::Receiver<Served>,
) -> Served {
    let gone = || ServeError::Failed(ServiceError::RoundStopped);
    if abandon(stage) {
        return Err(ServiceError::QueuedPastDeadline {
            machine_id: machine_id.to_string(),
        }
        .into());
    }
    // Started: its own calls end at the deadline; give its answer a moment.
    match tokio::time::timeout(Duration::from_secs(1), answer).await {
        Ok(result) => result.unwrap_or_else(|_| Err(gone())),
        Err(_) => Err(ServiceError::ActingPastDeadline {
            machine_id: machine_id.to_string(),
        }
        .into()),
    }
}

/// Serve the machine's queued tickets, a round at a time, until none is left.
///
/// A round takes every ticket queued so far, reads the machine's actions
/// once (a read sent after all of them were queued), and serves the tickets
/// in order, each deciding on the state the ones before it left behind.
/// Duplicates arriving together thus cost one read and at most one POST,
/// and a restrict and a release are still put in order. A ticket refused on
/// the state (a conflicting action pending) or by Defender for good leaves
/// the state as it was, and the next ticket decides on it too; a POST
/// Defender refused for good is not sent again in the round for the same
/// action ([`Refusals`]).
///
/// At shutdown the round sends nothing new: a ticket that has not sent a
/// write is answered `ShuttingDown`, one that has is seen through.
async fn serve_machine(shared: Arc<Shared>, machine_id: MachineId) {
    let mut guard = RoundGuard {
        queues: &shared.queues,
        key: &machine_id,
        armed: true,
    };
    while let Some(tickets) = shared.queues.take(&machine_id) {
        // Tickets whose caller gave up are dropped before anything is read.
        let mut tickets: Vec<Ticket> = tickets.into_iter().filter(Ticket::queued).collect();
        let Some(read_by) = tickets.iter().map(|ticket| ticket.order.deadline).max() else {
            continue;
        };
        if shared.stopped() {
            refuse_at_shutdown(tickets);
            continue;
        }
        // Across instances, the round holds the machine's lease from
        // before the read until its last POST is settled. If every caller
        // hangs up meanwhile, the round stops waiting and reads nothing.
        let lease = match &shared.coordinator {
            None => None,
            Some(coordinator) => {
                let departed = all_departed(&tickets);
                let mut answer = |handoff: &_| answer_from_handoff(&mut tickets, handoff);
                let locked = tokio::select! {
                    locked = coordinator.lock_machine_unless(machine_id.as_str(), read_by, &mut answer) => Some(locked),
                    () = departed => None,
                    () = shared.stopping() => None,
                };
                match locked {
                    Some(Ok(Locked::Held(lease))) => Some(lease),
                    Some(Ok(Locked::Answered)) => continue,
                    Some(Err(e)) => {
                        for ticket in tickets {
                            let _ = ticket.reply.send(Err(ServiceError::from(e.clone()).into()));
                        }
                        continue;
                    }
                    None => {
                        refuse_at_shutdown(tickets);
                        continue;
                    }
                }
            }
        };
        // Background work's own reads only when the round serves nothing else.
        let reads = if tickets.iter().all(|ticket| ticket.order.background) {
            &shared.background_reads
        } else {
            &shared.reads
        };
        let read = tokio::select! {
            read = reads.read(&machine_id, read_by) => Some(read),
            () = all_departed(&tickets) => None,
            () = shared.stopping() => None,
        };
        let Some(read) = read else {
            // Nobody left to answer, or shutting down; the lease is
            // released on drop.
            refuse_at_shutdown(tickets);
            continue;
        };
        let mut state = Some(read);
        let writes = Writes::default();
        let writer = LeasedWriter::new(lease.as_ref(), &writes);
        let refusals = Refusals::default();
        let device = Device {
            client: &shared.client,
            reads,
            created: &shared.created,
            refusals: &refusals,
            machine_id: &machine_id,
            writer: &writer,
        };
        for ticket in tickets {
            if !ticket.start() {
                continue;
            }
            let started = Instant::now();
            if shared.stopped() {
                ticket.answer(Err(ServiceError::ShuttingDown.into()));
                continue;
            }
            // A ticket whose answer left the state unknown makes the next
            // one read again.
            let actions = match state.take() {
                Some(Ok(actions)) => Ok(actions),
                Some(Err(e)) => Err(e),
                None => {
                    tokio::select! {
                        read = reads.read(&machine_id, ticket.order.deadline) => read,
                        () = shared.stopping() => {
                            ticket.answer(Err(ServiceError::ShuttingDown.into()));
                            continue;
                        }
                    }
                }
            };
            let departure = ticket.departure.clone();
            let result = match actions {
                Ok(mut actions) => {
                    let served = {
                        let serve = device.serve(&ticket.order, &mut actions);
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
                            () = shared.stopping() => {
                                // Nothing new goes out once shutting down; a
                                // write already sent is seen through.
                                if writes.sent_since(started).is_some() {
                                    Some(serve.await)
                                } else {
                                    Some(Err(ServiceError::ShuttingDown.into()))
                                }
                            }
                        }
                    };
                    // A refusal leaves the state as it was, and a ticket
                    // stopped before it sent anything left it untouched.
                    let untouched = served.is_none() && writes.sent_since(started).is_none();
                    if untouched || served.as_ref().is_some_and(state_known_after) {
                        state = Some(Ok(actions));
                    }
                    served
                }
                Err(e) => Some(Err(ServeError::from(e))),
            };
            // A write whose outcome is unknown (it failed, or timed out)
            // may still be recorded by Defender: give it time to show
            // before anyone reads this machine again, here or elsewhere.
            // A definite answer (success, or a refusal for good) needs none.
            if !result.as_ref().is_some_and(state_known_after)
                && let Some(sent) = writes.sent_since(started)
            {
                tokio::time::sleep_until(sent + SETTLE).await;
            }
            if let Some(result) = result {
                ticket.answer(result);
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

/// Answer the tickets still queued `ShuttingDown` when the handler is
/// shutting down (nothing was sent for them); otherwise their callers have
/// gone, and they are dropped.
fn refuse_at_shutdown(tickets: Vec<Ticket>) {
    for ticket in tickets {
        if ticket.start() {
            ticket.answer(Err(ServiceError::ShuttingDown.into()));
        }
    }
}

impl Ticket {
    /// Send the ticket its answer, and note what it came to for its
    /// invocation's log line.
    fn answer(self, result: Served) {
        self.report.record(match &result {
            Ok(acted) => OrderResult::Acted {
                outcome: acted.outcome,
                action_id: acted.action.action.id.clone(),
            },
            Err(ServeError::MachineGone(e)) => OrderResult::Failed(e.clone().into()),
            Err(ServeError::Failed(e) | ServeError::Refused(e)) => OrderResult::Failed(e.clone()),
        });
        let _ = self.reply.send(result);
    }
}

/// When a round last sent a POST or cancel to Defender.
#[derive(Debug, Default)]
pub(super) struct Writes(Mutex<Option<Instant>>);

impl Writes {
    pub fn sent(&self) {
        *self.0.lock() = Some(Instant::now());
    }

    pub fn last(&self) -> Option<Instant> {
        *self.0.lock()
    }

    /// When the last write was sent, if that was at or after `since`.
    fn sent_since(&self, since: Instant) -> Option<Instant> {
        self.0.lock().filter(|&sent| sent >= since)
    }
}

/// Marks a ticket abandoned when its caller goes away before the round
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
/// so that later callers start a new round instead of waiting forever.
struct RoundGuard<'a> {
    queues: &'a MachineQueues<Ticket>,
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
