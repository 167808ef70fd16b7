//! The simulator's in-memory state: the tenant (machines, actions, offline
//! devices, rate-limit windows), the injected faults and the request log.
//!
//! Each part sits behind its own `parking_lot::Mutex`, held only for short,
//! synchronous sections (never across an `.await`). Such a lock is not
//! poisoned by a panicking holder: the data is plain values, and a test
//! simulator that panics on every later request would hide the first failure.

use std::collections::{HashMap, HashSet};

use parking_lot::{Mutex, MutexGuard};

use time::{Duration, OffsetDateTime};

use super::actions::{ActionRecord, Cancellation, Life};
use super::clock::{SimClock, sim_duration};
use super::faults::{Fault, FaultKind, FaultList};
use super::filter::Condition;
use super::ratelimit::RateLimiter;
use super::requests::{RecordedRequest, RequestLog};
use super::tags::TagAction;
use super::{ActionOutcome, DuplicateBehaviour, SimConfig, seed};
use crate::defender::Endpoint;
use crate::defender::models::{ActionStatus, ActionType, Machine, MachineAction};

/// Everything a running simulator shares between its handlers and handles.
pub(crate) struct Sim {
    pub(crate) config: SimConfig,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub(crate) base_url: String,
    pub(crate) clock: SimClock,
    pub(crate) life: Life,
    tenant: Mutex<Tenant>,
    faults: Mutex<FaultList>,
    log: Mutex<RequestLog>,
    /// Tokens the identity endpoint issued for a resource that is not
    /// Defender's, with that resource.
    foreign_tokens: Mutex<HashMap<String, String>>,
    /// The app's application roles (from `SimConfig::roles`, changeable).
    roles: Mutex<Vec<String>>,
}

impl Sim {
    pub(crate) fn new(config: SimConfig, base_url: String) -> Self {
        let start = OffsetDateTime::now_utc()
            .checked_sub(sim_duration(config.clock_behind))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let clock = SimClock::starting_at(start, config.speed);
        let mut machines = if config.seed {
            seed::machines(clock.now())
        } else {
            Vec::new()
        };
        for fleet in &config.fleets {
            machines.extend(fleet.machines(clock.now()));
        }
        let life = Life {
            pending_for: sim_duration(config.pending_for),
            in_progress_for: sim_duration(config.in_progress_for),
            cancel_takes: sim_duration(config.cancel_takes),
            fields: config.action_fields,
        };
        let mut tenant = Tenant {
            machines: Vec::new(),
            machine_index: MachineIndex::default(),
            actions: Vec::new(),
            actions_by_machine: HashMap::new(),
            offline: HashSet::new(),
            failing: HashSet::new(),
            limiter: config.rate_limits.map(RateLimiter::new),
            next_seq: 0,
        };
        for machine in machines {
            tenant.upsert_machine(machine);
        }
        let roles = Mutex::new(config.roles.clone());
        Self {
            config,
            base_url,
            clock,
            life,
            tenant: Mutex::new(tenant),
            faults: Mutex::new(FaultList::default()),
            log: Mutex::new(RequestLog::default()),
            foreign_tokens: Mutex::new(HashMap::new()),
            roles,
        }
    }

