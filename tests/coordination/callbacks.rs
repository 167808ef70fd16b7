//! Pending callbacks in the storage account: written by one instance,
//! delivered by whichever reconciler runs, exactly once when two run at
//! once, and retried by another instance after a failure with the same
//! `Idempotency-Key`.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode};
use parking_lot::Mutex;
use restrict_code_execution::{
    config::Settings,
    defender::timestamp::Timestamp,
    host::app_state::AppState,
    service::callbacks::{Subject, Watched},
    simulator::SimConfig,
    startup::{Backend, prepare},
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::azurite::Azurite;

type Log = Arc<Mutex<(usize, Vec<(HeaderMap, Bytes)>)>>;

/// A receiver that fails the first `fail` requests with 503.
async fn receiver(fail: usize) -> (SocketAddr, Log) {
    let log: Log = Arc::new(Mutex::new((fail, Vec::new())));
    let app = Router::new()
        .fallback(
            |State(log): State<Log>, headers: HeaderMap, body: Bytes| async move {
                let mut log = log.lock();
                log.1.push((headers, body));
                if log.0 > 0 {
                    log.0 -= 1;
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
            },
        )
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, log)
}

/// One app instance on the shared storage account (its own simulated tenant:
/// the callbacks here need no Defender read).
async fn instance(azurite: &Azurite, container: &str) -> AppState {
    let map: HashMap<String, String> = [
        ("COORDINATION", "storage".to_owned()),
        ("AzureWebJobsStorage", azurite.connection_string()),
        ("COORDINATION_CONTAINER", container.to_owned()),
        ("CALLBACK_ALLOWED_HOSTS", "127.0.0.1".to_owned()),
        ("CALLBACK_ALLOW_LOOPBACK", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = Settings::from_map(&map).unwrap();
    let (state, _sim) = prepare(settings, Backend::Simulated(Box::<SimConfig>::default()))
        .await
        .unwrap();
    state
}

fn finished_action() -> Subject {
    Subject::Action {
        release: false,
        device: Watched {
            device_id: "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d".into(),
            machine_id: Some("c5cb89852ce0d21636c0491709a4571b5f190e75".into()),
            computer_dns_name: Some("DESKTOP-ALPHA".into()),
            action_id: Some("a1".into()),
            status: Some("Succeeded".into()),
            finished_at: Timestamp::parse("2026-12-05T22:00:00Z"),
            problem: None,
        },
    }
}

#[tokio::test]
async fn two_reconcilers_at_once_deliver_a_stored_callback_once() {
    let azurite = Azurite::start();
    let (addr, log) = receiver(0).await;
    let a = instance(&azurite, "callbacks-once").await;
    let b = instance(&azurite, "callbacks-once").await;
    let url = a
        .callbacks()
        .check(&format!("http://127.0.0.1:{}/hook?sig=s", addr.port()))
        .unwrap();
    a.callbacks()
        .add(&url, Some("https://app.example".into()), finished_action())
        .await
        .unwrap();

    let now = OffsetDateTime::now_utc();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ra, rb) = tokio::join!(
        a.callbacks().deliver_due(now, deadline),
        b.callbacks().deliver_due(now, deadline)
    );
    assert_eq!(ra.delivered + rb.delivered, 1, "{ra:?} {rb:?}");
    assert_eq!(log.lock().1.len(), 1);
    let body: Value = serde_json::from_slice(&log.lock().1[0].1).unwrap();
    assert_eq!(body["event"], "action.finished");
    assert_eq!(
        body["statusUrl"],
        "https://app.example/api/restrict-code-execution/actions/a1"
    );

    // A fresh instance finds nothing left to send.
    let c = instance(&azurite, "callbacks-once").await;
    let rc = c
        .callbacks()
        .deliver_due(now + time::Duration::hours(3), deadline)
        .await;
    assert_eq!(rc.delivered + rc.retrying, 0, "{rc:?}");
    assert_eq!(log.lock().1.len(), 1);
}

#[tokio::test]
async fn a_failed_callback_is_retried_by_another_instance_with_the_same_key() {
    let azurite = Azurite::start();
    let (addr, log) = receiver(1).await;
    let a = instance(&azurite, "callbacks-retry").await;
    let url = a
        .callbacks()
        .check(&format!("http://127.0.0.1:{}/hook?sig=s", addr.port()))
        .unwrap();
    a.callbacks()
        .add(&url, None, finished_action())
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    let deadline = Instant::now() + Duration::from_secs(30);
    assert_eq!(a.callbacks().deliver_due(now, deadline).await.retrying, 1);
    drop(a);

    let b = instance(&azurite, "callbacks-retry").await;
    assert_eq!(
        b.callbacks()
            .deliver_due(now + time::Duration::seconds(30), deadline)
            .await
            .delivered,
        0,
        "not due before its backoff"
    );
    assert_eq!(
        b.callbacks()
            .deliver_due(now + time::Duration::seconds(61), deadline)
            .await
            .delivered,
        1
    );
    let log = log.lock();
    assert_eq!(log.1.len(), 2);
    assert_eq!(log.1[0].0["idempotency-key"], log.1[1].0["idempotency-key"]);
    // Each attempt carries its own `sentAt`; the rest is the same event.
    let bodies: Vec<Value> = log
        .1
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect();
    assert_eq!(bodies[0]["actionId"], bodies[1]["actionId"]);
}
