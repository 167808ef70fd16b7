//! The machine's lease around the protocol's writes, across instances
//! (`COORDINATION=storage`), and the answers a lease holder's handoff gives
//! the tickets waiting for it.

use std::time::SystemTime;

use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    coordination::{CoordinationError, Handoff, MachineLease},
    defender::{
        Endpoint,
        client::{ActionRecord, BeforeSend},
        error::Refusal,
    },
    service::service_error::ServiceError,
};

use super::{
    Outcome,
    protocol::{Acted, CLOCK_SKEW, Writer},
    round::{Ticket, Writes},
};

/// What a POST or cancel is sent under. Across instances it holds the
/// machine's lease. The last step before each attempt goes out (retries
/// included), after any wait for the rate budget (which can be minutes), is a
/// write to the lock blob conditioned on the lease ([`MachineLease::confirm`]):
/// storage refuses it once the lease is no longer ours, whatever our clock
/// says, and then another instance may be deciding for the machine, so
/// nothing is sent. The request must be over before the lease could run out. Its budget
/// slot is announced to the instances waiting for the lease, so that they
/// sleep instead of polling. Each request sent is noted in the round's
/// [`Writes`].
pub(super) struct LeasedWriter<'a> {
    lease: Option<&'a MachineLease>,
    writes: &'a Writes,
}

impl<'a> LeasedWriter<'a> {
    pub(super) fn new(lease: Option<&'a MachineLease>, writes: &'a Writes) -> Self {
        Self { lease, writes }
    }
}

#[async_trait::async_trait]
impl BeforeSend for LeasedWriter<'_> {
    fn slot(&self, at: Instant) {
        if let Some(lease) = self.lease {
            lease.announce(at);
        }
    }

    async fn before_send(&self, _endpoint: Endpoint) -> Result<Option<Instant>, Refusal> {
        let confirmed = match self.lease {
            Some(lease) => Some(lease.confirm().await),
            None => None,
        };
        let until = match confirmed {
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

#[async_trait::async_trait]
impl Writer for LeasedWriter<'_> {
    fn still_held(&self) -> Result<(), ServiceError> {
        if let Some(lease) = self.lease {
            lease.check()?;
        }
        Ok(())
    }

    /// The handoff is withdrawn by the lease-conditioned write that
    /// [`BeforeSend::before_send`] makes before every attempt; one more
    /// request here would only cost a storage operation.
    async fn withdraw_handoff(&self) -> Result<(), ServiceError> {
        self.still_held()
    }

    /// Leave a POST's pending action for the instances waiting for the lease.
    async fn hand_off(&self, created: &ActionRecord) {
        let pending = created
            .action
            .status
            .known()
            .is_some_and(|s| !s.is_terminal());
        if let (Some(lease), Some(sent), true) = (self.lease, self.writes.last(), pending) {
            let sent = SystemTime::now() - sent.elapsed();
            lease.hand_off(&created.action, sent).await;
        }
    }
}

/// Answer the round's tickets that a [`Handoff`] answers, while they wait for
/// another instance's lease; `true` when none is left to wait.
///
/// The handoff is the action another instance's POST created (or was
/// answered with) for this machine, still pending, and no write was sent
/// under the lease for the machine after it. A ticket for the same action
/// type that arrived before that POST was sent (beyond the clock skew
/// allowance) would read the same: its decision is `already_pending` with
/// that action, whatever the other options
/// ([`crate::service::decision::decide`]). So it is answered so, without the
/// lease or a read of its own. Every other ticket keeps waiting.
pub(super) fn answer_from_handoff(tickets: &mut Vec<Ticket>, handoff: &Handoff) -> bool {
    let action = &handoff.action;
    let sent = OffsetDateTime::from(handoff.sent);
    let pending = action.status.known().is_some_and(|s| !s.is_terminal());
    let answers = |ticket: &Ticket| {
        pending
            && action.action_type.known() == Some(ticket.order.wanted.action)
            && ticket
                .order
                .arrived_utc
                .checked_add(CLOCK_SKEW)
                .is_some_and(|arrived| arrived < sent)
    };
    let (answered, waiting): (Vec<Ticket>, Vec<Ticket>) = std::mem::take(tickets)
        .into_iter()
        .filter(Ticket::queued)
        .partition(|ticket| answers(ticket));
    *tickets = waiting;
    for ticket in answered {
        if ticket.start() {
            tracing::info!(action_id = %action.id, "answered with the action another instance just created for the machine");
            // Known only typed: the other instance passed on the action
            // Defender answered its POST with, not the bytes it was sent.
            let _ = ticket.reply.send(Ok(Acted::answered(
                Outcome::AlreadyPending,
                ActionRecord::from(action.clone()),
            )));
        }
    }
    tickets.is_empty()
}
