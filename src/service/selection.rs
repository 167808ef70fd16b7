//! Choosing one machine record when several share an Entra device id.
//!
//! Re-onboarding and reimaging leave several Defender records for one device.
//! The rule, also in the README, is deterministic:
//! 1. keep only records whose `aadDeviceId` really is the requested one (never
//!    trust the server-side filter with the choice of device);
//! 2. skip records merged into another (`mergedIntoMachineId` set);
//! 3. prefer `healthStatus` Active;
//! 4. then the newest `lastSeen`;
//! 5. then the smallest machine id, so equal records always give one answer.

use std::cmp::Ordering;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::defender::{ids::MachineId, models::Machine, timestamp::Timestamp};

/// The chosen record and how many records matched the device.
#[derive(Debug, Clone)]
pub struct Choice {
    pub machine: Machine,
    pub candidates: usize,
}

/// Why no record could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoChoice {
    /// Defender returned no record for the device.
    NoRecords,
    /// Every record was merged into another machine.
    AllMerged { merged_into: Vec<MachineId> },
}

pub fn choose(aad_device_id: Uuid, records: Vec<Machine>) -> Result<Choice, NoChoice> {
    let matching: Vec<Machine> = records
        .into_iter()
        .filter(|m| {
            m.aad_device_id
                .as_deref()
                .and_then(|id| Uuid::try_parse(id.trim()).ok())
                == Some(aad_device_id)
        })
        .collect();
    let candidates = matching.len();
    if candidates == 0 {
        return Err(NoChoice::NoRecords);
    }

    let (merged, live): (Vec<Machine>, Vec<Machine>) = matching.into_iter().partition(|m| {
        m.merged_into_machine_id
            .as_ref()
            .is_some_and(|id| !id.as_str().trim().is_empty())
    });
    let best = live.into_iter().min_by(preference);
    match best {
        Some(machine) => Ok(Choice {
            machine,
            candidates,
        }),
        None => Err(NoChoice::AllMerged {
            merged_into: merged
                .into_iter()
                .filter_map(|m| m.merged_into_machine_id)
                .collect(),
        }),
    }
}

/// Orders the better record first.
fn preference(a: &Machine, b: &Machine) -> Ordering {
    let active = |m: &Machine| m.health_status.as_deref() == Some("Active");
    active(b)
        .cmp(&active(a))
        .then_with(|| last_seen(b).cmp(&last_seen(a)))
        .then_with(|| a.id.cmp(&b.id))
}

/// Unknown `lastSeen` (absent, or not RFC 3339) sorts as the oldest.
fn last_seen(m: &Machine) -> Option<OffsetDateTime> {
    m.last_seen.map(Timestamp::at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: Uuid = uuid::uuid!("7b2e9d14-6c3a-4f85-b1d0-2a9c8e7f6d54");

    fn machine(id: &str, health: &str, last_seen: Option<&str>, merged: Option<&str>) -> Machine {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "aadDeviceId": AAD.to_string().to_uppercase(),
            "healthStatus": health,
            "lastSeen": last_seen,
            "mergedIntoMachineId": merged,
        }))
        .unwrap()
    }

    #[test]
    fn active_beats_a_newer_inactive_record_and_merged_records_are_skipped() {
        let records = vec![
            machine("a", "Inactive", Some("2026-11-27T10:00:00Z"), None),
            machine("b", "Active", Some("2026-11-20T10:00:00Z"), None),
            machine("c", "Active", Some("2026-11-28T10:00:00Z"), Some("b")),
        ];
        let choice = choose(AAD, records).unwrap();
        assert_eq!(choice.machine.id, "b");
        assert_eq!(choice.candidates, 3);
    }

    #[test]
    fn newest_last_seen_wins_then_smallest_id() {
        let records = vec![
            machine("b", "Active", Some("2026-11-20T10:00:00Z"), None),
            machine("c", "Active", Some("2026-11-21T10:00:00.1234567Z"), None),
            machine("a", "Active", None, None),
        ];
        assert_eq!(choose(AAD, records).unwrap().machine.id, "c");
        let tie = vec![
            machine("d", "Active", None, None),
            machine("a", "Active", None, None),
        ];
        assert_eq!(choose(AAD, tie).unwrap().machine.id, "a");
    }

    #[test]
    fn records_of_another_device_are_never_chosen() {
        let mut other = machine("x", "Active", None, None);
        other.aad_device_id = Some("c4d5e6f7-0819-4a2b-8c3d-4e5f60718293".into());
        assert_eq!(choose(AAD, vec![other]).unwrap_err(), NoChoice::NoRecords);
    }

    #[test]
    fn all_merged_is_reported() {
        let err = choose(AAD, vec![machine("a", "Active", None, Some("z"))]).unwrap_err();
        assert_eq!(
            err,
            NoChoice::AllMerged {
                merged_into: vec!["z".into()]
            }
        );
    }
}
