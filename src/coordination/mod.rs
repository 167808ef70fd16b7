//! Coordination across instances of the function app, through the storage
//! account the Functions host already uses (`COORDINATION=storage`).
//!
//! Flex Consumption runs as many instances as the load asks for. Two
//! guarantees must hold for the app as deployed, not per process:
//!
//! - **one decision per device**: [`Coordinator::lock_machine`] holds a blob
//!   lease per machine around read state → decide → POST → settle
//!   ([`lock`]);
//! - **one Defender budget per app**: [`Coordinator::reserve`] hands out
//!   slots from a per-API budget shared by every instance ([`shared_budget`]).
//!
//! Both fail closed: if storage cannot be reached, throttles or fails, the
//! caller gets [`CoordinationError::Unavailable`] and sends nothing to
//! Defender (answering 503 `coordination_unavailable` with `Retry-After`). A
//! late restrict is better than a duplicate or out-of-order one. Nothing
//! broken is cached: the next call tries storage again, so the service
//! recovers by itself when storage comes back.
//!
//! [`settings`] reads `COORDINATION` and the host's `AzureWebJobsStorage*`
//! settings; [`store`] is the only place that talks to `azure_storage_blob`.
//! Containment jobs keep their records through [`records`] and send their
//! messages through [`queue`] (`azure_storage_queue`), in storage or, in
//! local mode, in this process's memory.

mod backoff;
pub mod error;
pub mod lock;
pub mod queue;
pub mod records;
pub mod sas;
pub mod settings;
pub mod shared_budget;
mod store;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

pub use self::{
    error::CoordinationError,
    lock::{Handoff, Locked, MachineLease},
    settings::{CoordinationSettings, StorageAuth, StorageSettings},
    shared_budget::Slot,
};
use self::{
    shared_budget::{Limits, SharedBudget},
    store::Store,
};
use crate::defender::{
    Endpoint,
    budget::{BudgetError, CallBudget, OverBudget, Reserved, Share, move_wait, wait_if_fresh},
    error::Refusal,
};

/// Tuning for a [`Coordinator`]; [`Default`] is what production uses.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Defender's per-API limits (`DEFENDER_RATE_LIMIT_PER_MINUTE`/`_HOUR`).
    pub per_minute: u32,
    pub per_hour: u32,
    /// `DEFENDER_RATE_CLOCK_SPEED`: both windows shrink by this factor.
    pub clock_speed: f64,
    /// The machine lease's duration: 15 to 60 s (storage's range). A dead
    /// holder delays the others by this much, plus a third of it (the
    /// longest a waiter sleeps between looks): 40 s by default. Azure can
    /// take up to about a minute more before it grants an expired lease
    /// again; waiters keep backing off meanwhile (docs/coordination.md).
    pub lease_duration: Duration,
    /// The bound on one storage call.
    pub storage_timeout: Duration,
    /// The HTTP client to use; by default the storage crate's own.
    pub http: Option<reqwest::Client>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            per_minute: 100,
            per_hour: 1500,
            clock_speed: 1.0,
            lease_duration: Duration::from_secs(30),
            storage_timeout: Duration::from_secs(5),
            http: None,
        }
    }
}

/// Locks and budget shared by every instance, over one storage container.
/// Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Coordinator {
    store: Arc<Store>,
    budget: SharedBudget,
    lease_duration: Duration,
}

impl Coordinator {
    /// Build the clients. Nothing is sent to storage until the first call,
    /// so startup stays fast and does not fail on a storage blip.
    pub fn new(
        settings: &StorageSettings,
        options: CoordinatorOptions,
    ) -> Result<Self, CoordinationError> {
        let store = Store::new(settings, options.storage_timeout, options.http)?;
        tracing::info!(
            container = %store.container_url(),
            auth = store.describe(),
            "coordination through storage"
        );
        Ok(Self {
            store: Arc::new(store),
            budget: SharedBudget::new(Limits::new(
                options.per_minute,
                options.per_hour,
                options.clock_speed,
            )),
            lease_duration: options
                .lease_duration
                .clamp(Duration::from_secs(15), Duration::from_secs(60)),
        })
    }

