//! The fleet view: which machines are restricted right now, since when, by whom.
//!
//! Defender has no "restricted" flag on a machine, so each machine's state is
//! derived from the tenant's restrict and unrestrict actions with the same rule
//! the restrict function decides by
//! ([`crate::service::decision::deciding_action`]): the `Succeeded` action that
//! *finished* last makes it `restricted` or `released`; with none it is
//! `unknown`. A `Pending`/`InProgress` action is reported beside the state and
//! never changes it.
//!
//! Only machines with at least one restrict or unrestrict action in Defender's
//! history appear: the view is built from one tenant-wide read of those
//! actions, never one call per machine.

pub mod page;
pub mod text;

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    defender::{
        ids::MachineId,
        models::{ActionType, MachineAction},
        timestamp::Timestamp,
    },
    service::{
        decision::{created, deciding_action},
        runbook::RunbookError,
    },
};

/// A machine's state, as the README's state rules derive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Restricted,
    Released,
    /// No `Succeeded` restrict or unrestrict action in Defender's history.
    Unknown,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Released => "released",
            Self::Unknown => "unknown",
        }
    }
}

/// Which machines the caller asked for (`state` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    #[default]
    Restricted,
    Released,
    /// Machines with a pending restrict or unrestrict action, whatever their state.
    Pending,
    All,
}

impl StateFilter {
    pub const ALL: [Self; 4] = [Self::Restricted, Self::Released, Self::Pending, Self::All];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Released => "released",
            Self::Pending => "pending",
            Self::All => "all",
        }
    }

    /// The `state` query parameter; absent means `restricted`. Any other
    /// value, or the parameter given twice, is refused before Defender is
    /// called.
    pub fn from_query(query: &[(String, String)]) -> Result<Self, RunbookError> {
        let mut values = query.iter().filter(|(k, _)| k == "state").map(|(_, v)| v);
        let Some(value) = values.next() else {
            return Ok(Self::default());
        };
        let invalid = |reason: String| RunbookError::Invalid {
            field: "state",
            reason,
        };
        if values.next().is_some() {
            return Err(invalid(
                "(query parameter) is given more than once; give it once".to_owned(),
            ));
        }
        let wanted = value.trim();
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                invalid(format!(
                    "(query parameter) must be restricted (the default), released, pending or \
                     all; got {:?}",
                    wanted.chars().take(64).collect::<String>()
                ))
            })
    }

    fn keeps(self, device: &Device) -> bool {
        match self {
            Self::Restricted => device.state == DeviceState::Restricted,
            Self::Released => device.state == DeviceState::Released,
            Self::Pending => device.pending_action.is_some(),
            Self::All => true,
        }
    }
}

/// One machine in the answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub machine_id: MachineId,
    /// From the machine's newest action that names it (Defender fills the
    /// name in once the device has picked an action up).
    pub computer_dns_name: Option<String>,
    pub state: DeviceState,
    /// The deciding action's `lastUpdateDateTimeUtc` (its creation time if
    /// Defender sent none), as Defender wrote it.
    pub since: Option<Timestamp>,
    /// The deciding action, as Defender returned it (every field it listed;
    /// a time that was not RFC 3339 as `null`).
    pub last_action: Option<MachineAction>,
    /// The newest `Pending`/`InProgress` restrict or unrestrict action.
    pub pending_action: Option<MachineAction>,
    /// When this service releases the restriction (`releaseAfter`), UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_at: Option<String>,
}

/// How many machines are in each state (of all machines, not only those shown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub restricted: usize,
    pub released: usize,
    pub unknown: usize,
    /// Machines with a pending action, whatever their state.
    pub pending: usize,
}

/// Every machine that has restrict or unrestrict actions, newest `since` first.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub devices: Vec<Device>,
    pub counts: Counts,
}