    /// The token the identity endpoint issues for `resource`: the configured
    /// one for a Defender audience, a token the API refuses otherwise.
    pub(crate) fn issue_token(&self, resource: &str) -> String {
        let wanted = resource.trim_end_matches('/');
        if self
            .config
            .audiences
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(wanted))
        {
            return self.config.token.clone();
        }
        let token = format!("foreign-{}", uuid::Uuid::new_v4().simple());
        self.foreign_tokens
            .lock()
            .insert(token.clone(), resource.to_owned());
        token
    }

    /// Runs `check` on the app's current roles.
    pub(crate) fn with_roles<T>(&self, check: impl FnOnce(&[String]) -> T) -> T {
        check(&self.roles.lock())
    }

    pub(crate) fn set_roles(&self, roles: Vec<String>) {
        *self.roles.lock() = roles;
    }

    /// The resource a token was issued for, when it is not Defender's.
    pub(crate) fn foreign_audience(&self, token: &str) -> Option<String> {
        self.foreign_tokens.lock().get(token).cloned()
    }

    pub(crate) fn tenant(&self) -> MutexGuard<'_, Tenant> {
        self.tenant.lock()
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.log.lock().completed()
    }

    pub(crate) fn clear_requests(&self) {
        self.log.lock().clear();
    }

    pub(crate) fn log_begin(&self, mut request: RecordedRequest) -> u64 {
        request.arrived_ms =
            i64::try_from(self.clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        self.log.lock().begin(request)
    }

    pub(crate) fn log_finish(
        &self,
        seq: u64,
        status: u16,
        total: std::time::Duration,
        handling: std::time::Duration,
    ) {
        let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.log
            .lock()
            .finish(seq, status, micros(total), micros(handling));
    }

    pub(crate) fn inject(&self, fault: Fault) {
        self.faults.lock().push(fault);
    }

    pub(crate) fn clear_faults(&self) {
        self.faults.lock().clear();
    }

    pub(crate) fn faults(&self) -> Vec<Fault> {
        self.faults.lock().list()
    }

    pub(crate) fn take_fault(&self, method: &str, path: &str) -> Option<FaultKind> {
        self.faults.lock().take_match(method, path)
    }

    pub(crate) fn add_machine(&self, machine: Machine) {
        self.tenant().upsert_machine(machine);
    }

    pub(crate) fn add_fleet(&self, fleet: &seed::Fleet) {
        let now = self.clock.now();
        let mut tenant = self.tenant();
        for machine in fleet.machines(now) {
            tenant.upsert_machine(machine);
        }
    }

    pub(crate) fn machines(&self) -> Vec<Machine> {
        self.tenant().machines.clone()
    }

    pub(crate) fn actions(&self) -> Vec<MachineAction> {
        let now = self.clock.now();
        self.tenant()
            .actions_newest_first()
            .into_iter()
            .map(|a| a.to_wire(now, self.life))
            .collect()
    }

    pub(crate) fn set_offline(&self, machine_id: &str, offline: bool) {
        let now = self.clock.now();
        self.tenant()
            .set_offline(machine_id, offline, now, self.life);
    }

    pub(crate) fn banner(&self) -> String {
        super::control::banner(self)
    }
}

/// Result of looking a machine up by id or name.
pub(crate) enum Lookup<'a> {
    Found(&'a Machine),
    NotFound,
    /// Several records carry this computer name; which one Defender returns
    /// is not known, so the simulator refuses to pick.
    AmbiguousName(usize),
}

/// Result of a restrict/unrestrict request that passed validation.
pub(crate) enum Created {
    New(MachineAction),
    /// `DuplicateBehaviour::ReturnPending`: the action already under way.
    Existing(MachineAction),
    /// `DuplicateBehaviour::Error`.
    AlreadyInProgress,
}

pub(crate) enum CancelError {
    NotFound,
    Terminal(ActionStatus),
}

pub(crate) struct Tenant {
    /// Read-only outside this module: [`Tenant::upsert_machine`] keeps the
    /// index in step.
    pub(crate) machines: Vec<Machine>,
    machine_index: MachineIndex,
    actions: Vec<ActionRecord>,
    /// Positions in `actions` per lowercase machine id, oldest first, so a
    /// machine's actions are found without scanning every action (benchmarks
    /// create tens of thousands).
    actions_by_machine: HashMap<String, Vec<usize>>,
    /// Lowercase ids of offline machines.
    offline: HashSet<String>,
    /// Lowercase ids of machines whose new actions end `Failed`.
    failing: HashSet<String>,
    limiter: Option<RateLimiter>,
    next_seq: u64,
}

impl Tenant {
    /// Counts a call against its endpoint's rate limit, or returns the
    /// simulated wait until a slot frees.
    pub(crate) fn acquire(
        &mut self,
        endpoint: Endpoint,
        now: OffsetDateTime,
    ) -> Result<(), Duration> {
        match &mut self.limiter {
            Some(limiter) => limiter.try_acquire(endpoint, now),
            None => Ok(()),
        }
    }

