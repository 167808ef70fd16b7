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
//! 4. `SRV-LINUX-01`: Linux: the service refuses it by its `osPlatform` before
//!    any POST; a restrict that reached the simulator would answer `400
//!    OsPlatformNotSupported`, as Defender does.
//! 5. `KIOSK-DELTA`: `isAadJoined: true` but `aadDeviceId: null` (seen in real
//!    responses), so it is only reachable by machine id.
//!
//! Times (`lastSeen`, `firstSeen`) are relative to the simulator's start.
//!
//! Machine tags and device groups, for selecting devices as a group:
//!
//! | tag or group | records |
//! |---|---|
//! | tag [`OUTBREAK_TAG`] | ALPHA, all three BRAVO records (one stale, one merged), SRV-LINUX-01 |
//! | tag [`QUOTED_TAG`] (a `'` to escape in OData) | CHARLIE |
//! | group [`WORKSTATIONS_GROUP_ID`] `Workstations` | every Windows device |
//! | group [`SERVERS_GROUP_ID`] `Servers` | SRV-LINUX-01 |
//!
//! [`Fleet`] generates many more devices under one tag and group, with stale
//! and merged extra records, for jobs and benchmarks.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use super::clock::timestamp;
use crate::defender::{ids::MachineId, models::Machine, timestamp::Timestamp};

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

/// A tag on ALPHA, the three BRAVO records and SRV-LINUX-01: an outbreak
/// job over it acts on ALPHA and BRAVO's live record, finds Linux
/// unsupported, and must skip BRAVO's stale and merged records.
pub const OUTBREAK_TAG: &str = "outbreak-42";
/// A tag with a single quote, which an OData literal writes as `''`.
pub const QUOTED_TAG: &str = "O'Brien lab";
/// The device group (`rbacGroupId`) of the Windows devices.
pub const WORKSTATIONS_GROUP_ID: i64 = 101;
/// The device group of the Linux server.
pub const SERVERS_GROUP_ID: i64 = 102;

pub const KIOSK_NAME: &str = "KIOSK-DELTA";
pub const KIOSK_MACHINE_ID: &str = "327e13c6bfe7466bcd0564fd94d1bedf29ac2659";

/// The seeded machines as of `now` (the simulator's start time).
pub fn machines(now: OffsetDateTime) -> Vec<Machine> {
    let mut machines = untagged(now);
    for machine in &mut machines {
        let tags: &[&str] = match machine.id.as_str() {
            ALPHA_MACHINE_ID => &[OUTBREAK_TAG, "Finance"],
            BRAVO_STALE_MACHINE_ID
            | BRAVO_MACHINE_ID
            | BRAVO_MERGED_MACHINE_ID
            | LINUX_MACHINE_ID => &[OUTBREAK_TAG],
            CHARLIE_MACHINE_ID => &[QUOTED_TAG],
            _ => &[],
        };
        machine.extra.insert("machineTags".to_owned(), json!(tags));
    }
    machines
}

fn untagged(now: OffsetDateTime) -> Vec<Machine> {
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
                    "rbacGroupId": SERVERS_GROUP_ID,
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
            "rbacGroupId": WORKSTATIONS_GROUP_ID,
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

/// Many generated devices under one tag and one device group, as an
/// outbreak's worth of machines: `devices` Windows 11 devices, each with one
/// live record (Active, seen an hour ago) carrying `tag`; the first
/// `stale_records` of them also have an older Inactive record with the same
/// Entra device id and tag (re-onboarding leaves those behind), and the first
/// `merged_records` a record merged into the live one. Ids are derived from
/// `name` and the device's index, so the same fleet has the same ids in every
/// run and two fleets with different names never share one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fleet {
    /// Distinguishes fleets: ids and computer names derive from it.
    pub name: String,
    /// The `machineTags` value every record carries.
    pub tag: String,
    /// Devices (distinct Entra device ids), each with one live record.
    pub devices: usize,
    #[serde(default)]
    pub stale_records: usize,
    #[serde(default)]
    pub merged_records: usize,
    #[serde(default = "Fleet::default_group_id")]
    pub rbac_group_id: i64,
    #[serde(default = "Fleet::default_group_name")]
    pub rbac_group_name: String,
}

/// One generated device: its Entra id and the records it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetDevice {
    pub aad_device_id: String,
    /// The record to act on.
    pub machine_id: String,
    pub computer_dns_name: String,
    /// The Inactive record left by a re-onboarding, if any.
    pub stale_machine_id: Option<String>,
    /// The record merged into [`Self::machine_id`], if any.
    pub merged_machine_id: Option<String>,
}

impl Fleet {
    /// `devices` devices under `tag`, in group 201 "Outbreak", no extra records.
    pub fn new(name: &str, tag: &str, devices: usize) -> Self {
        Self {
            name: name.to_owned(),
            tag: tag.to_owned(),
            devices,
            stale_records: 0,
            merged_records: 0,
            rbac_group_id: Self::default_group_id(),
            rbac_group_name: Self::default_group_name(),
        }
    }