impl Fleet {
    /// Derive each machine's state from the tenant's actions, in any order.
    /// Actions of other types, or without a machine id, are ignored. Takes the
    /// actions by value: all but the deciding and pending ones are dropped
    /// as each machine is done (a tenant can have tens of thousands).
    pub fn from_actions(mut actions: Vec<MachineAction>) -> Self {
        actions.retain(|a| {
            a.machine_id.is_some() && a.action_type.known().is_some() && a.status.known().is_some()
        });
        // Each machine's actions together, newest created first: the order
        // the restrict decision sorts by, so that both break ties alike.
        // Grouped in place: no second copy of the tenant's history.
        actions.sort_by_cached_key(|a| (a.machine_id.clone(), std::cmp::Reverse(created(a))));
        let mut devices = Vec::new();
        let mut group: Vec<MachineAction> = Vec::new();
        for action in actions {
            if group
                .last()
                .is_some_and(|last| !same_machine(last, &action))
            {
                devices.extend(device(&mut group));
            }
            group.push(action);
        }
        if !group.is_empty() {
            devices.extend(device(&mut group));
        }
        // Newest `since` first; machines with none last; ties by machine id,
        // so the same tenant always gives the same order.
        devices.sort_by(|a, b| {
            let since = |d: &Device| d.since.map(Timestamp::at);
            since(b)
                .cmp(&since(a))
                .then_with(|| a.machine_id.as_str().cmp(b.machine_id.as_str()))
        });
        let mut counts = Counts::default();
        for d in &devices {
            match d.state {
                DeviceState::Restricted => counts.restricted += 1,
                DeviceState::Released => counts.released += 1,
                DeviceState::Unknown => counts.unknown += 1,
            }
            counts.pending += usize::from(d.pending_action.is_some());
        }
        Self { devices, counts }
    }

    /// The machines `filter` asks for, in the same order.
    pub fn select(self, filter: StateFilter) -> (Vec<Device>, Counts) {
        let devices = self
            .devices
            .into_iter()
            .filter(|d| filter.keeps(d))
            .collect();
        (devices, self.counts)
    }
}

/// Machine ids compare case-insensitively (every action here has one).
fn same_machine(a: &MachineAction, b: &MachineAction) -> bool {
    a.machine_id.is_some() && a.machine_id == b.machine_id
}

/// One machine's entry from its actions (all of one machine, typed, newest
/// created first), which it takes, leaving `actions` empty for the next one.
fn device(actions: &mut Vec<MachineAction>) -> Option<Device> {
    let deciding = deciding_action(actions.iter()).map(|(a, t)| (a.id.clone(), t));
    let pending = actions
        .iter()
        .position(|a| a.status.known().is_some_and(|s| !s.is_terminal()));
    let computer_dns_name = actions.iter().find_map(|a| a.computer_dns_name.clone());
    // Every action here has the machine's id (`from_actions` keeps no other).
    let Some(machine_id) = actions.first().and_then(|a| a.machine_id.clone()) else {
        actions.clear();
        return None;
    };

    let pending_action = pending.map(|at| actions.swap_remove(at));
    let last_action = deciding
        .as_ref()
        .and_then(|(id, _)| actions.iter().position(|a| &a.id == id))
        .map(|at| actions.swap_remove(at));
    actions.clear();
    let state = match deciding {
        Some((_, ActionType::RestrictCodeExecution)) => DeviceState::Restricted,
        Some((_, ActionType::UnrestrictCodeExecution)) => DeviceState::Released,
        None => DeviceState::Unknown,
    };
    // The time `finished` decides by, as Defender wrote it.
    let since = last_action
        .as_ref()
        .and_then(|a| a.last_update_date_time_utc.or(a.creation_date_time_utc));
    Some(Device {
        machine_id,
        computer_dns_name,
        state,
        since,
        release_at: None,
        last_action,
        pending_action,
    })
}

/// The JSON answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer<'a> {
    pub devices: &'a [Device],
    pub count: usize,
    /// The filter applied (`state`).
    pub state: &'static str,
    pub counts: Counts,
    /// When the read of Defender's actions was sent (RFC 3339, UTC).
    pub as_of: String,
}

