//! A job's devices, decided once when it starts: the listed ids as given,
//! or every machine of a tag or device group, with one record per device
//! chosen as for a single request.

use std::collections::BTreeMap;

use tokio::time::Instant;
use uuid::Uuid;

use super::{
    model::DeviceEntry,
    request::{MAX_JOB_DEVICES, Selector, odata_string},
};
use crate::{
    defender::{DefenderClient, DefenderError, ids::MachineId, models::Machine},
    service::selection,
};

/// Why a selector gave no job.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{selector} matched no Defender machine")]
    NoDevicesMatched { selector: String },
    #[error("{selector} matched {count} devices; a job takes at most {MAX_JOB_DEVICES}")]
    TooManyDevices { selector: String, count: usize },
    #[error(transparent)]
    Defender(#[from] DefenderError),
}

/// The selector as a caller reads it in an error.
pub fn describe(selector: &Selector) -> String {
    match selector {
        Selector::DeviceIds(ids) => format!("deviceIds ({} ids)", ids.len()),
        Selector::MachineTag(tag) => format!("machineTag {tag:?}"),
        Selector::DeviceGroup(id) => format!("deviceGroupId {id}"),
    }
}

/// The OData filter that lists a tag's or a group's machines.
pub fn filter(selector: &Selector) -> Option<String> {
    match selector {
        Selector::DeviceIds(_) => None,
        Selector::MachineTag(tag) => Some(format!(
            "machineTags/any(tag: tag eq {})",
            odata_string(tag)
        )),
        Selector::DeviceGroup(id) => Some(format!("rbacGroupId eq {id}")),
    }
}

/// The job's devices, in a stable order.
pub async fn devices(
    client: &DefenderClient,
    selector: &Selector,
    deadline: Instant,
) -> Result<Vec<DeviceEntry>, ResolveError> {
    let Some(filter) = filter(selector) else {
        let Selector::DeviceIds(ids) = selector else {
            return Ok(Vec::new());
        };
        return Ok(ids
            .iter()
            .map(|id| DeviceEntry {
                device_id: id.to_string(),
                machine_id: None,
                computer_dns_name: None,
            })
            .collect());
    };
    let machines = client.machines_matching(&filter, deadline).await?;
    let devices = choose(machines);
    match devices.len() {
        0 => Err(ResolveError::NoDevicesMatched {
            selector: describe(selector),
        }),
        n if n > MAX_JOB_DEVICES => Err(ResolveError::TooManyDevices {
            selector: describe(selector),
            count: n,
        }),
        _ => Ok(devices),
    }
}

/// One record per device: records merged into another are skipped, and the
/// records of one Entra device id count once, chosen by the same rule as a
/// single request's ([`selection::choose`]), so no POST goes to a stale record
/// that re-onboarding left under the same tag.
pub fn choose(machines: Vec<Machine>) -> Vec<DeviceEntry> {
    let mut by_device: BTreeMap<Uuid, Vec<Machine>> = BTreeMap::new();
    let mut alone: BTreeMap<MachineId, Machine> = BTreeMap::new();
    for machine in machines {
        let merged = machine
            .merged_into_machine_id
            .as_deref()
            .is_some_and(|m| !m.trim().is_empty());
        if merged {
            continue;
        }
        match machine
            .aad_device_id
            .as_deref()
            .and_then(|id| Uuid::try_parse(id.trim()).ok())
            .filter(|id| !id.is_nil())
        {
            Some(aad) => by_device.entry(aad).or_default().push(machine),
            None => {
                alone.insert(MachineId::from(machine.id.as_str()), machine);
            }
        }
    }
    let mut devices: Vec<DeviceEntry> = by_device
        .into_iter()
        .filter_map(|(aad, records)| {
            let choice = selection::choose(aad, records).ok()?;
            Some(DeviceEntry {
                device_id: aad.hyphenated().to_string(),
                machine_id: Some(choice.machine.id.to_string()),
                computer_dns_name: choice.machine.computer_dns_name,
            })
        })
        .collect();
    devices.extend(alone.into_values().map(|machine| DeviceEntry {
        device_id: machine.id.to_ascii_lowercase(),
        machine_id: Some(machine.id.to_string()),
        computer_dns_name: machine.computer_dns_name,
    }));
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(
        id: &str,
        aad: Option<&str>,
        health: &str,
        seen: &str,
        merged: Option<&str>,
    ) -> Machine {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "aadDeviceId": aad,
            "healthStatus": health,
            "lastSeen": seen,
            "mergedIntoMachineId": merged,
        }))
        .unwrap()
    }

    #[test]
    fn stale_and_merged_records_of_one_device_count_once() {
        let aad = "11111111-1111-4111-8111-111111111111";
        let devices = choose(vec![
            machine(
                &"a".repeat(40),
                Some(aad),
                "Inactive",
                "2026-01-01T00:00:00Z",
                None,
            ),
            machine(
                &"b".repeat(40),
                Some(aad),
                "Active",
                "2026-11-01T00:00:00Z",
                None,
            ),
            machine(
                &"c".repeat(40),
                Some(aad),
                "Active",
                "2026-12-01T00:00:00Z",
                Some(&"b".repeat(40)),
            ),
            machine(
                &"d".repeat(40),
                None,
                "Active",
                "2026-12-01T00:00:00Z",
                None,
            ),
        ]);
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].device_id, aad);
        assert_eq!(
            devices[0].machine_id.as_deref(),
            Some("b".repeat(40).as_str())
        );
        assert_eq!(
            devices[1].machine_id.as_deref(),
            Some("d".repeat(40).as_str())
        );
    }

    #[test]
    fn filters_are_the_documented_odata() {
        assert_eq!(
            filter(&Selector::MachineTag("Bob's PC".into())).unwrap(),
            "machineTags/any(tag: tag eq 'Bob''s PC')"
        );
        assert_eq!(
            filter(&Selector::DeviceGroup(7)).unwrap(),
            "rbacGroupId eq 7"
        );
    }
}
