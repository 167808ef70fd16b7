//! What a job keeps, and the messages it sends: the names and shapes of its
//! records, and the queue message's JSON.
//!
//! A job is several small records, never one document rewritten per device:
//! - `jobs/<id>/job`: who, when, the selector and options, the device count,
//!   and `cancelledAt` once cancelled (the one rewrite, by a cancel);
//! - `jobs/<id>/devices`: the devices, as resolved when the job started;
//! - `jobs/<id>/o/<index>`: one device's outcome, written only if absent,
//!   so the first real outcome stands when a message runs twice; its
//!   metadata carries the outcome, so a status is one listing;
//! - `jobs/<id>/a/<index>`: the problem of a device's last failed attempt
//!   (overwritten), which the poison function records;
//! - `jobs/<id>/progress`: when messages were last sent, and until when
//!   they wait for a budget slot (repair compares these with now);
//! - `index/<inverted time>-<id>`: newest first, for the job list;
//! - `idempotency/<sha-256 of the key>`: the job an `Idempotency-Key` started.

use std::collections::HashMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The outcomes a device can end with, besides `queued`.
pub const OUTCOMES: &[&str] = &[
    "requested",
    "already_pending",
    "already_in_state",
    "failed",
    "skipped",
];

/// How a job's devices were chosen, as recorded and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SelectorRecord {
    /// How many ids were listed.
    DeviceIds(usize),
    MachineTag(String),
    DeviceGroupId(u64),
}

/// `jobs/<id>/job`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    pub job_id: String,
    pub created_at: String,
    pub release: bool,
    pub selector: SelectorRecord,
    pub comment: String,
    pub caller_name: Option<String>,
    pub force: bool,
    pub devices: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<String>,
    /// `releaseAfter` counted from the start: when each restriction the
    /// job creates is released (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_at: Option<String>,
    /// `dryRun`: each device is looked up and read, nothing is sent; its
    /// outcome is what would have been done (`would_request`, `already_*`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// One entry of `jobs/<id>/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceEntry {
    /// As given (`deviceIds`), or the record's Entra device id (its machine
    /// id when it has none) for a tag or group.
    pub device_id: String,
    /// The record chosen when the job started (tag or group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_dns_name: Option<String>,
}

/// A device's problem: the code and detail of the answer a single request
/// would have had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProblem {
    pub code: String,
    pub detail: String,
}

/// `jobs/<id>/o/<index>`'s content (kept in its metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeRecord {
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_dns_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<DeviceProblem>,
    /// Unix milliseconds.
    pub at: i64,
}

/// `index/...`'s content (kept in its metadata).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexEntry {
    pub job_id: String,
    pub created_at: String,
    pub release: bool,
    pub selector: SelectorRecord,
    pub devices: usize,
    pub caller_name: Option<String>,
}

/// A queue message: a job and a few of its devices. Its keys are not among
/// the names the host puts in an invocation's metadata (`Id`,
/// `DequeueCount`, `PopReceipt`, `ExpirationTime`, `InsertionTime`,
/// `NextVisibleTime`, `sys`): the host copies a JSON message's top-level
/// properties into the metadata, over its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMessage {
    pub job: String,
    pub devices: Vec<MessageDevice>,
}

/// One device of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageDevice {
    /// Its index in the job's device list.
    pub i: usize,
    /// The device id to act on.
    pub d: String,
    /// The machine record chosen at the start, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<String>,
}

/// Devices per message. A message's devices run one after another within
/// one invocation; ten keep the queue's operations per device low while an
/// invocation stays short, and the JSON far below the queue's limit (64 KiB
/// once base64-encoded, so about 48 KiB of text).
pub const DEVICES_PER_MESSAGE: usize = 10;
/// The most JSON text a message may have: 64 KiB of base64 holds 48 KiB.
pub const MAX_MESSAGE_TEXT: usize = 48 * 1024;