    fn default_group_id() -> i64 {
        201
    }

    fn default_group_name() -> String {
        "Outbreak".to_owned()
    }

    /// Every device's ids, in index order.
    pub fn devices(&self) -> Vec<FleetDevice> {
        (0..self.devices)
            .map(|i| FleetDevice {
                aad_device_id: self.guid(i),
                machine_id: self.machine_id(i, "live"),
                computer_dns_name: format!("{}-{i:05}.contoso.local", self.name.to_uppercase()),
                stale_machine_id: (i < self.stale_records).then(|| self.machine_id(i, "stale")),
                merged_machine_id: (i < self.merged_records).then(|| self.machine_id(i, "merged")),
            })
            .collect()
    }

    /// Every record (live, then stale, then merged per device) as of `now`.
    pub fn machines(&self, now: OffsetDateTime) -> Vec<Machine> {
        let mut out = Vec::with_capacity(self.devices + self.stale_records + self.merged_records);
        for (i, device) in self.devices().into_iter().enumerate() {
            let octet = |n: usize| n % 250 + 1;
            let ip = format!(
                "10.{}.{}.{}",
                20 + i / 62_500 % 200,
                octet(i / 250),
                octet(i)
            );
            let record = |id: &str, health: &str, seen: Duration, merged: Option<&str>| Machine {
                id: id.into(),
                computer_dns_name: Some(device.computer_dns_name.clone()),
                aad_device_id: Some(device.aad_device_id.clone()),
                health_status: Some(health.to_owned()),
                last_seen: Some(Timestamp::defender_style(now - seen)),
                os_platform: Some("Windows11".to_owned()),
                onboarding_status: Some("Onboarded".to_owned()),
                merged_into_machine_id: merged.map(MachineId::from),
                is_potential_duplication: Some(health == "Inactive"),
                extra: {
                    let mut extra = windows_extra(now - Duration::days(120), "26100", "24H2", &ip);
                    extra.insert("machineTags".to_owned(), json!([self.tag]));
                    extra.insert("rbacGroupId".to_owned(), json!(self.rbac_group_id));
                    extra.insert("rbacGroupName".to_owned(), json!(self.rbac_group_name));
                    extra
                },
            };
            out.push(record(
                &device.machine_id,
                "Active",
                Duration::hours(1),
                None,
            ));
            if let Some(stale) = &device.stale_machine_id {
                out.push(record(stale, "Inactive", Duration::days(40), None));
            }
            if let Some(merged) = &device.merged_machine_id {
                out.push(record(
                    merged,
                    "Active",
                    Duration::minutes(5),
                    Some(&device.machine_id),
                ));
            }
        }
        out
    }

    /// A 40-hex machine id.
    fn machine_id(&self, i: usize, kind: &str) -> String {
        let digest = Sha256::digest(format!("fleet:{}:{i}:{kind}", self.name));
        let mut hex = String::with_capacity(40);
        for b in &digest[..20] {
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }

    /// A version-4-shaped GUID for the device's Entra id.
    fn guid(&self, i: usize) -> String {
        let digest = Sha256::digest(format!("fleet:{}:{i}:aad", self.name));
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }
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
    fn a_fleet_has_stable_distinct_ids_and_its_extra_records() {
        let now = OffsetDateTime::now_utc();
        let fleet = Fleet {
            stale_records: 3,
            merged_records: 2,
            ..Fleet::new("f1", "outbreak-7", 10)
        };
        let machines = fleet.machines(now);
        assert_eq!(machines.len(), 15);
        let mut ids: Vec<&str> = machines.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 15);
        assert_eq!(fleet.devices(), fleet.devices(), "stable");
        let other = Fleet::new("f2", "outbreak-7", 10).devices();
        assert!(fleet.devices().iter().all(|d| {
            other
                .iter()
                .all(|o| o.machine_id != d.machine_id && o.aad_device_id != d.aad_device_id)
        }));
        for m in &machines {
            assert!(is_guid(m.aad_device_id.as_deref().unwrap_or("")));
            assert_eq!(m.extra["machineTags"], json!(["outbreak-7"]));
            assert_eq!(m.extra["rbacGroupId"], 201);
        }
        let first = &fleet.devices()[0];
        let records: Vec<&Machine> = machines
            .iter()
            .filter(|m| m.aad_device_id.as_deref() == Some(first.aad_device_id.as_str()))
            .collect();
        assert_eq!(records.len(), 3);
        let stale = records
            .iter()
            .find(|m| first.stale_machine_id.as_deref() == Some(&*m.id));
        assert_eq!(
            stale.and_then(|m| m.health_status.as_deref()),
            Some("Inactive")
        );
        let merged = records
            .iter()
            .find(|m| first.merged_machine_id.as_deref() == Some(&*m.id));
        assert_eq!(
            merged.and_then(|m| m.merged_into_machine_id.as_deref()),
            Some(first.machine_id.as_str())
        );
        assert!(fleet.devices()[9].stale_machine_id.is_none());
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