    pub(crate) fn upsert_machine(&mut self, machine: Machine) {
        let index = &mut self.machine_index;
        match index.by_id.get(&machine.id.as_str().to_ascii_lowercase()) {
            Some(&at) => {
                index.unlink_aad(self.machines[at].aad_device_id.as_deref(), at);
                index.link_aad(machine.aad_device_id.as_deref(), at);
                self.machines[at] = machine;
            }
            None => {
                let at = self.machines.len();
                index
                    .by_id
                    .insert(machine.id.as_str().to_ascii_lowercase(), at);
                index.link_aad(machine.aad_device_id.as_deref(), at);
                self.machines.push(machine);
            }
        }
    }

    /// `GET /api/machines/{id}` accepts the machine id or the computer name.
    pub(crate) fn find_machine(&self, key: &str) -> Lookup<'_> {
        if let Some(&at) = self.machine_index.by_id.get(&key.to_ascii_lowercase()) {
            return Lookup::Found(&self.machines[at]);
        }
        let named: Vec<&Machine> = self
            .machines
            .iter()
            .filter(|m| {
                m.computer_dns_name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(key))
            })
            .collect();
        match named.as_slice() {
            [] => Lookup::NotFound,
            [one] => Lookup::Found(one),
            many => Lookup::AmbiguousName(many.len()),
        }
    }

    pub(crate) fn list_machines(&self, conditions: &[Condition]) -> Vec<Machine> {
        // An `aadDeviceId` or `id` condition narrows the candidates through the
        // index (insertion order kept); every condition is still checked.
        let by_aad = conditions.iter().find(|c| c.field == "aadDeviceId");
        let by_id = conditions.iter().find(|c| c.field == "id");
        let candidates: Box<dyn Iterator<Item = &Machine>> = if let Some(c) = by_aad {
            let positions = self.machine_index.by_aad.get(&c.value.to_ascii_lowercase());
            Box::new(
                positions
                    .into_iter()
                    .flatten()
                    .map(|&at| &self.machines[at]),
            )
        } else if let Some(c) = by_id {
            let at = self.machine_index.by_id.get(&c.value.to_ascii_lowercase());
            Box::new(at.into_iter().map(|&at| &self.machines[at]))
        } else {
            Box::new(self.machines.iter())
        };
        candidates
            .filter(|m| conditions.iter().all(|c| machine_matches(m, c)))
            .cloned()
            .collect()
    }

    /// Actions at `now`, newest first, filtered.
    pub(crate) fn list_actions(
        &self,
        conditions: &[Condition],
        now: OffsetDateTime,
        life: Life,
    ) -> Vec<MachineAction> {
        let candidates = match conditions.iter().find(|c| c.field == "machineId") {
            Some(c) => self.machine_actions_newest_first(&c.value),
            None => self.actions_newest_first(),
        };
        // A type condition needs no clock: filtered before the rest is
        // worked out (a large tenant's list is read page by page).
        let kinds: Vec<&str> = conditions
            .iter()
            .filter(|c| c.field == "type")
            .map(|c| c.value.as_str())
            .collect();
        candidates
            .into_iter()
            .filter(|a| kinds.iter().all(|k| a.kind.as_str() == *k))
            .map(|a| a.to_wire(now, life))
            .filter(|a| conditions.iter().all(|c| action_matches(a, c)))
            .collect()
    }

    /// The actions the conditions keep, newest first, as records: `None`
    /// when a condition needs the clock (`status`). Only the page answered
    /// then has to be worked out, which keeps a large tenant's list cheap.
    pub(crate) fn action_records(&self, conditions: &[Condition]) -> Option<Vec<&ActionRecord>> {
        let fixed = |a: &ActionRecord, c: &Condition| match c.field {
            "machineId" => Some(a.machine_id.eq_ignore_ascii_case(&c.value)),
            "type" => Some(a.kind.as_str() == c.value),
            "id" => Some(a.id.eq_ignore_ascii_case(&c.value)),
            "requestor" => Some(a.requestor == c.value),
            _ => None,
        };
        if conditions
            .iter()
            .any(|c| !matches!(c.field, "machineId" | "type" | "id" | "requestor"))
        {
            return None;
        }
        let candidates = match conditions.iter().find(|c| c.field == "machineId") {
            Some(c) => self.machine_actions_newest_first(&c.value),
            None => self.actions_newest_first(),
        };
        Some(
            candidates
                .into_iter()
                .filter(|a| conditions.iter().all(|c| fixed(a, c) == Some(true)))
                .collect(),
        )
    }

    pub(crate) fn action(
        &self,
        id: &str,
        now: OffsetDateTime,
        life: Life,
    ) -> Option<MachineAction> {
        self.actions
            .iter()
            .find(|a| a.id.eq_ignore_ascii_case(id))
            .map(|a| a.to_wire(now, life))
    }

    fn actions_newest_first(&self) -> Vec<&ActionRecord> {
        newest_first(self.actions.iter().collect())
    }

    /// One machine's actions (id compared case-insensitively), newest first.
    fn machine_actions_newest_first(&self, machine_id: &str) -> Vec<&ActionRecord> {
        let positions = self
            .actions_by_machine
            .get(&machine_id.to_ascii_lowercase());
        newest_first(
            positions
                .into_iter()
                .flatten()
                .map(|&at| &self.actions[at])
                .collect(),
        )
    }

    /// Creates a restrict/unrestrict action on `machine`, unless one of the
    /// same type is still Pending or InProgress there.
    pub(crate) fn create_action(
        &mut self,
        machine: &Machine,
        kind: ActionType,
        comment: String,
        now: OffsetDateTime,
        life: Life,
        duplicate: DuplicateBehaviour,
    ) -> Created {
        let running = self
            .machine_actions_newest_first(machine.id.as_str())
            .into_iter()
            .find(|a| a.kind == kind && !a.phase(now, life).status.is_terminal())
            .map(|a| a.to_wire(now, life));
        if let Some(running) = running {
            return match duplicate {
                DuplicateBehaviour::Error => Created::AlreadyInProgress,
                DuplicateBehaviour::ReturnPending => Created::Existing(running),
            };
        }
        let offline = self
            .offline
            .contains(&machine.id.as_str().to_ascii_lowercase());
        let record = ActionRecord {
            seq: self.next_seq,
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            machine_id: machine.id.to_string(),
            machine_name: machine.computer_dns_name.clone(),
            requestor: seed::REQUESTOR.to_owned(),
            comment,
            created: now,
            countdown_from: (!offline).then_some(now),
            cancellation: None,
            fails: self
                .failing
                .contains(&machine.id.as_str().to_ascii_lowercase()),
        };
        self.next_seq += 1;
        let wire = record.to_wire(now, life);
        self.actions_by_machine
            .entry(record.machine_id.to_ascii_lowercase())
            .or_default()
            .push(self.actions.len());
        self.actions.push(record);
        Created::New(wire)
    }

    pub(crate) fn cancel(
        &mut self,
        id: &str,
        comment: String,
        now: OffsetDateTime,
        life: Life,
    ) -> Result<MachineAction, CancelError> {
        let action = self
            .actions
            .iter_mut()
            .find(|a| a.id.eq_ignore_ascii_case(id))
            .ok_or(CancelError::NotFound)?;
        let status = action.phase(now, life).status;
        if status.is_terminal() {
            return Err(CancelError::Terminal(status));
        }
        // A second cancel while the first has not taken effect changes nothing.
        if action.cancellation.is_none() {
            action.cancellation = Some(Cancellation {
                requestor: seed::REQUESTOR.to_owned(),
                comment,
                at: now,
                effective: now.checked_add(life.cancel_takes).unwrap_or(now),
            });
        }
        Ok(action.to_wire(now, life))
    }

    /// Holds back (offline) or releases (online) the machine's actions that
    /// the device has not picked up yet.
    pub(crate) fn set_offline(
        &mut self,
        machine_id: &str,
        offline: bool,
        now: OffsetDateTime,
        life: Life,
    ) {
        let key = machine_id.to_ascii_lowercase();
        let changed = if offline {
            self.offline.insert(key.clone())
        } else {
            self.offline.remove(&key)
        };
        if !changed {
            return;
        }
        for action in self
            .actions
            .iter_mut()
            .filter(|a| a.machine_id.eq_ignore_ascii_case(&key))
        {
            if action.phase(now, life).status == ActionStatus::Pending {
                action.countdown_from = (!offline).then_some(now);
            }
        }
    }

    pub(crate) fn set_outcome(&mut self, machine_id: &str, outcome: ActionOutcome) {
        let key = machine_id.to_ascii_lowercase();
        match outcome {
            ActionOutcome::Failed => self.failing.insert(key),
            ActionOutcome::Succeeded => self.failing.remove(&key),
        };
    }

    /// Whether a machine has this id (ids compare case-insensitively).
    pub(crate) fn has_machine_id(&self, machine_id: &str) -> bool {
        self.machine_index
            .by_id
            .contains_key(&machine_id.to_ascii_lowercase())
    }

    /// Adds or removes one tag on the machine with this id; the updated
    /// machine, or `None` if there is none.
    pub(crate) fn set_tag(
        &mut self,
        machine_id: &str,
        value: &str,
        action: TagAction,
    ) -> Option<Machine> {
        let at = *self
            .machine_index
            .by_id
            .get(&machine_id.to_ascii_lowercase())?;
        let machine = &mut self.machines[at];
        let tags = machine
            .extra
            .entry("machineTags")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if !tags.is_array() {
            *tags = serde_json::Value::Array(Vec::new());
        }
        if let serde_json::Value::Array(tags) = tags {
            super::tags::apply(tags, value, action);
        }
        Some(machine.clone())
    }

    pub(crate) fn is_offline(&self, machine_id: &str) -> bool {
        self.offline.contains(&machine_id.to_ascii_lowercase())
    }
}