    /// Take the machine's lease (machine ids compare without case), waiting
    /// for whoever holds it until `deadline`.
    ///
    /// - `Ok(lease)`: held and renewed in the background until the lease is
    ///   dropped or [`MachineLease::release`]d. Call [`MachineLease::check`]
    ///   right before each Defender POST.
    /// - [`CoordinationError::LockTimeout`]: still held by another invocation
    ///   at `deadline`.
    /// - [`CoordinationError::Unavailable`]: storage failed; returned at once,
    ///   without waiting for the deadline.
    pub async fn lock_machine(
        &self,
        machine_id: &str,
        deadline: Instant,
    ) -> Result<MachineLease, CoordinationError> {
        match self
            .lock_machine_unless(machine_id, deadline, &mut |_| false)
            .await?
        {
            Locked::Held(lease) => Ok(lease),
            // `answered` never says so.
            Locked::Answered => Err(CoordinationError::LockTimeout {
                machine_id: machine_id.to_owned(),
            }),
        }
    }

    /// [`Self::lock_machine`], giving up the wait once `answered` says that a
    /// [`Handoff`] the last holder left answers everyone who needed the lease.
    pub async fn lock_machine_unless(
        &self,
        machine_id: &str,
        deadline: Instant,
        answered: &mut (dyn FnMut(&Handoff) -> bool + Send),
    ) -> Result<Locked, CoordinationError> {
        lock::lock_machine(
            &self.store,
            machine_id,
            self.lease_duration,
            deadline,
            answered,
        )
        .await
    }

    /// Wait for a slot in the shared budget of `endpoint`'s API, like
    /// [`crate::defender::budget::RateBudget::acquire`]: `Ok(())` once the
    /// call may be sent; [`CoordinationError::OverBudget`] at once (nothing
    /// reserved) when the slot would come after `deadline`;
    /// [`CoordinationError::Unavailable`] when storage failed.
    pub async fn reserve(
        &self,
        endpoint: Endpoint,
        deadline: Instant,
    ) -> Result<(), CoordinationError> {
        self.reserve_announcing(endpoint, deadline, &|_| {}).await
    }

    /// [`Self::reserve`], telling `on_slot` when the slot is before waiting.
    async fn reserve_announcing(
        &self,
        endpoint: Endpoint,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
    ) -> Result<(), CoordinationError> {
        self.reserve_replacing(endpoint, deadline, on_slot, None)
            .await
    }

    /// [`Self::reserve_announcing`], the new slot replacing `replaces` (a
    /// slot reserved ahead) in the same write.
    async fn reserve_replacing(
        &self,
        endpoint: Endpoint,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
        replaces: Option<Slot>,
    ) -> Result<(), CoordinationError> {
        let bucket = endpoint.bucket();
        let slot = self
            .budget
            .reserve_replacing(&self.store, bucket, deadline, replaces)
            .await?;
        on_slot(slot.instant);
        // Dropped before the slot comes (the caller went away): given back.
        let unused = UnusedSlot {
            store: &self.store,
            bucket,
            slot: Some(slot),
        };
        tokio::time::sleep_until(slot.instant).await;
        unused.used();
        Ok(())
    }

    /// Reserve a slot in `bucket` without waiting for it.
    pub async fn reserve_slot(
        &self,
        bucket: &str,
        deadline: Instant,
    ) -> Result<Slot, CoordinationError> {
        self.budget.reserve(&self.store, bucket, deadline).await
    }

    /// Job records in the coordination container.
    pub fn records(&self) -> records::BlobRecords {
        records::BlobRecords::new(self.store.clone())
    }

    /// The queue `name` of the same account, its requests counted with the
    /// coordinator's.
    pub fn queue(
        &self,
        settings: &StorageSettings,
        name: &str,
        timeout: Duration,
    ) -> Result<queue::StorageQueue, CoordinationError> {
        queue::StorageQueue::new(settings, name, timeout, Some(self.store.counting_policy()))
    }

    /// HTTP requests this coordinator has sent to storage (benchmarks, tests).
    pub fn storage_operations(&self) -> u64 {
        self.store.operations().total()
    }