pub fn job_name(job: &str) -> String {
    format!("jobs/{job}/job")
}
pub fn devices_name(job: &str) -> String {
    format!("jobs/{job}/devices")
}
pub fn outcome_prefix(job: &str) -> String {
    format!("jobs/{job}/o/")
}
pub fn outcome_name(job: &str, index: usize) -> String {
    format!("jobs/{job}/o/{index:05}")
}
pub fn attempt_name(job: &str, index: usize) -> String {
    format!("jobs/{job}/a/{index:05}")
}
pub fn progress_name(job: &str) -> String {
    format!("jobs/{job}/progress")
}
pub const INDEX_PREFIX: &str = "index/";
/// Newest first in name order: the time counts down.
pub fn index_name(created_unix_ms: i64, job: &str) -> String {
    let inverted = 9_999_999_999_999_i64.saturating_sub(created_unix_ms).max(0);
    format!("{INDEX_PREFIX}{inverted:013}-{job}")
}
pub fn idempotency_name(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("idempotency/{hex}")
}

/// The metadata key holding a record's JSON (base64url: metadata is ASCII).
pub const RECORD_KEY: &str = "record";

/// A value as metadata: `{"record": base64url(JSON)}` plus `extra`.
pub fn to_metadata<T: Serialize>(value: &T, extra: &[(&str, String)]) -> HashMap<String, String> {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut metadata: HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    metadata.insert(
        RECORD_KEY.to_owned(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json),
    );
    metadata
}

/// The value [`to_metadata`] stored, if it can be read.
pub fn from_metadata<T: DeserializeOwned>(metadata: &HashMap<String, String>) -> Option<T> {
    // Storage may return metadata names in another case.
    let value = metadata
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(RECORD_KEY))
        .map(|(_, v)| v)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

/// The index a device record's name ends with.
pub fn index_of(name: &str) -> Option<usize> {
    name.rsplit('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's metadata names, which a message's own keys would overwrite.
    const HOST_METADATA: &[&str] = &[
        "Id",
        "DequeueCount",
        "PopReceipt",
        "ExpirationTime",
        "InsertionTime",
        "NextVisibleTime",
        "QueueTrigger",
        "sys",
        "RetryContext",
    ];

    #[test]
    fn a_full_message_stays_under_the_queue_limit_and_clear_of_host_metadata() {
        let message = JobMessage {
            job: uuid::Uuid::new_v4().to_string(),
            devices: (0..DEVICES_PER_MESSAGE)
                .map(|i| MessageDevice {
                    i: 9_999 - i,
                    d: format!("{i:040x}"),
                    m: Some(format!("{i:040x}")),
                })
                .collect(),
        };
        let text = serde_json::to_string(&message).unwrap();
        assert!(text.len() <= MAX_MESSAGE_TEXT, "{}", text.len());
        let base64 = base64::engine::general_purpose::STANDARD.encode(&text);
        assert!(base64.len() <= 64 * 1024);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in json.as_object().unwrap().keys() {
            assert!(
                !HOST_METADATA.iter().any(|h| h.eq_ignore_ascii_case(key)),
                "{key} clashes with the host's metadata"
            );
        }
    }

    #[test]
    fn index_names_sort_newest_first() {
        assert!(index_name(2_000, "b") < index_name(1_000, "a"));
    }

    #[test]
    fn records_survive_metadata() {
        let record = OutcomeRecord {
            outcome: "failed".into(),
            machine_id: None,
            computer_dns_name: Some("PC-ü".into()),
            action_id: None,
            problem: Some(DeviceProblem {
                code: "device_not_found".into(),
                detail: "none \"here\"".into(),
            }),
            at: 1,
        };
        let metadata = to_metadata(&record, &[("outcome", "failed".into())]);
        assert!(metadata.values().all(|v| v.is_ascii()));
        assert_eq!(from_metadata::<OutcomeRecord>(&metadata), Some(record));
    }
}
