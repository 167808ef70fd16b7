//! Batched reads of machine state ([`super::batch`]): one Defender read
//! answers every invocation that is waiting for one.
//!
//! Defender counts calls per API (100 a minute, 1,500 an hour), so in an
//! outbreak burst one read per invocation would make the list-actions API,
//! not the restrict API, set the pace. Here invocations that need their
//! machine's actions join the open batch, and one read answers them all:
//! - a batch for one machine reads that machine's actions (one call:
//!   `machineId eq '<id>'`, every page);
//! - a batch for several machines reads each machine the same way, or one
//!   read of the tenant's restrict and unrestrict actions answers them all
//!   (two type-filtered calls, every page), as [`super::read_policy`] says:
//!   each machine while that takes fewer calls than the tenant read (its
//!   size is remembered) or at most half of what the rate budget has left;
//!   at equal cost the tenant read, which waiters may join until it is sent.
//!
//! The safety rule: a waiter's state comes only from a read **sent after** it
//! joined, and a waiter joins only once it holds its machine's lock. The open
//! batch closes the moment its first request goes out (after any wait for the
//! rate budget); a waiter that comes later joins the next batch, never a read
//! already in flight. So no invocation decides on a read that could predate an
//! action created by the invocation that held the lock before it.
//!
//! A failed read fails every waiter of its batch with the same error; a
//! waiter whose deadline passes stops waiting (504) and the read goes on for
//! the others.
//!
//! Background work (containment jobs) reads through [`StateReads::economical`]:
//! the read that takes the fewest calls whatever the budget has left, and a
//! worker that is about to run several machines at once says so first
//! ([`StateReads::expect`]). The tenant-wide read then keeps its batch open
//! (up to [`GATHER_AT_MOST`]) until each expected machine has joined, so one
//! read (two calls) serves a whole group of devices instead of one call per
//! device. Waiting longer before sending never makes a read stale: each
//! waiter still joined before the read was sent, holding its machine's lock.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

use crate::{
    defender::{
        DefenderClient, DefenderError, Endpoint, client::ActionListing, ids::MachineId,
        models::MachineAction,
    },
    service::{
        batch::{Answered, Batcher, Close, CloseOnSend, Source},
        read_policy::{ReadPolicy, Tie},
    },
};

/// The longest a tenant-wide read waits for the machines a worker said it
/// is about to read ([`StateReads::expect`]) before it is sent without them.
pub const GATHER_AT_MOST: Duration = Duration::from_secs(1);

/// Reads machine state for many invocations at once.
#[derive(Debug, Clone)]
pub struct StateReads {
    batcher: Arc<Batcher<ActionSource>>,
    gather: Option<Arc<Gather>>,
}

impl StateReads {
    pub fn new(client: DefenderClient) -> Self {
        Self {
            batcher: Batcher::new(ActionSource {
                client,
                policy: ReadPolicy::new(2, Tie::TenantWide),
                gather: None,
            }),
            gather: None,
        }
    }

    /// Reads for background work: the fewest calls, and the machines
    /// announced with [`Self::expect`] gathered into one read.
    pub fn economical(client: DefenderClient) -> Self {
        let gather = Arc::new(Gather::default());
        Self {
            batcher: Batcher::new(ActionSource {
                client,
                policy: ReadPolicy::cheapest(2, Tie::TenantWide),
                gather: Some(Arc::clone(&gather)),
            }),
            gather: Some(gather),
        }
    }

    /// Say that `machine_id`'s actions are about to be read: a tenant-wide
    /// read waits for it (briefly) before it is sent. The expectation ends
    /// when the machine joins a read or the guard is dropped (its run ended
    /// without reading). Nothing for reads made with [`Self::new`].
    pub fn expect(&self, machine_id: &MachineId) -> Expected {
        if let Some(gather) = &self.gather {
            gather.expected.lock().insert(machine_id.clone());
        }
        Expected {
            gather: self.gather.clone(),
            machine_id: machine_id.clone(),
        }
    }

