//! Finding the Defender machine for a device: one lookup shared by every
//! invocation that asks at the same time, remembered for a short while.
//!
//! In an outbreak, webhooks for one device arrive together; were each to look
//! the machine up on its own, they would spend the machine APIs' budget (100
//! calls a minute) several times over. Here concurrent lookups of one device share one
//! Defender call (single flight), and a found machine is remembered for at
//! most `MACHINE_CACHE_SECONDS` (60 s at most) so that retries and duplicates
//! need no call at all.
//!
//! Lookups of different devices are batched ([`super::batch`]) and read as
//! [`super::read_policy`] says: one by one (`aadDeviceId eq <guid>` or
//! `GET /api/machines/{id}`), or, when the budget is tight (or shared by
//! several instances), one list of the tenant's machines
//! (`GET /api/machines?$top=10000`, every page) that answers them all.
//!
//! The rule that keeps the cache from acting on a stale record:
//! - only a record that is `Active` and not merged into another is
//!   remembered: anything else is looked up again every time;
//! - a remembered record is forgotten when a POST for it answers 404, and the
//!   invocation looks the device up again before deciding anything;
//! - the action history is never cached: the state is always read afresh
//!   (see [`super::state_reads`]).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;

use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared, WeakShared},
};
use thiserror::Error;
use tokio::time::Instant;

use uuid::Uuid;

use crate::{
    defender::{DefenderClient, DefenderError, Endpoint, ids::MachineId, models::Machine},
    service::{
        batch::{Answered, Batcher, Close, CloseOnSend, Source},
        read_policy::{ReadPolicy, Tie},
        runbook::DeviceRef,
        selection::{self, NoChoice},
    },
};

/// The longest a found machine may be remembered.
pub const MAX_CACHE: Duration = Duration::from_secs(60);

/// The most devices remembered at once (a few MiB of machine records): an
/// outbreak's retries and duplicates come within seconds, for hundreds of
/// devices, not tens of thousands a minute.
const MAX_REMEMBERED: usize = 1024;

/// The machine chosen for a device.
#[derive(Debug, Clone)]
pub struct Found {
    pub machine: Machine,
    /// How many Defender records matched the device.
    pub candidates: usize,
}

/// A lookup's answer, and whether it came from memory.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub found: Found,
    pub cached: bool,
}

/// Why no machine was found.
#[derive(Debug, Clone, Error)]
pub enum FindError {
    /// Defender has no usable machine for the device; the text says why.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Defender(#[from] DefenderError),
}

type LookupFuture = BoxFuture<'static, Result<Found, FindError>>;
type Flight = Shared<LookupFuture>;

enum Slot {
    /// A lookup is under way; `id` tells flights apart. Held weakly: the
    /// lookup lives as long as someone waits for it, and one that nobody
    /// waits for any more is dropped with any rate-budget slot it waited for.
    Loading {
        id: u64,
        flight: WeakShared<LookupFuture>,
    },
    Found {
        found: Box<Found>,
        at: Instant,
    },
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Loading { id, .. } => f.debug_struct("Loading").field("id", id).finish(),
            Self::Found { found, at } => f
                .debug_struct("Found")
                .field("machine", &found.machine.id)
                .field("at", at)
                .finish(),
        }
    }
}

/// Shared, briefly cached machine lookups.
#[derive(Debug)]
pub struct MachineDirectory {
    records: Arc<Batcher<MachineSource>>,
    ttl: Duration,
    slots: Mutex<Swept<DeviceRef, Slot>>,
    next_flight: AtomicU64,
}