    /// The same, by kind of request (`acquire_lease=3 read=2 …`), for the
    /// totals logged at shutdown.
    pub fn storage_operations_by_kind(&self) -> String {
        self.store
            .operations()
            .by_kind()
            .iter()
            .map(|(kind, n)| format!("{kind}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl CoordinationError {
    /// This failure as a refusal to send to Defender: storage unavailable,
    /// retry after what it says (5 s when it says nothing), with this error
    /// as the reason.
    pub(crate) fn into_unavailable(self) -> Self {
        Self::Unavailable {
            retry_after: self.retry_after().unwrap_or(Duration::from_secs(5)),
            reason: self.to_string(),
        }
    }
}

/// The shared budget's answer as the client's budget sees it.
fn as_budget_error(error: CoordinationError) -> BudgetError {
    match error {
        CoordinationError::OverBudget { wait, .. } => BudgetError::OverBudget(OverBudget { wait }),
        other => BudgetError::Refused(Refusal::new(other.into_unavailable())),
    }
}

/// The client draws its slots here with `COORDINATION=storage`.
#[async_trait::async_trait]
impl CallBudget for Coordinator {
    async fn acquire(&self, endpoint: Endpoint, deadline: Instant) -> Result<(), BudgetError> {
        self.acquire_announcing(endpoint, deadline, &|_| {}).await
    }

    async fn acquire_announcing(
        &self,
        endpoint: Endpoint,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
    ) -> Result<(), BudgetError> {
        self.reserve_announcing(endpoint, deadline, on_slot)
            .await
            .map_err(as_budget_error)
    }

    async fn wait_for_share(
        &self,
        endpoint: Endpoint,
        share: Share,
    ) -> Result<Duration, BudgetError> {
        self.budget
            .wait_for_share(&self.store, endpoint.bucket(), share)
            .await
            .map_err(|e| BudgetError::Refused(Refusal::new(e.into_unavailable())))
    }

    async fn reserve_share(
        &self,
        endpoint: Endpoint,
        share: Share,
        deadline: Instant,
    ) -> Result<Vec<Reserved>, BudgetError> {
        let slots = self
            .budget
            .reserve_share(&self.store, endpoint.bucket(), share, deadline)
            .await
            .map_err(as_budget_error)?;
        Ok(slots
            .into_iter()
            .map(|s| Reserved {
                instant: s.instant,
                at: s.at,
            })
            .collect())
    }

    async fn use_reserved(
        &self,
        endpoint: Endpoint,
        slot: Reserved,
        deadline: Instant,
        on_slot: &(dyn Fn(Instant) + Sync),
    ) -> Result<(), BudgetError> {
        if wait_if_fresh(slot, self.budget.allowance(), deadline).await {
            return Ok(());
        }
        let old = Slot {
            at: slot.at,
            instant: slot.instant,
        };
        let deadline = deadline.min(Instant::now() + move_wait(self.budget.minute_window()));
        self.reserve_replacing(endpoint, deadline, on_slot, Some(old))
            .await
            .map_err(as_budget_error)
    }

    fn give_back(&self, endpoint: Endpoint, slots: Vec<Reserved>) {
        let slots = slots
            .into_iter()
            .map(|s| Slot {
                at: s.at,
                instant: s.instant,
            })
            .collect();
        shared_budget::give_back_all_later(&self.store, endpoint.bucket(), slots);
    }

    /// The shared budget lives in storage; without asking it, this instance
    /// cannot tell, so batched reads take the one tenant read.
    fn free_now(&self, _endpoint: Endpoint) -> usize {
        0
    }
}

/// A reserved slot not used yet: given back if dropped so.
struct UnusedSlot<'a> {
    store: &'a Arc<Store>,
    bucket: &'static str,
    slot: Option<Slot>,
}

impl UnusedSlot<'_> {
    fn used(mut self) {
        self.slot = None;
    }
}

impl Drop for UnusedSlot<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            shared_budget::give_back_later(self.store, self.bucket, slot);
        }
    }
}
