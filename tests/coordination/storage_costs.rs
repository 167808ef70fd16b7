//! Storage operations per invocation, counted by the proxy in front of
//! Azurite (every request storage received, by kind): the numbers behind the
//! cost estimate in docs/cost.md. Each bound here is the measured count, so a
//! change that adds requests to the common path fails until the estimate is
//! updated.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use restrict_code_execution::simulator::SimConfig;
use serde_json::json;

use super::{
    azurite::Azurite,
    instances::{Instance, posts, tenant, turn},
    storage_proxy::{Seen, StorageProxy},
};

fn by_kind(seen: &[Seen]) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    for s in seen {
        *kinds.entry(s.kind).or_default() += 1;
    }
    kinds
}

fn show(what: &str, seen: &[Seen]) -> usize {
    eprintln!(
        "storage operations, {what}: {} {:?}",
        seen.len(),
        by_kind(seen)
    );
    let paths: Vec<_> = seen
        .iter()
        .map(|s| format!("{} {}", s.kind, s.path))
        .collect();
    eprintln!("  {paths:?}");
    seen.len()
}

/// A round releases its lease in the background once it answered: let it
/// land before counting.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_operations_per_restrict_as_storage_counts_them() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let (sim, devices) = tenant(3, SimConfig::default()).await;
    let handler = Instance::start(&sim, &proxy.connection_string(azurite), "costs-one", &[]);

    // The first invocation of all creates the container and the budget blobs.
    let (status, body, _) = handler.post(json!({"deviceId": devices[0]})).await;
    assert_eq!(status, 201, "{body}");
    settle().await;
    let first = show("first restrict of all", &proxy.seen());

    proxy.clear_seen();
    let (status, body, _) = handler.post(json!({"deviceId": devices[1]})).await;
    assert_eq!(status, 201, "{body}");
    settle().await;
    let fresh = show(
        "restrict of a device seen for the first time",
        &proxy.seen(),
    );

    proxy.clear_seen();
    let (status, body, _) = handler.post(json!({"deviceId": devices[1]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "already_pending", "{body}");
    settle().await;
    let again = show("the same restrict again (already pending)", &proxy.seen());

    assert_eq!(posts(&sim).len(), 2);
    assert!(first <= 14, "{first}");
    assert!(fresh <= 13, "{fresh}");
    assert!(again <= 4, "{again}");
}

/// An outbreak in miniature: 15 devices, each asked for on one of three
/// instances at once, with a budget small enough (sped up) that most calls
/// wait for their slot, as in a real outbreak of thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_operations_per_restrict_in_an_outbreak() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let (sim, devices) = tenant(15, SimConfig::default()).await;
    let storage = proxy.connection_string(azurite);
    let limits = [
        ("DEFENDER_RATE_LIMIT_PER_MINUTE", "20"),
        ("DEFENDER_RATE_CLOCK_SPEED", "10"),
    ];
    let instances: Vec<_> = (0..3)
        .map(|_| Instance::start(&sim, &storage, "costs-outbreak", &limits))
        .collect();

    let answers = join_all(
        devices
            .iter()
            .enumerate()
            .map(|(i, device)| instances[i % 3].post(json!({"deviceId": device}))),
    )
    .await;

    for (status, body, _) in &answers {
        assert_eq!(*status, 201, "{body}");
    }
    assert_eq!(posts(&sim).len(), 15);
    settle().await;
    let total = show(
        "15 restricts over three instances, budget-bound",
        &proxy.seen(),
    );
    eprintln!("per invocation: {:.1}", total as f64 / 15.0);
    assert!(total <= 15 * 16, "{total}");
}