impl MachineDirectory {
    /// `ttl` is capped at [`MAX_CACHE`]; zero remembers nothing (lookups are
    /// still shared while under way).
    pub fn new(client: DefenderClient, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            records: Batcher::new(MachineSource {
                client,
                policy: ReadPolicy::new(1, Tie::KeyByKey),
            }),
            ttl: ttl.min(MAX_CACHE),
            slots: Mutex::new(Swept::default()),
            next_flight: AtomicU64::new(0),
        })
    }

    /// The machine for `device`.
    pub async fn find(
        self: &Arc<Self>,
        device: &DeviceRef,
        deadline: Instant,
    ) -> Result<Lookup, FindError> {
        loop {
            let (flight, joined) = match self.remembered_or_flight(device, deadline) {
                Ok(found) => {
                    return Ok(Lookup {
                        found,
                        cached: true,
                    });
                }
                Err(flight) => flight,
            };
            let result = tokio::time::timeout_at(deadline, flight)
                .await
                .map_err(|_| {
                    FindError::Defender(DefenderError::OutOfTime {
                        endpoint: lookup(device),
                    })
                })?;
            match result {
                Ok(found) => {
                    return Ok(Lookup {
                        found,
                        cached: false,
                    });
                }
                // A flight started by another invocation, with less time
                // left, ran out of it; this one may still have time: look
                // again, with its own deadline.
                Err(FindError::Defender(
                    DefenderError::OutOfTime { .. } | DefenderError::OverBudget { .. },
                )) if joined && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Remember `machine`, read from Defender at `read_at` by someone else
    /// (a job's listing of its selector), as `device`'s record, under the
    /// same rule as a lookup's answer: only an Active record that is not
    /// merged, whose id is the device's, aged from when it was read. A
    /// lookup under way is left alone.
    pub fn remember(&self, device: &DeviceRef, machine: Machine, read_at: Instant) {
        let DeviceRef::Machine(id) = device else {
            return;
        };
        if self.ttl.is_zero()
            || read_at.elapsed() >= self.ttl
            || machine.id != *id
            || !rememberable(&machine)
        {
            return;
        }
        let mut slots = self.slots.lock();
        if matches!(slots.get(device), Some(Slot::Loading { .. })) || slots.len() >= MAX_REMEMBERED
        {
            return;
        }
        slots.insert(
            device.clone(),
            Slot::Found {
                found: Box::new(Found {
                    machine,
                    candidates: 1,
                }),
                at: read_at,
            },
        );
    }

    /// Forget what is remembered for `device` (a POST for it answered 404).
    pub fn forget(&self, device: &DeviceRef) {
        let mut slots = self.slots.lock();
        if matches!(slots.get(device), Some(Slot::Found { .. })) {
            slots.remove(device);
        }
    }

    /// A usable remembered machine, or the flight to wait for and whether it
    /// was joined (started by another invocation) rather than started here.
    fn remembered_or_flight(
        self: &Arc<Self>,
        device: &DeviceRef,
        deadline: Instant,
    ) -> Result<Found, (Flight, bool)> {
        let mut slots = self.slots.lock();
        match slots.get(device) {
            Some(Slot::Found { found, at }) if at.elapsed() < self.ttl => {
                return Ok(Found::clone(found));
            }
            Some(Slot::Loading { flight, .. }) => {
                if let Some(flight) = flight.upgrade().filter(|f| f.peek().is_none()) {
                    return Err((flight, true));
                }
            }
            _ => {}
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let directory = Arc::clone(self);
        let key = device.clone();
        // Polled by the invocations that wait for it; it settles the slot
        // itself when it finishes.
        let flight = async move {
            let result = directory.look_up(&key, deadline).await;
            directory.settle(&key, id, started, &result);
            result
        }
        .boxed()
        .shared();
        let Some(weak) = flight.downgrade() else {
            return Err((flight, false));
        };
        slots.insert(device.clone(), Slot::Loading { id, flight: weak });
        Err((flight, false))
    }

    /// Remember the flight's answer if it may be remembered, else clear it.
    fn settle(
        &self,
        device: &DeviceRef,
        id: u64,
        started: Instant,
        result: &Result<Found, FindError>,
    ) {
        let mut slots = self.slots.lock();
        if !matches!(slots.get(device), Some(Slot::Loading { id: current, .. }) if *current == id) {
            return;
        }
        let ttl = self.ttl;
        // Expired records and abandoned lookups go, now and then.
        slots.sweep(|_, slot| match slot {
            Slot::Found { at, .. } => at.elapsed() < ttl,
            Slot::Loading { flight, .. } => flight.upgrade().is_some(),
        });
        match result {
            Ok(found)
                if !self.ttl.is_zero()
                    && rememberable(&found.machine)
                    && slots.len() < MAX_REMEMBERED =>
            {
                // Age from when the lookup began: the record is at least that old.
                slots.insert(
                    device.clone(),
                    Slot::Found {
                        found: Box::new(found.clone()),
                        at: started,
                    },
                );
            }
            _ => {
                slots.remove(device);
            }
        }
    }

    async fn look_up(&self, device: &DeviceRef, deadline: Instant) -> Result<Found, FindError> {
        let records = self
            .records
            .get(device.clone(), deadline)
            .await?
            .unwrap_or_default();
        match device {
            DeviceRef::AadDevice(id) => match selection::choose(*id, records) {
                Ok(choice) => Ok(Found {
                    machine: choice.machine,
                    candidates: choice.candidates,
                }),
                Err(NoChoice::NoRecords) => Err(FindError::NotFound(format!(
                    "Defender has no machine whose aadDeviceId is {id}. The device may not be \
                     onboarded to Defender for Endpoint, may be outside the data retention, or \
                     may not report its Entra device id; pass its 40-character Defender \
                     machine id as deviceId instead."
                ))),
                Err(NoChoice::AllMerged { merged_into }) => Err(FindError::NotFound(format!(
                    "every Defender record for aadDeviceId {id} was merged into another \
                     machine ({}); pass the surviving machine id as deviceId.",
                    merged_into
                        .iter()
                        .map(MachineId::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
            DeviceRef::Machine(id) => match records.into_iter().next() {
                None => Err(FindError::NotFound(format!(
                    "Defender has no machine with id {id}."
                ))),
                // GET /machines/{id} also matches computer names; insist on the id.
                Some(m) if m.id != *id => Err(FindError::Defender(DefenderError::Protocol {
                    endpoint: Endpoint::GetMachine,
                    reason: format!("asked for machine {id}, got machine {}", m.id),
                })),
                // A merged record is stale: acting on it would not reach the device.
                Some(m) if is_merged(&m) => Err(FindError::NotFound(format!(
                    "Defender machine {id} was merged into machine {}; pass that id as deviceId.",
                    m.merged_into_machine_id
                        .map(|into| into.to_string())
                        .unwrap_or_default()
                ))),
                Some(m) => Ok(Found {
                    machine: m,
                    candidates: 1,
                }),
            },
        }
    }
}

/// Machine records per device: one by one, or the tenant's whole list.
struct MachineSource {
    client: DefenderClient,
    /// One by one or the tenant's list (a call per 10,000 machines).
    policy: ReadPolicy,
}

impl Source for MachineSource {
    type Key = DeviceRef;
    /// The records that match the device (several for a re-onboarded one).
    type Value = Vec<Machine>;
    type Error = DefenderError;

    async fn read(
        &self,
        devices: Vec<DeviceRef>,
        deadline: Instant,
        close: Close<'_>,
    ) -> Result<Answered<DeviceRef, Vec<Machine>>, DefenderError> {
        let by_aad = devices
            .iter()
            .filter(|d| matches!(d, DeviceRef::AadDevice(_)))
            .count();
        let needs = [
            (by_aad, self.client.free_slots(Endpoint::ListMachines)),
            (
                devices.len() - by_aad,
                self.client.free_slots(Endpoint::GetMachine),
            ),
        ];
        if self.policy.key_by_key(devices.len(), &needs) {
            close();
            let lookups = devices
                .iter()
                .map(|device| self.records_of(device, deadline));
            let records = futures_util::future::try_join_all(lookups).await?;
            return Ok(Answered {
                values: devices.into_iter().zip(records).collect(),
                complete: false,
            });
        }
        // The tenant's list answers every device, so lookups may keep joining
        // until its first request is sent.
        let (machines, calls) = self
            .client
            .all_machines(deadline, Some(&CloseOnSend(close)))
            .await?;
        self.policy.tenant_read_took(calls);
        let mut by_device: HashMap<DeviceRef, Vec<Machine>> = HashMap::new();
        for machine in machines {
            if let Some(aad) = machine
                .aad_device_id
                .as_deref()
                .and_then(|id| Uuid::try_parse(id.trim()).ok())
            {
                by_device
                    .entry(DeviceRef::AadDevice(aad))
                    .or_default()
                    .push(machine.clone());
            }
            by_device
                .entry(DeviceRef::Machine(machine.id.as_str().to_ascii_lowercase()))
                .or_default()
                .push(machine);
        }
        Ok(Answered {
            values: by_device,
            complete: true,
        })
    }

    fn out_of_time() -> DefenderError {
        DefenderError::OutOfTime {
            endpoint: Endpoint::ListMachines,
        }
    }

    fn abandoned() -> DefenderError {
        DefenderError::Protocol {
            endpoint: Endpoint::ListMachines,
            reason: "the shared machine lookup was abandoned".to_owned(),
        }
    }
}

impl MachineSource {
    async fn records_of(
        &self,
        device: &DeviceRef,
        deadline: Instant,
    ) -> Result<Vec<Machine>, DefenderError> {
        match device {
            DeviceRef::AadDevice(id) => self.client.machines_by_aad_device(*id, deadline).await,
            DeviceRef::Machine(id) => Ok(self
                .client
                .machine(id, deadline)
                .await?
                .into_iter()
                .collect()),
        }
    }
}

/// A map that drops its stale entries now and then: when it has doubled in
/// size since the last sweep. Each sweep is linear, so the cost per insert
/// stays constant however many devices a burst brings.
#[derive(Debug)]
pub(crate) struct Swept<K, V> {
    map: HashMap<K, V>,
    sweep_at: usize,
}

impl<K, V> Default for Swept<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            sweep_at: 1024,
        }
    }
}

impl<K, V> std::ops::Deref for Swept<K, V> {
    type Target = HashMap<K, V>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<K, V> std::ops::DerefMut for Swept<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl<K, V> Swept<K, V> {
    /// Keep only the entries `keep` accepts, if the map has grown enough.
    pub(crate) fn sweep(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(keep);
            self.sweep_at = (self.map.len() * 2).max(1024);
        }
    }
}

/// The call that looks `device` up.
fn lookup(device: &DeviceRef) -> Endpoint {
    match device {
        DeviceRef::AadDevice(_) => Endpoint::ListMachines,
        DeviceRef::Machine(_) => Endpoint::GetMachine,
    }
}

fn is_merged(machine: &Machine) -> bool {
    machine
        .merged_into_machine_id
        .as_ref()
        .is_some_and(|id| !id.as_str().trim().is_empty())
}

/// Only an active, unmerged record may be remembered.
fn rememberable(machine: &Machine) -> bool {
    machine
        .health_status
        .as_deref()
        .is_some_and(|h| h.eq_ignore_ascii_case("Active"))
        && !is_merged(machine)
}