/// Positions in `Tenant::machines` by lowercase machine id and by lowercase
/// `aadDeviceId` (several records may share one; kept in insertion order).
#[derive(Default)]
struct MachineIndex {
    by_id: HashMap<String, usize>,
    by_aad: HashMap<String, Vec<usize>>,
}

impl MachineIndex {
    fn link_aad(&mut self, aad: Option<&str>, at: usize) {
        if let Some(aad) = aad {
            let positions = self.by_aad.entry(aad.to_ascii_lowercase()).or_default();
            let slot = positions.partition_point(|&p| p < at);
            positions.insert(slot, at);
        }
    }

    fn unlink_aad(&mut self, aad: Option<&str>, at: usize) {
        if let Some(positions) = aad.and_then(|aad| self.by_aad.get_mut(&aad.to_ascii_lowercase()))
        {
            positions.retain(|&p| p != at);
        }
    }
}

fn newest_first(mut actions: Vec<&ActionRecord>) -> Vec<&ActionRecord> {
    actions.sort_by(|a, b| b.created.cmp(&a.created).then(b.seq.cmp(&a.seq)));
    actions
}

/// Ids, GUIDs and DNS names compare case-insensitively; enum-like values
/// (`healthStatus`) exactly, as OData string comparison does. Tags too: how
/// Defender compares them is not documented, and exact is OData's `eq`.
fn machine_matches(m: &Machine, c: &Condition) -> bool {
    let ci = |v: Option<&str>| v.is_some_and(|v| v.eq_ignore_ascii_case(&c.value));
    match c.field {
        "aadDeviceId" => ci(m.aad_device_id.as_deref()),
        "id" => m.id == c.value,
        "computerDnsName" => ci(m.computer_dns_name.as_deref()),
        "healthStatus" => m.health_status.as_deref() == Some(c.value.as_str()),
        "machineTags" => machine_tags(m).any(|t| t == c.value),
        // The parser normalised the literal to an i64's text.
        "rbacGroupId" => m
            .extra
            .get("rbacGroupId")
            .and_then(serde_json::Value::as_i64)
            .is_some_and(|g| g.to_string() == c.value),
        // The filter parser only lets modelled fields through.
        _ => false,
    }
}

