//! The seeded demo tenant (`SimConfig::seed = true`) and its fixed ids.
//!
//! The devices cover the cases the service must get right:
//!
//! 1. `DESKTOP-ALPHA`: the plain case, one Windows 11 record.
//! 2. `LAPTOP-BRAVO`: three records sharing one Entra device id, as after a
//!    re-onboarding: a stale Inactive one, the live one ([`BRAVO_MACHINE_ID`],
//!    the one to act on), and a newer-looking record that was merged into the
//!    live one (`mergedIntoMachineId` set; must be skipped).
//! 3. `WIN11-CHARLIE`: a second plain Windows 11 device.
//! 4. `SRV-LINUX-01`: Linux, so restrict answers `400 OsPlatformNotSupported`.
//! 5. `KIOSK-DELTA`: `isAadJoined: true` but `aadDeviceId: null` (seen in real
//!    responses), so it is only reachable by machine id.
//!
//! Times (`lastSeen`, `firstSeen`) are relative to the simulator's start.

use serde_json::{Map, Value, json};
use time::{Duration, OffsetDateTime};

use super::clock::timestamp;
use crate::defender::{models::Machine, timestamp::Timestamp};

/// `requestor` of every action the simulator creates: with an app identity
/// Defender records the app, as `"<app name> (<tenant>.onmicrosoft.com)"`.
pub const REQUESTOR: &str = "mde-restrict (contoso.onmicrosoft.com)";

/// `client_id` the identity endpoint reports when the request names none.
pub const IDENTITY_CLIENT_ID: &str = "0d5c4a1e-7b3f-4e2a-9c8d-1f6e5a4b3c2d";

pub const ALPHA_NAME: &str = "DESKTOP-ALPHA.contoso.local";
pub const ALPHA_AAD_DEVICE_ID: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";
pub const ALPHA_MACHINE_ID: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";

pub const BRAVO_NAME: &str = "LAPTOP-BRAVO";
pub const BRAVO_AAD_DEVICE_ID: &str = "7b2e9d14-6c3a-4f85-b1d0-2a9c8e7f6d54";
/// The stale record: Inactive, last seen 30 days ago.
pub const BRAVO_STALE_MACHINE_ID: &str = "f88aa45e4ddc96dd48224b015516ce32fea61416";
/// The live record: Active, last seen a day ago. The one to act on.
pub const BRAVO_MACHINE_ID: &str = "39a7550d43b78a7757871f5c146184282381ec3d";
/// A record merged into [`BRAVO_MACHINE_ID`]: Active and seen just now, but
/// `mergedIntoMachineId` is set, so it must be skipped.
pub const BRAVO_MERGED_MACHINE_ID: &str = "afa46e97642135c484467090b4f32bc9a5e9b21e";

pub const CHARLIE_NAME: &str = "WIN11-CHARLIE.contoso.local";
pub const CHARLIE_AAD_DEVICE_ID: &str = "c4d5e6f7-0819-4a2b-8c3d-4e5f60718293";
pub const CHARLIE_MACHINE_ID: &str = "47926ef9a6c81431554277273f9b8e07e2649733";

pub const LINUX_NAME: &str = "SRV-LINUX-01";
pub const LINUX_AAD_DEVICE_ID: &str = "9a8b7c6d-5e4f-4321-8fed-cba987654321";
pub const LINUX_MACHINE_ID: &str = "ac8f82e498ebeac50ade1cfd34f944abd6c662ac";

pub const KIOSK_NAME: &str = "KIOSK-DELTA";
pub const KIOSK_MACHINE_ID: &str = "327e13c6bfe7466bcd0564fd94d1bedf29ac2659";

