//! What real Azure Storage answers and Azurite does not: throttling (503),
//! a metadata write refused because the lease is gone (412), an acquire
//! refused although the lease looks free (409 after an expiry). Through the
//! fault-injecting proxy ([`StorageProxy`]) between the code and Azurite.

use std::time::Duration;

use restrict_code_execution::{
    coordination::CoordinationError,
    defender::Endpoint,
    simulator::{Fault, FaultKind, SimConfig},
};
use serde_json::json;
use tokio::time::Instant;

use super::{
    azurite::Azurite,
    instance,
    instances::{Instance, posts, tenant, turn},
    storage_proxy::{Rule, StorageProxy},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_lease_conditioned_write_marks_the_lease_lost() {
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let a = instance(&proxy.settings(azurite, "faults-lost"), Default::default());
    let lease = a
        .lock_machine("m-lost", Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    lease.confirm().await.unwrap();

    // Storage says the lease is not ours any more (it expired and another
    // instance took it, say); our clock still says it is.
    proxy.inject(Rule::new(
        "set_metadata",
        "locks/m-lost",
        412,
        "LeaseIdMismatchWithBlobOperation",
    ));
    assert!(lease.confirm().await.is_err());
    assert!(
        lease.check().is_err(),
        "a lease storage refused a lease-conditioned write for is lost, whatever the clock says"
    );
    // Nothing more is sent under it.
    let before = proxy.count("set_metadata", "locks/m-lost");
    assert!(lease.confirm().await.is_err());
    assert_eq!(proxy.count("set_metadata", "locks/m-lost"), before);
}

/// The first POST is answered 429; before it is sent again, storage refuses
/// the lease-conditioned write (the lease was lost meanwhile): the retry must
/// not go out on the strength of our own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_post_is_not_sent_once_storage_refuses_the_lease() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    sim.inject(
        Fault::new(
            "restrictCodeExecution",
            FaultKind::Status {
                status: 429,
                retry_after: Some(1),
                body: None,
            },
        )
        .method("POST"),
    );
    // The write before the first POST passes; the one before the retry is refused.
    proxy.inject(
        Rule::new(
            "set_metadata",
            "locks/",
            412,
            "LeaseIdMismatchWithBlobOperation",
        )
        .after(1),
    );
    let handler = Instance::start(&sim, &proxy.connection_string(azurite), "faults-retry", &[]);

    let (status, body, _) = handler.post(json!({"deviceId": devices[0]})).await;

    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "coordination_unavailable", "{body}");
    assert_eq!(
        posts(&sim).len(),
        1,
        "only the POST answered 429 reached Defender: {:?}",
        posts(&sim)
    );
    assert!(sim.actions().is_empty());
    let metadata: Vec<u16> = proxy
        .seen()
        .iter()
        .filter(|s| s.kind == "set_metadata")
        .map(|s| s.status)
        .collect();
    assert_eq!(
        metadata,
        [200, 412],
        "one lease-conditioned write before each attempt"
    );
}