/// A machine's `machineTags` (kept in its untyped fields, as Defender sends them).
pub(crate) fn machine_tags(m: &Machine) -> impl Iterator<Item = &str> {
    m.extra
        .get("machineTags")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
}

fn action_matches(a: &MachineAction, c: &Condition) -> bool {
    match c.field {
        "machineId" => a.machine_id.as_ref().is_some_and(|v| *v == c.value),
        "type" => a.action_type.as_str() == c.value,
        "status" => a.status.as_str() == c.value,
        "id" => a.id == c.value,
        "requestor" => a.requestor.as_deref() == Some(c.value.as_str()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::SimConfig;

    fn machine(id: &str, aad: &str) -> Machine {
        serde_json::from_value(serde_json::json!({
            "id": id, "aadDeviceId": aad, "osPlatform": "Windows11", "healthStatus": "Active"
        }))
        .unwrap()
    }

    fn by(field: &'static str, value: &str) -> Vec<Condition> {
        vec![Condition {
            field,
            value: value.to_owned(),
        }]
    }

    fn ids(machines: &[Machine]) -> Vec<&str> {
        machines.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn the_indexes_follow_upserts_and_keep_insertion_order() {
        let sim = Sim::new(
            SimConfig {
                seed: false,
                ..SimConfig::default()
            },
            "http://sim".to_owned(),
        );
        let mut tenant = sim.tenant();
        tenant.upsert_machine(machine("AAA", "11111111-1111-4111-8111-111111111111"));
        tenant.upsert_machine(machine("bbb", "22222222-2222-4222-8222-222222222222"));
        tenant.upsert_machine(machine("ccc", "11111111-1111-4111-8111-111111111111"));
        let one = by("aadDeviceId", "11111111-1111-4111-8111-111111111111");
        assert_eq!(ids(&tenant.list_machines(&one)), ["AAA", "ccc"]);
        // Case-insensitive ids and GUIDs, as before the index.
        let upper = by(
            "aadDeviceId",
            "11111111-1111-4111-8111-111111111111"
                .to_uppercase()
                .as_str(),
        );
        assert_eq!(ids(&tenant.list_machines(&upper)), ["AAA", "ccc"]);
        assert!(matches!(tenant.find_machine("aaa"), Lookup::Found(m) if m.id == "AAA"));
        assert_eq!(ids(&tenant.list_machines(&by("id", "BBB"))), ["bbb"]);

        // Replacing a record (any case) moves it to its new device id, in place.
        tenant.upsert_machine(machine("aaa", "22222222-2222-4222-8222-222222222222"));
        assert_eq!(ids(&tenant.list_machines(&one)), ["ccc"]);
        let two = by("aadDeviceId", "22222222-2222-4222-8222-222222222222");
        assert_eq!(ids(&tenant.list_machines(&two)), ["aaa", "bbb"]);
        assert_eq!(tenant.machines.len(), 3);
    }

    #[test]
    fn a_machines_actions_are_found_through_the_index() {
        let sim = Sim::new(
            SimConfig {
                seed: false,
                ..SimConfig::default()
            },
            "http://sim".to_owned(),
        );
        let now = sim.clock.now();
        let mut tenant = sim.tenant();
        let (a, b) = (
            machine("AAA", "11111111-1111-4111-8111-111111111111"),
            machine("bbb", "22222222-2222-4222-8222-222222222222"),
        );
        for m in [&a, &b, &a] {
            tenant.upsert_machine(m.clone());
        }
        let kinds = [
            ActionType::RestrictCodeExecution,
            ActionType::RestrictCodeExecution,
            ActionType::UnrestrictCodeExecution,
        ];
        for (m, kind) in [&a, &b, &a].into_iter().zip(kinds) {
            let created = tenant.create_action(
                m,
                kind,
                "c".to_owned(),
                now,
                sim.life,
                DuplicateBehaviour::Error,
            );
            assert!(matches!(created, Created::New(_)));
        }
        // A second restrict on AAA while the first is pending: refused.
        let again = tenant.create_action(
            &a,
            ActionType::RestrictCodeExecution,
            "c".to_owned(),
            now,
            sim.life,
            DuplicateBehaviour::Error,
        );
        assert!(matches!(again, Created::AlreadyInProgress));
        let listed = tenant.list_actions(&by("machineId", "aaa"), now, sim.life);
        let types: Vec<&str> = listed.iter().map(|a| a.action_type.as_str()).collect();
        assert_eq!(
            types,
            ["UnrestrictCodeExecution", "RestrictCodeExecution"],
            "newest first"
        );
        assert_eq!(tenant.list_actions(&[], now, sim.life).len(), 3);
        assert!(
            tenant
                .list_actions(&by("machineId", "zzz"), now, sim.life)
                .is_empty()
        );
    }
}