/// The seeded machines as of `now` (the simulator's start time).
pub fn machines(now: OffsetDateTime) -> Vec<Machine> {
    let ago = |d: Duration| Some(Timestamp::defender_style(now - d));
    vec![
        Machine {
            id: ALPHA_MACHINE_ID.into(),
            computer_dns_name: Some(ALPHA_NAME.to_owned()),
            aad_device_id: Some(ALPHA_AAD_DEVICE_ID.to_owned()),
            health_status: Some("Active".to_owned()),
            last_seen: ago(Duration::hours(2)),
            os_platform: Some("Windows11".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: None,
            is_potential_duplication: Some(false),
            extra: windows_extra(now - Duration::days(210), "22631", "23H2", "10.0.1.21"),
        },
        Machine {
            id: BRAVO_STALE_MACHINE_ID.into(),
            computer_dns_name: Some(BRAVO_NAME.to_owned()),
            aad_device_id: Some(BRAVO_AAD_DEVICE_ID.to_owned()),
            health_status: Some("Inactive".to_owned()),
            last_seen: ago(Duration::days(30)),
            os_platform: Some("Windows10".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: None,
            is_potential_duplication: Some(true),
            extra: windows_extra(now - Duration::days(400), "19045", "22H2", "10.0.2.57"),
        },
        Machine {
            id: BRAVO_MACHINE_ID.into(),
            computer_dns_name: Some(BRAVO_NAME.to_owned()),
            aad_device_id: Some(BRAVO_AAD_DEVICE_ID.to_owned()),
            health_status: Some("Active".to_owned()),
            last_seen: ago(Duration::days(1)),
            os_platform: Some("Windows10".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: None,
            is_potential_duplication: Some(false),
            extra: windows_extra(now - Duration::days(29), "19045", "22H2", "10.0.2.58"),
        },
        Machine {
            id: BRAVO_MERGED_MACHINE_ID.into(),
            computer_dns_name: Some(BRAVO_NAME.to_owned()),
            aad_device_id: Some(BRAVO_AAD_DEVICE_ID.to_owned()),
            health_status: Some("Active".to_owned()),
            last_seen: ago(Duration::ZERO),
            os_platform: Some("Windows10".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: Some(BRAVO_MACHINE_ID.into()),
            is_potential_duplication: Some(false),
            extra: windows_extra(now - Duration::days(3), "19045", "22H2", "10.0.2.58"),
        },
        Machine {
            id: CHARLIE_MACHINE_ID.into(),
            computer_dns_name: Some(CHARLIE_NAME.to_owned()),
            aad_device_id: Some(CHARLIE_AAD_DEVICE_ID.to_owned()),
            health_status: Some("Active".to_owned()),
            last_seen: ago(Duration::hours(5)),
            os_platform: Some("Windows11".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: None,
            is_potential_duplication: Some(false),
            extra: windows_extra(now - Duration::days(90), "26100", "24H2", "10.0.3.14"),
        },
        Machine {
            id: LINUX_MACHINE_ID.into(),
            computer_dns_name: Some(LINUX_NAME.to_owned()),
            aad_device_id: Some(LINUX_AAD_DEVICE_ID.to_owned()),
            health_status: Some("Active".to_owned()),
            last_seen: ago(Duration::hours(1)),
            os_platform: Some("Linux".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: None,
            is_potential_duplication: Some(false),
            extra: extra(
                now - Duration::days(500),
                json!({
                    "osBuild": null,
                    "version": "22.4",
                    "osVersion": "Ubuntu 22.04.4 LTS",
                    "lastIpAddress": "10.0.9.5",
                    "agentVersion": "101.24082.0004",
                    "rbacGroupName": "Servers",
                    "rbacGroupId": 102,
                    "exposureLevel": "Low",
                }),
            ),
        },
        Machine {
            id: KIOSK_MACHINE_ID.into(),
            computer_dns_name: Some(KIOSK_NAME.to_owned()),
            aad_device_id: None,
            health_status: Some("Active".to_owned()),
            last_seen: ago(Duration::hours(7)),
            os_platform: Some("Windows10".to_owned()),
            onboarding_status: Some("Onboarded".to_owned()),
            merged_into_machine_id: None,
            is_potential_duplication: Some(false),
            extra: windows_extra(now - Duration::days(700), "19044", "21H2", "10.0.4.200"),
        },
    ]
}

fn windows_extra(
    first_seen: OffsetDateTime,
    build: &str,
    version: &str,
    ip: &str,
) -> Map<String, Value> {
    extra(
        first_seen,
        json!({
            "osBuild": build.parse::<u64>().ok(),
            "version": version,
            "osVersion": null,
            "lastIpAddress": ip,
            "agentVersion": format!("10.8760.{build}.1011"),
            "rbacGroupName": "Workstations",
            "rbacGroupId": 101,
            "exposureLevel": "Medium",
        }),
    )
}

/// The fields every seeded machine has, overlaid with `specific`.
fn extra(first_seen: OffsetDateTime, specific: Value) -> Map<String, Value> {
    let mut map = Map::new();
    let common = json!({
        "firstSeen": timestamp(first_seen),
        "osProcessor": "x64",
        "osArchitecture": "64-bit",
        "lastExternalIpAddress": "203.0.113.10",
        "riskScore": "Low",
        "deviceValue": "Normal",
        "machineTags": [],
        "ipAddresses": [],
        "isAadJoined": true,
        "defenderAvStatus": "Updated",
        "managedBy": "Intune",
        "managedByStatus": "Success",
        "isExcluded": false,
        "exclusionReason": null,
        "vmMetadata": null,
    });
    for source in [common, specific] {
        if let Value::Object(fields) = source {
            map.extend(fields);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::filter::is_guid;

    #[test]
    fn ids_are_well_formed_and_unique() {
        let machines = machines(OffsetDateTime::now_utc());
        let mut ids: Vec<&str> = machines.iter().map(|m| m.id.as_str()).collect();
        for id in &ids {
            assert_eq!(id.len(), 40, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), machines.len());
        for aad in machines.iter().filter_map(|m| m.aad_device_id.as_deref()) {
            assert!(is_guid(aad), "{aad}");
        }
        assert!(is_guid(IDENTITY_CLIENT_ID));
    }

    #[test]
    fn bravo_has_three_records_one_merged() {
        let machines = machines(OffsetDateTime::now_utc());
        let bravo: Vec<_> = machines
            .iter()
            .filter(|m| m.aad_device_id.as_deref() == Some(BRAVO_AAD_DEVICE_ID))
            .collect();
        assert_eq!(bravo.len(), 3);
        let merged: Vec<_> = bravo
            .iter()
            .filter(|m| m.merged_into_machine_id.is_some())
            .collect();
        assert_eq!(merged.len(), 1);
        assert_eq!(
            merged[0].merged_into_machine_id.as_deref(),
            Some(BRAVO_MACHINE_ID)
        );
        let kiosk = machines
            .iter()
            .find(|m| m.id == KIOSK_MACHINE_ID)
            .expect("kiosk");
        assert_eq!(kiosk.aad_device_id, None);
        assert_eq!(kiosk.extra["isAadJoined"], true);
    }
}