    /// The machine's actions (every type), from a read sent after this call
    /// began. Call it only from the machine's round.
    pub async fn read(
        &self,
        machine_id: &MachineId,
        deadline: Instant,
    ) -> Result<Vec<MachineAction>, DefenderError> {
        let actions = self.batcher.get(machine_id.clone(), deadline).await?;
        Ok(actions.unwrap_or_default())
    }
}

/// An expected read ([`StateReads::expect`]); dropping it ends the wait for it.
#[derive(Debug)]
pub struct Expected {
    gather: Option<Arc<Gather>>,
    machine_id: MachineId,
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Some(gather) = &self.gather
            && gather.expected.lock().remove(&self.machine_id)
        {
            gather.changed.notify_waiters();
        }
    }
}

/// The machines announced and not yet joined.
#[derive(Debug, Default)]
struct Gather {
    expected: Mutex<HashSet<MachineId>>,
    /// Machines that joined while expected, ever (to count who joined a batch).
    arrived: Mutex<usize>,
    changed: Notify,
}

impl Gather {
    fn arrived(&self) -> usize {
        *self.arrived.lock()
    }

    /// Until no announced machine is still on its way, or `until`.
    async fn wait(&self, until: Instant) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.expected.lock().is_empty() {
                return;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return;
            }
        }
    }
}

/// Machine actions, by machine.
struct ActionSource {
    client: DefenderClient,
    /// Each machine or the tenant's actions (two calls at least: one per type).
    policy: ReadPolicy,
    gather: Option<Arc<Gather>>,
}

impl Source for ActionSource {
    type Key = MachineId;
    type Value = Vec<MachineAction>;
    type Error = DefenderError;

    async fn read(
        &self,
        machines: Vec<MachineId>,
        deadline: Instant,
        close: Close<'_>,
    ) -> Result<Answered<MachineId, Vec<MachineAction>>, DefenderError> {
        // Machines announced as on their way join this batch while it waits
        // (it is still open); they count towards the choice of read.
        let mut joining = machines.len();
        if let Some(gather) = &self.gather {
            let before = gather.arrived();
            gather
                .wait((Instant::now() + GATHER_AT_MOST).min(deadline))
                .await;
            joining += gather.arrived().saturating_sub(before);
        }
        let needs = [(joining, self.client.free_slots(Endpoint::ListActions))];
        if self.policy.key_by_key(joining, &needs) {
            close();
            let reads = machines.iter().map(|machine| {
                self.client
                    .machine_actions(machine.as_str(), deadline, None)
            });
            let listings = futures_util::future::try_join_all(reads).await?;
            return Ok(Answered {
                values: machines
                    .into_iter()
                    .zip(listings)
                    .map(|(machine, listing)| (machine, listing.actions))
                    .collect(),
                complete: false,
            });
        }
        // The tenant read answers every machine, so waiters may keep joining
        // until its first request is sent.
        let listing = self
            .client
            .restrict_history(deadline, Some(&CloseOnSend(close)))
            .await?;
        self.policy.tenant_read_took(listing.calls);
        Ok(Answered {
            values: group_by_machine(listing),
            complete: true,
        })
    }

    fn joined(&self, machine_id: &MachineId) {
        if let Some(gather) = &self.gather
            && gather.expected.lock().remove(machine_id)
        {
            *gather.arrived.lock() += 1;
            gather.changed.notify_waiters();
        }
    }

    fn out_of_time() -> DefenderError {
        DefenderError::OutOfTime {
            endpoint: Endpoint::ListActions,
        }
    }

    fn abandoned() -> DefenderError {
        DefenderError::Protocol {
            endpoint: Endpoint::ListActions,
            reason: "the shared read of machine actions was abandoned".to_owned(),
        }
    }
}

/// The tenant's restrict/unrestrict actions, per machine.
fn group_by_machine(listing: ActionListing) -> HashMap<MachineId, Vec<MachineAction>> {
    let mut by_machine: HashMap<MachineId, Vec<MachineAction>> = HashMap::new();
    for action in listing.actions {
        if let Some(machine) = action.machine_id.clone() {
            by_machine.entry(machine).or_default().push(action);
        }
    }
    by_machine
}
