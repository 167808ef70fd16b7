//! Reading the fleet: the tenant's restrict history folded page by page
//! ([`read`]), and the fleet view's shared, lower-priority reads
//! ([`FleetReads`]).
//!
//! The view is the one caller that anyone holding its key can repeat at
//! will, and each read costs two list-actions calls (more pages on a large
//! tenant) from the budget that restricts, releases and the reconciler
//! read machine state from. So a view:
//! - **shares** a read: views asked while one is in flight wait for it, and
//!   a read at most `FLEET_VIEW_MAX_AGE_SECONDS` old answers without a new
//!   one (the answer's `asOf` says when the read was sent);
//! - **yields**: before a new read it waits for room within
//!   [`Share::VIEWS`] of each rate window, counting every call and
//!   reservation, so restricts, releases, jobs and the reconciler keep the
//!   rest. With no room now and an earlier read in hand, it answers from
//!   that read (however old: `asOf` says so) rather than wait; with none, it
//!   waits for the room if that fits its deadline, else answers 429 with the
//!   wait.
//!
//! A shared read runs as a task of its own: a caller that hangs up does not
//! cancel it for the others.

use std::{sync::Arc, time::Duration};

use futures_util::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{Fleet, FleetFold};
use crate::defender::{DefenderClient, DefenderError, Endpoint, budget::Share};

/// The fleet as one read of Defender found it.
#[derive(Debug)]
pub struct FleetRead {
    pub fleet: Fleet,
    /// When the read's first request was sent.
    pub sent_at: OffsetDateTime,
    /// Defender calls the read took (pages included).
    pub calls: usize,
    /// Restrict and unrestrict actions folded (a repeat counted twice).
    pub actions: usize,
    /// When the read started, on this process's clock (for its age).
    started: Instant,
}

/// Read the tenant's restrict history and fold each page as it arrives:
/// what is held is one page per list and, per machine, what decides its
/// state.
pub async fn read(client: &DefenderClient, deadline: Instant) -> Result<FleetRead, DefenderError> {
    let started = Instant::now();
    let fold = Mutex::new(FleetFold::default());
    let history = client
        .restrict_history_pages(deadline, None, &|page| fold.lock().add_all(page))
        .await?;
    let fold = fold.into_inner();
    let actions = fold.actions();
    Ok(FleetRead {
        fleet: fold.finish(),
        sent_at: history.sent_at,
        calls: history.calls,
        actions,
        started,
    })
}

/// How a view got its read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A read this view started.
    Read,
    /// A read started by another view, in flight or at most the maximum
    /// age old: no call of its own.
    Shared,
    /// An older read: the budget had no room for views.
    Stale,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Shared => "shared",
            Self::Stale => "stale",
        }
    }
}

/// A view's read.
#[derive(Debug, Clone)]
pub struct View {
    pub read: Arc<FleetRead>,
    pub source: Source,
}

type Outcome = Result<(Arc<FleetRead>, bool), DefenderError>;

/// The fleet view's reads, shared by every view of the process.
#[derive(Debug, Clone)]
pub struct FleetReads {
    client: DefenderClient,
    max_age: Duration,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// The newest read that finished.
    last: Option<Arc<FleetRead>>,
    /// The read under way: `(read, fresh)`, fresh `false` when it handed
    /// back `last` for want of budget.
    in_flight: Option<Shared<BoxFuture<'static, Outcome>>>,
    /// Defender calls the last read took: a large tenant's read is many
    /// pages, and the next one needs room for all of them.
    last_calls: usize,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("last", &self.last.as_ref().map(|r| r.sent_at))
            .field("in_flight", &self.in_flight.is_some())
            .finish()
    }
}

impl FleetReads {
    /// The default `FLEET_VIEW_MAX_AGE_SECONDS`.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(5);

    pub fn new(client: DefenderClient, max_age: Duration) -> Self {
        Self {
            client,
            max_age,
            state: Arc::default(),
        }
    }

    /// The fleet for one view, by `deadline`.
    pub async fn view(&self, deadline: Instant) -> Result<View, DefenderError> {
        let (shared, started_here) = {
            let mut state = self.state.lock();
            if let Some(last) = &state.last
                && last.started.elapsed() <= self.max_age
            {
                return Ok(View {
                    read: last.clone(),
                    source: Source::Shared,
                });
            }
            match &state.in_flight {
                Some(read) => (read.clone(), false),
                None => {
                    let read = self.start(deadline);
                    state.in_flight = Some(read.clone());
                    (read, true)
                }
            }
        };
        let (read, fresh) = tokio::time::timeout_at(deadline, shared)
            .await
            .map_err(|_| DefenderError::OutOfTime {
                endpoint: Endpoint::ListActions,
            })??;
        let source = match (fresh, started_here) {
            (false, _) => Source::Stale,
            (true, true) => Source::Read,
            (true, false) => Source::Shared,
        };
        Ok(View { read, source })
    }

    /// Start a read on a task of its own; it clears itself from the state
    /// when done.
    fn start(&self, deadline: Instant) -> Shared<BoxFuture<'static, Outcome>> {
        let (client, state) = (self.client.clone(), self.state.clone());
        let task = tokio::spawn(async move {
            let outcome = refresh(&client, &state, deadline).await;
            let mut state = state.lock();
            state.in_flight = None;
            if let Ok((read, true)) = &outcome {
                state.last = Some(read.clone());
                state.last_calls = read.calls;
            }
            outcome
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(DefenderError::Protocol {
                    endpoint: Endpoint::ListActions,
                    reason: format!("the shared fleet read stopped: {e}"),
                })
            })
        }
        .boxed()
        .shared()
    }
}

/// A new read once the views' share of the budget has room; the last read
/// (not fresh) when it has none now.
async fn refresh(client: &DefenderClient, state: &Mutex<State>, deadline: Instant) -> Outcome {
    // Room for the whole read within the views' share, pages included (as
    // many as the last read took): checked once before a read of many
    // pages, it must not start where its last page would pass the share.
    let expected = state.lock().last_calls;
    let wait = client
        .wait_for_share(
            Endpoint::ListActions,
            Share::VIEWS.for_calls(expected.max(Share::VIEWS.calls)),
        )
        .await?;
    if !wait.is_zero() {
        let last = state.lock().last.clone();
        if let Some(last) = last {
            tracing::info!(
                wait_ms = wait.as_millis(),
                "the fleet view's share of the list-actions budget is full: answering from the last read"
            );
            return Ok((last, false));
        }
        if Instant::now() + wait > deadline {
            return Err(DefenderError::OverBudget {
                endpoint: Endpoint::ListActions,
                wait,
            });
        }
        tokio::time::sleep(wait).await;
    }
    // The views that come meanwhile wait for this read: the last one is no
    // longer needed, and a large tenant's fleet is not held twice.
    state.lock().last = None;
    Ok((Arc::new(read(client, deadline).await?), true))
}
