//! Batched reads of machine state: one Defender read answers every
//! invocation that is waiting for one.
//!
//! Defender counts calls per API (100 a minute, 1,500 an hour), so in an
//! outbreak burst one read per invocation would make the list-actions API,
//! not the restrict API, set the pace. Here invocations that need their
//! machine's actions join the *open batch*; one reader sends one read for the
//! whole batch and hands each waiter its machine's actions:
//! - a batch for one machine reads that machine's actions (one call:
//!   `machineId eq '<id>'`, every page);
//! - a batch for several machines reads each machine the same way while the
//!   rate budget has a free slot for each of them right now: small answers,
//!   no wait;
//! - otherwise (the budget is tight, which is when it matters) one read of
//!   the tenant's restrict and unrestrict actions answers them all (two
//!   type-filtered calls, every page), unless reading each machine would
//!   still take fewer calls (the tenant read's size is remembered).
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

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{sync::watch, time::Instant};

use crate::defender::{
    DefenderClient, DefenderError, Operation, budget::Endpoint, client::ActionListing,
    models::MachineAction,
};

/// What a batch's read produced: each machine's actions (lower-cased ids).
type BatchResult = Result<Arc<HashMap<String, Vec<MachineAction>>>, DefenderError>;

/// Reads machine state for many invocations at once.
#[derive(Debug)]
pub struct StateReads {
    client: DefenderClient,
    inner: Mutex<Inner>,
    /// Calls the last tenant-wide read took (two at least: one per type).
    tenant_read_calls: AtomicUsize,
}

#[derive(Debug, Default)]
struct Inner {
    /// The batch that new waiters join; `None` once it closed.
    open: Option<Arc<Batch>>,
    /// A reader task is working through batches.
    reader_running: bool,
}

#[derive(Debug)]
struct Batch {
    members: Mutex<Members>,
    done: watch::Sender<Option<BatchResult>>,
}

#[derive(Debug, Default)]
struct Members {
    machines: HashSet<String>,
    /// The latest deadline among the waiters: the read may take that long.
    deadline: Option<Instant>,
}

impl StateReads {
    pub fn new(client: DefenderClient) -> Arc<Self> {
        Arc::new(Self {
            client,
            inner: Mutex::new(Inner::default()),
            tenant_read_calls: AtomicUsize::new(2),
        })
    }

    /// The machine's actions (every type), from a read sent after this call
    /// began. Call it only while holding the machine's lock.
    pub async fn read(
        self: &Arc<Self>,
        machine_id: &str,
        deadline: Instant,
    ) -> Result<Vec<MachineAction>, DefenderError> {
        let key = machine_id.to_ascii_lowercase();
        let mut done = self.join(&key, deadline);
        let outcome = tokio::time::timeout_at(deadline, done.wait_for(Option::is_some)).await;
        let result = match outcome {
            Err(_) => {
                return Err(DefenderError::OutOfTime {
                    operation: Operation::ListActions,
                });
            }
            Ok(Ok(result)) => result.clone(),
            // The reader never drops a batch unanswered; if it did (a panic),
            // say so rather than hang.
            Ok(Err(_)) => None,
        };
        match result {
            Some(Ok(by_machine)) => Ok(by_machine.get(&key).cloned().unwrap_or_default()),
            Some(Err(e)) => Err(e),
            None => Err(DefenderError::Protocol {
                operation: Operation::ListActions,
                reason: "the shared read of machine actions was abandoned".to_owned(),
            }),
        }
    }

    /// Join the open batch (or open one) and make sure a reader runs.
    fn join(
        self: &Arc<Self>,
        key: &str,
        deadline: Instant,
    ) -> watch::Receiver<Option<BatchResult>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let batch = inner
            .open
            .get_or_insert_with(|| {
                Arc::new(Batch {
                    members: Mutex::new(Members::default()),
                    done: watch::Sender::new(None),
                })
            })
            .clone();
        {
            let mut members = batch.members.lock().unwrap_or_else(|e| e.into_inner());
            members.machines.insert(key.to_owned());
            members.deadline = Some(members.deadline.map_or(deadline, |d| d.max(deadline)));
        }
        let receiver = batch.done.subscribe();
        if !inner.reader_running {
            inner.reader_running = true;
            let reads = Arc::clone(self);
            tokio::spawn(async move { reads.run_reader().await });
        }
        receiver
    }

    /// Serve batches one after another until none is open.
    async fn run_reader(self: Arc<Self>) {
        loop {
            let batch = {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                match inner.open.clone() {
                    Some(batch) => batch,
                    None => {
                        inner.reader_running = false;
                        return;
                    }
                }
            };
            let result = self.read_batch(&batch).await;
            // Closed already when its first request went out; closing again
            // covers a read that failed before sending anything.
            self.close(&batch);
            batch.done.send_replace(Some(result));
        }
    }

    async fn read_batch(&self, batch: &Arc<Batch>) -> BatchResult {
        let (machines, deadline) = {
            let members = batch.members.lock().unwrap_or_else(|e| e.into_inner());
            (
                members.machines.iter().cloned().collect::<Vec<_>>(),
                members.deadline.unwrap_or_else(Instant::now),
            )
        };
        let tenant_calls = self.tenant_read_calls.load(Ordering::Relaxed);
        let free = self.client.free_slots(Endpoint::ListActions);
        if machines.len() < tenant_calls.max(2) || machines.len() <= free {
            // Reading each machine is cheaper. The machines are fixed now, so
            // the batch closes before anything is sent.
            self.close(batch);
            let reads = machines
                .iter()
                .map(|machine| self.client.machine_actions(machine, deadline, None));
            let listings = futures_util::future::try_join_all(reads).await?;
            let mut by_machine = HashMap::new();
            for (machine, listing) in machines.into_iter().zip(listings) {
                by_machine.insert(machine, listing.actions);
            }
            return Ok(Arc::new(by_machine));
        }
        // The tenant read answers every machine, so waiters may keep joining
        // until its first request is sent.
        let close = || self.close(batch);
        let listing = self.client.restrict_history(deadline, Some(&close)).await?;
        self.tenant_read_calls
            .store(listing.calls.max(2), Ordering::Relaxed);
        Ok(Arc::new(group_by_machine(listing)))
    }

    /// Stop new waiters from joining `batch`.
    fn close(&self, batch: &Arc<Batch>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner
            .open
            .as_ref()
            .is_some_and(|open| Arc::ptr_eq(open, batch))
        {
            inner.open = None;
        }
    }
}

/// The tenant's restrict/unrestrict actions, per machine.
fn group_by_machine(listing: ActionListing) -> HashMap<String, Vec<MachineAction>> {
    let mut by_machine: HashMap<String, Vec<MachineAction>> = HashMap::new();
    for action in listing.actions {
        if let Some(machine) = action.machine_id.as_deref() {
            by_machine
                .entry(machine.to_ascii_lowercase())
                .or_default()
                .push(action);
        }
    }
    by_machine
}