impl<'a> Answer<'a> {
    /// `as_of` as [`rfc3339`] wrote it.
    pub fn new(devices: &'a [Device], filter: StateFilter, counts: Counts, as_of: String) -> Self {
        Self {
            devices,
            count: devices.len(),
            state: filter.as_str(),
            counts,
            as_of,
        }
    }
}

/// RFC 3339 in UTC; the wall clock always formats.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// One machine restricted by one action carrying these strings, restricted
/// at 10:05: for the renderers' tests.
#[cfg(test)]
pub(crate) fn one_restricted(
    machine_id: &str,
    name: &str,
    requestor: &str,
    comment: &str,
) -> Fleet {
    let action = serde_json::json!({
        "id": "a1", "type": "RestrictCodeExecution", "status": "Succeeded",
        "machineId": machine_id, "computerDnsName": name,
        "requestor": requestor, "requestorComment": comment,
        "creationDateTimeUtc": "2026-11-28T10:00:00Z",
        "lastUpdateDateTimeUtc": "2026-11-28T10:05:00Z",
    });
    Fleet::from_actions(vec![
        serde_json::from_value(action).unwrap_or_else(|e| panic!("{e}")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::decision::{Decision, Wanted, decide};

    const A: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";
    const B: &str = "39a7550d43b78a7757871f5c146184282381ec3d";

    fn action(
        id: &str,
        machine: &str,
        kind: &str,
        status: &str,
        created: u32,
        updated: Option<u32>,
    ) -> MachineAction {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "type": kind,
            "status": status,
            "machineId": machine,
            "requestor": "app",
            "requestorComment": format!("comment {id}"),
            "creationDateTimeUtc": format!("2026-11-28T10:{created:02}:00Z"),
            "lastUpdateDateTimeUtc": updated.map(|m| format!("2026-11-28T10:{m:02}:00.1234567Z")),
            "scope": null,
            "commands": [],
        }))
        .unwrap()
    }

    const R: &str = "RestrictCodeExecution";
    const U: &str = "UnrestrictCodeExecution";

    fn ids(devices: &[Device]) -> Vec<&str> {
        devices.iter().map(|d| d.machine_id.as_str()).collect()
    }

    #[test]
    fn the_action_that_finished_last_decides_and_pending_never_changes_the_state() {
        // A: a restrict created first but finished last (offline device), a
        // release finished before it, and a pending release.
        let actions = vec![
            action("u1", A, U, "Succeeded", 5, Some(6)),
            action("r1", A, R, "Succeeded", 0, Some(30)),
            action("u2", A, U, "Pending", 40, None),
            action("scan", A, "RunAntiVirusScan", "Succeeded", 50, Some(51)),
            // B: released; a failed restrict after it changes nothing.
            action("r2", B, R, "Succeeded", 1, Some(2)),
            action("u3", B, U, "Succeeded", 3, Some(4)),
            action("r3", B, R, "Failed", 10, Some(11)),
        ];
        let fleet = Fleet::from_actions(actions.clone());
        assert_eq!(ids(&fleet.devices), [A, B], "newest since first");
        let a = &fleet.devices[0];
        assert_eq!(a.state, DeviceState::Restricted);
        assert_eq!(
            a.since.map(|t| t.to_string()).as_deref(),
            Some("2026-11-28T10:30:00.1234567Z")
        );
        assert_eq!(a.last_action.as_ref().map(|x| x.id.as_str()), Some("r1"));
        assert_eq!(a.pending_action.as_ref().map(|x| x.id.as_str()), Some("u2"));
        let b = &fleet.devices[1];
        assert_eq!(b.state, DeviceState::Released);
        assert_eq!(b.last_action.as_ref().map(|x| x.id.as_str()), Some("u3"));
        assert!(b.pending_action.is_none());
        assert_eq!(
            fleet.counts,
            Counts {
                restricted: 1,
                released: 1,
                unknown: 0,
                pending: 1
            }
        );

        // The same rule as the restrict decision: restricting A again would
        // find it already restricted by the same action.
        let mine: Vec<MachineAction> = actions
            .iter()
            .filter(|x| x.machine_id.as_deref() == Some(A) && x.status != "Pending")
            .cloned()
            .collect();
        let wanted = Wanted {
            action: ActionType::RestrictCodeExecution,
            force: false,
            cancel_pending: false,
        };
        assert!(matches!(decide(A, &mine, wanted), Decision::AlreadyInState(x) if x.id == "r1"));
    }

    #[test]
    fn no_succeeded_action_is_unknown_and_sorts_last() {
        let fleet = Fleet::from_actions(vec![
            action("r1", A, R, "Pending", 1, None),
            action("u1", A, U, "Cancelled", 0, Some(1)),
            action("r2", B, R, "Succeeded", 1, Some(2)),
        ]);
        assert_eq!(ids(&fleet.devices), [B, A]);
        assert_eq!(fleet.devices[1].state, DeviceState::Unknown);
        assert_eq!(fleet.devices[1].since, None);
        assert!(fleet.devices[1].last_action.is_none());
        let (pending, counts) = fleet.clone().select(StateFilter::Pending);
        assert_eq!(ids(&pending), [A]);
        assert_eq!(counts.unknown, 1);
        assert_eq!(ids(&fleet.clone().select(StateFilter::Restricted).0), [B]);
        assert!(fleet.clone().select(StateFilter::Released).0.is_empty());
        assert_eq!(ids(&fleet.select(StateFilter::All).0), [B, A]);
    }

    #[test]
    fn machine_ids_group_case_insensitively_and_actions_without_one_are_ignored() {
        let mut upper = action("u1", &A.to_uppercase(), U, "Succeeded", 5, Some(6));
        upper.computer_dns_name = Some("DESKTOP-ALPHA".into());
        let mut orphan = action("x", A, R, "Succeeded", 9, Some(59));
        orphan.machine_id = None;
        let fleet = Fleet::from_actions(vec![
            action("r1", A, R, "Succeeded", 0, Some(1)),
            upper,
            orphan,
        ]);
        assert_eq!(fleet.devices.len(), 1);
        assert_eq!(fleet.devices[0].state, DeviceState::Released);
        assert_eq!(
            fleet.devices[0].computer_dns_name.as_deref(),
            Some("DESKTOP-ALPHA")
        );
    }

    #[test]
    fn the_deciding_action_is_returned_as_defender_sent_it() {
        let fleet = Fleet::from_actions(vec![action("r1", A, R, "Succeeded", 0, Some(1))]);
        let json = serde_json::to_value(&fleet.devices[0]).unwrap();
        assert_eq!(json["lastAction"]["scope"], serde_json::Value::Null);
        assert_eq!(json["lastAction"]["commands"], serde_json::json!([]));
        assert_eq!(json["lastAction"]["requestorComment"], "comment r1");
        assert_eq!(json["state"], "restricted");
        assert_eq!(json["pendingAction"], serde_json::Value::Null);
        assert!(json.get("sinceAt").is_none());
    }

    #[test]
    fn the_state_parameter() {
        let q = |v: &[&str]| -> Vec<(String, String)> {
            v.iter()
                .map(|v| ("state".to_owned(), (*v).to_owned()))
                .chain([("code".to_owned(), "key".to_owned())])
                .collect()
        };
        assert_eq!(
            StateFilter::from_query(&q(&[])),
            Ok(StateFilter::Restricted)
        );
        assert_eq!(StateFilter::from_query(&q(&["all"])), Ok(StateFilter::All));
        assert_eq!(
            StateFilter::from_query(&q(&["Pending"])),
            Ok(StateFilter::Pending)
        );
        for bad in [&["restrict"][..], &[""], &["all", "all"], &["isolated"]] {
            let err = StateFilter::from_query(&q(bad)).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("state"), "{bad:?}");
        }
    }
}
