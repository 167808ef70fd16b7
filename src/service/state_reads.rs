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

use std::{collections::HashMap, sync::Arc};

use tokio::time::Instant;

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

/// Reads machine state for many invocations at once.
#[derive(Debug, Clone)]
pub struct StateReads {
    batcher: Arc<Batcher<ActionSource>>,
}

impl StateReads {
    pub fn new(client: DefenderClient) -> Self {
        Self {
            batcher: Batcher::new(ActionSource {
                client,
                policy: ReadPolicy::new(2, Tie::TenantWide),
            }),
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

/// Machine actions, by machine.
struct ActionSource {
    client: DefenderClient,
    /// Each machine or the tenant's actions (two calls at least: one per type).
    policy: ReadPolicy,
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
        let needs = [(
            machines.len(),
            self.client.free_slots(Endpoint::ListActions),
        )];
        if self.policy.key_by_key(machines.len(), &needs) {
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