/// The same for a cancel: a release with `cancelPending` cancels the pending
/// restrict first; the cancel is answered 429, and storage refuses the
/// lease-conditioned write before its retry: the retry is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_cancel_is_not_sent_once_storage_refuses_the_lease() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let handler = Instance::start(
        &sim,
        &proxy.connection_string(azurite),
        "faults-cancel",
        &[],
    );
    let (status, body, _) = handler.post(json!({"deviceId": devices[0]})).await;
    assert_eq!(status, 201, "{body}");
    // Past the clock-skew allowance: the restrict is older than the release.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sim.inject(
        Fault::new(
            "/cancel",
            FaultKind::Status {
                status: 429,
                retry_after: Some(1),
                body: None,
            },
        )
        .method("POST"),
    );
    proxy.clear_seen();
    proxy.inject(
        Rule::new(
            "set_metadata",
            "locks/",
            412,
            "LeaseIdMismatchWithBlobOperation",
        )
        .after(1),
    );

    let (status, body, _) = handler
        .post(json!({"deviceId": devices[0], "release": true, "cancelPending": true}))
        .await;

    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "coordination_unavailable", "{body}");
    let cancels: Vec<_> = posts(&sim)
        .into_iter()
        .filter(|r| r.path.ends_with("/cancel"))
        .collect();
    assert_eq!(
        cancels.len(),
        1,
        "only the cancel answered 429: {cancels:?}"
    );
    assert!(
        !posts(&sim)
            .iter()
            .any(|r| r.path.contains("unrestrictCodeExecution")),
        "no release was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_look_at_the_lease_does_not_fail_the_waiting_round() {
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let holder = instance(&azurite.settings("faults-busy"), Default::default());
    let waiter = instance(&proxy.settings(azurite, "faults-busy"), Default::default());
    let held = holder
        .lock_machine("m-busy", Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    proxy.inject(Rule::new("get_properties", "locks/m-busy", 503, "ServerBusy").times(3));

    let waiting = tokio::spawn(async move {
        waiter
            .lock_machine("m-busy", Instant::now() + Duration::from_secs(20))
            .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    held.release().await.unwrap();

    let got = waiting.await.unwrap();
    assert!(got.is_ok(), "the waiter failed on a busy storage: {got:?}");
    let answered: Vec<u16> = proxy
        .seen()
        .iter()
        .filter(|s| s.kind == "get_properties")
        .map(|s| s.status)
        .collect();
    assert_eq!(&answered[..3], [503, 503, 503], "{answered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_or_failing_budget_blob_is_tried_again_within_the_deadline() {
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let c = instance(
        &proxy.settings(azurite, "faults-budget"),
        Default::default(),
    );
    let deadline = || Instant::now() + Duration::from_secs(10);
    c.reserve(Endpoint::Restrict, deadline()).await.unwrap();

    proxy.inject(Rule::new("read", "budget/", 503, "ServerBusy").times(2));
    proxy.inject(Rule::new("write", "budget/", 500, "InternalError"));
    let reserved = c.reserve(Endpoint::Restrict, deadline()).await;

    assert!(reserved.is_ok(), "{reserved:?}");
    let statuses: Vec<(&str, u16)> = proxy
        .seen()
        .iter()
        .filter(|s| s.path.contains("budget/"))
        .map(|s| (s.kind, s.status))
        .skip(2)
        .collect();
    // The write that failed with 500 may have landed: it is sent again
    // under the same condition, and a repeat that had landed is refused (412),
    // which reads again. Here it had not.
    assert_eq!(
        statuses,
        [
            ("read", 503),
            ("read", 503),
            ("read", 206),
            ("write", 500),
            ("write", 201)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_conflicts_back_off_exponentially_until_the_deadline() {
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let c = instance(
        &proxy.settings(azurite, "faults-conflict"),
        Default::default(),
    );
    // Another instance wins every write, for longer than the caller waits.
    proxy.inject(Rule::new("write", "budget/", 412, "ConditionNotMet").times(10_000));

    let err = c
        .reserve(Endpoint::Restrict, Instant::now() + Duration::from_secs(3))
        .await
        .unwrap_err();

    assert!(
        matches!(err, CoordinationError::OverBudget { .. }),
        "{err:?}"
    );
    // 20 ms doubling to 1 s (±50 %) fits at most eleven tries in 3 s; a
    // flat pause of 5-25 ms fits dozens, each a read and a write.
    let writes = proxy.count("write", "budget/");
    assert!(
        (3..=13).contains(&writes),
        "{writes} conditional writes in 3 s"
    );
}

/// After a lease expires, Azure can keep refusing to grant it (409
/// `LeaseAlreadyPresent`) for up to a minute while a look at the blob says
/// it is free. The waiter must keep backing off, not start again from 0.1 s
/// after every look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_refused_while_the_lease_looks_free_keeps_backing_off() {
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let c = instance(
        &proxy.settings(azurite, "faults-sticky"),
        Default::default(),
    );
    c.lock_machine("m-sticky", Instant::now() + Duration::from_secs(5))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    proxy.clear_seen();
    proxy.inject(
        Rule::new(
            "acquire_lease",
            "locks/m-sticky",
            409,
            "LeaseAlreadyPresent",
        )
        .times(10_000),
    );

    let err = c
        .lock_machine("m-sticky", Instant::now() + Duration::from_secs(4))
        .await
        .unwrap_err();

    assert!(
        matches!(err, CoordinationError::LockTimeout { .. }),
        "{err:?}"
    );
    let (acquires, looks) = (
        proxy.count("acquire_lease", "locks/m-sticky"),
        proxy.count("get_properties", "locks/m-sticky"),
    );
    // 0.1 s doubling to 2 s (±50 %): about six tries in 4 s. Starting over
    // after each look makes one every 0.1 s or so.
    assert!(
        acquires <= 9 && looks <= 9,
        "{acquires} acquires and {looks} looks in 4 s"
    );

    proxy.clear_rules();
    c.lock_machine("m-sticky", Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
}

/// The tests' Azurite checks `x-ms-version` as Azure does (no
/// `--skipApiVersionCheck`): a version it does not know is refused before
/// anything else, so every request the suite's code sends, with the SDK's
/// version, was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_checks_the_api_version_the_sdk_sends() {
    let azurite = Azurite::shared();
    let url = format!(
        "http://127.0.0.1:{}/devstoreaccount1?comp=list",
        azurite.port
    );
    let with = |version: &'static str| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .get(url)
                .header("x-ms-version", version)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        with("2099-01-01").await,
        400,
        "an unknown version is refused"
    );
    // Known: the request gets as far as authentication (it carries none).
    assert_eq!(with("2026-04-06").await, 403);
}

/// The lease-conditioned write before a POST is answered slowly, past the
/// invocation's deadline: the POST is not sent afterwards (the caller's
/// answer says nothing was sent, and it must stay true).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_sent_after_the_deadline_a_slow_lease_write_used_up() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let handler = Instance::start(
        &sim,
        &proxy.connection_string(azurite),
        "faults-slow-confirm",
        &[("REQUEST_TIMEOUT_SECONDS", "4")],
    );
    // Every metadata write on a lock blob takes 4.5 s: less than the
    // storage call's own 5 s timeout, more than the invocation has left
    // however quickly it got there.
    proxy.inject(Rule::slow("set_metadata", "locks/", Duration::from_millis(4500)).times(100));

    let (status, body, _) = handler.post(json!({"deviceId": devices[0]})).await;

    // Give a late POST the time to arrive before looking.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        posts(&sim).is_empty(),
        "a POST reached Defender after the deadline ({status} {body}): {:?}",
        posts(&sim)
    );
    assert!(sim.actions().is_empty());
    assert_ne!(status, 201, "{body}");
    assert!(
        proxy.count("set_metadata", "locks/") >= 1,
        "the lease-conditioned write was tried: {:?}",
        proxy.seen()
    );
}

/// The cancel route writes to Defender too: it takes the machine's lease
/// and its last step is the lease-conditioned storage write, so when
/// storage refuses that write the cancel is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_by_action_id_is_sent_under_the_machines_lease() {
    let _turn = turn().await;
    let azurite = Azurite::shared();
    let proxy = StorageProxy::start(azurite).await;
    let (sim, devices) = tenant(1, SimConfig::default()).await;
    let handler = Instance::start(
        &sim,
        &proxy.connection_string(azurite),
        "faults-cancel",
        &[],
    );
    let restrict = || async {
        let (status, body, _) = handler.post(json!({"deviceId": devices[0]})).await;
        assert_eq!(status, 201, "{body}");
        (
            body["action"]["id"]
                .as_str()
                .expect("the action")
                .to_owned(),
            body["action"]["machineId"]
                .as_str()
                .expect("the machine")
                .to_owned(),
        )
    };
    let cancel = |action_id: String| {
        let url = format!(
            "http://127.0.0.1:{}/api/restrict-code-execution/actions/{action_id}/cancel",
            handler.port
        );
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&json!({"comment": "INC-1 false alarm"}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let cancels = || {
        sim.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/cancel"))
            .count()
    };

    // Under the lease: acquired, confirmed, then the cancel.
    let (action_id, machine_id) = restrict().await;
    sim.set_offline(&machine_id, true);
    proxy.clear_seen();
    let (status, body) = cancel(action_id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cancels(), 1);
    let kinds: Vec<&str> = proxy
        .seen()
        .iter()
        .filter(|s| s.path.contains("locks/"))
        .map(|s| s.kind)
        .collect::<Vec<_>>()
        .into_iter()
        .collect();
    assert!(
        kinds.contains(&"acquire_lease") && kinds.contains(&"set_metadata"),
        "{kinds:?}"
    );

    // Storage refuses the lease-conditioned write: the cancel is not sent.
    let (action_id, _) = restrict().await;
    proxy.inject(Rule::new(
        "set_metadata",
        "locks/",
        412,
        "LeaseIdMismatchWithBlobOperation",
    ));
    let (status, body) = cancel(action_id).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "coordination_unavailable", "{body}");
    assert_eq!(cancels(), 1, "the second cancel was sent without the lease");
}
