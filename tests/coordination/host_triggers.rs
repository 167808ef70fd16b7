//! The host emulator's queue and timer triggers (`tests/common/queue_host.rs`)
//! proven against Azurite's queue service and a small axum handler that
//! records what it received, before any job test relies on them. Also: the
//! `azure_storage_queue` crate against Azurite.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use azure_core::http::RequestContent;
use azure_storage_queue::{
    QueueClient,
    models::{QueueClientPeekMessagesOptions, QueueClientReceiveMessagesOptions, QueueMessage},
};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::azurite::Azurite;
use crate::queue_host::{
    HostEvent, Outcome, PoisonReason, QueueHost, QueueOptions, QueueTrigger, StorageAccount,
    TimerTrigger, fire_timer,
};

const QUEUE: &str = "restrict-jobs";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

async fn send_raw(queue: &QueueClient, text: &str) -> String {
    let content: RequestContent<QueueMessage, _> = QueueMessage {
        message_text: Some(text.to_owned()),
    }
    .try_into()
    .unwrap();
    let sent = queue.send_message(content, None).await.unwrap();
    let sent = sent.into_model().unwrap();
    sent.items.unwrap()[0].message_id.clone().unwrap()
}

async fn peek_texts(queue: &QueueClient) -> Vec<String> {
    match queue
        .peek_messages(Some(QueueClientPeekMessagesOptions {
            number_of_messages: Some(32),
            ..Default::default()
        }))
        .await
    {
        Ok(r) => r
            .into_model()
            .unwrap()
            .items
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.message_text)
            .collect(),
        Err(_) => Vec::new(),
    }
}

struct Storage {
    azurite: Azurite,
    connection: String,
    account: StorageAccount,
}

impl Storage {
    fn start() -> Self {
        let azurite = Azurite::start();
        let connection = azurite.connection_string();
        let account = StorageAccount::from_connection_string(&connection).unwrap();
        Self {
            azurite,
            connection,
            account,
        }
    }

    async fn queue(&self, name: &str) -> QueueClient {
        let queue = self.account.queue(name).unwrap();
        queue.create(None).await.unwrap();
        queue
    }

    fn settings(&self) -> impl Fn(&str) -> Option<String> + use<> {
        let connection = self.connection.clone();
        move |name| (name == "AzureWebJobsStorage").then(|| connection.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_storage_queue_talks_to_azurite() {
    let storage = Storage::start();
    let queue = storage.queue("sdk-check").await;
    let id = send_raw(&queue, &b64(r#"{"jobId":"j1"}"#)).await;

    let receive = |visibility: i32| {
        queue.receive_messages(Some(QueueClientReceiveMessagesOptions {
            number_of_messages: Some(16),
            visibility_timeout: Some(visibility),
            ..Default::default()
        }))
    };
    let got = receive(600)
        .await
        .unwrap()
        .into_model()
        .unwrap()
        .items
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id.as_deref(), Some(id.as_str()));
    assert_eq!(got[0].dequeue_count, Some(1));
    assert_eq!(
        got[0].message_text.as_deref(),
        Some(b64(r#"{"jobId":"j1"}"#).as_str())
    );
    assert!(got[0].insertion_time.is_some() && got[0].expiration_time.is_some());
    // Invisible for its 10 minutes.
    let none = receive(600).await.unwrap().into_model().unwrap().items;
    assert!(none.unwrap_or_default().is_empty());
    // Visible again at once after an update to 0 (what the host does on failure).
    let receipt = got[0].pop_receipt.clone().unwrap();
    let updated = queue.update_message(&id, &receipt, 0, None).await.unwrap();
    let new_receipt = updated
        .headers()
        .get_optional_str(&azure_core::http::headers::HeaderName::from_static(
            "x-ms-popreceipt",
        ))
        .unwrap()
        .to_owned();
    assert_ne!(new_receipt, receipt);
    let again = receive(600)
        .await
        .unwrap()
        .into_model()
        .unwrap()
        .items
        .unwrap();
    assert_eq!(again[0].dequeue_count, Some(2));
    // The old receipt no longer deletes it; the new one does.
    assert!(queue.delete_message(&id, &receipt, None).await.is_err());
    let receipt = again[0].pop_receipt.clone().unwrap();
    queue.delete_message(&id, &receipt, None).await.unwrap();
    assert!(peek_texts(&queue).await.is_empty());

    // The service's own queue writer sends what the trigger decodes.
    let settings = storage_settings(&storage, "svc");
    let sender = restrict_code_execution::coordination::queue::StorageQueue::new(
        &settings,
        "svc-queue",
        Duration::from_secs(10),
        None,
    )
    .unwrap();
    storage.queue("svc-queue").await;
    use restrict_code_execution::coordination::queue::MessageQueue as _;
    sender.send(r#"{"k":"v"}"#, Duration::ZERO).await.unwrap();
    let texts = peek_texts(&storage.account.queue("svc-queue").unwrap()).await;
    assert_eq!(texts, [b64(r#"{"k":"v"}"#)]);
}

fn storage_settings(
    storage: &Storage,
    container: &str,
) -> restrict_code_execution::coordination::StorageSettings {
    storage.azurite.settings(container)
}

/// What the recording handler does with a message (by its text).
fn reply_for(text: &str, dequeue_count: u32) -> Reply {
    match text {
        "fail-always" => Reply::Status(500),
        "fail-once" if dequeue_count < 2 => Reply::Status(503),
        "text-plain" => Reply::TextPlain,
        "null-body" => Reply::Null,
        "array-body" => Reply::Array,
        t if t.starts_with("slow") => Reply::Slow(Duration::from_millis(300)),
        _ => Reply::Ok,
    }
}

#[derive(Debug, Clone)]
enum Reply {
    Ok,
    Status(u16),
    TextPlain,
    Null,
    Array,
    Slow(Duration),
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Value,
    at: Instant,
}

impl Received {
    /// The message text: `Data.message` decoded twice.
    fn text(&self) -> String {
        let inner = self.body["Data"]["message"].as_str().unwrap();
        serde_json::from_str::<String>(inner).unwrap()
    }
}

#[derive(Default)]
struct Recorder {
    received: Mutex<Vec<Received>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

async fn handle(
    State(recorder): State<Arc<Recorder>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let received = Received {
        path: format!("/{function}"),
        headers,
        body,
        at: Instant::now(),
    };
    let (text, count) = match received.body["Data"]["message"].as_str() {
        Some(_) => (
            received.text(),
            received.body["Metadata"]["DequeueCount"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
        ),
        None => (String::new(), 1),
    };
    recorder.received.lock().unwrap().push(received);
    let now = recorder.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    recorder.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = reply_for(&text, count);
    if let Reply::Slow(d) = reply {
        tokio::time::sleep(d).await;
    }
    recorder.in_flight.fetch_sub(1, Ordering::SeqCst);
    let json_type = [("content-type", "application/json")];
    match reply {
        Reply::Ok | Reply::Slow(_) => {
            (json_type, r#"{"Outputs":{},"Logs":[],"ReturnValue":null}"#).into_response()
        }
        Reply::Status(s) => (
            StatusCode::from_u16(s).unwrap(),
            json_type,
            r#"{"Outputs":{}}"#,
        )
            .into_response(),
        Reply::TextPlain => ([("content-type", "text/plain")], "{}").into_response(),
        Reply::Null => (json_type, "null").into_response(),
        Reply::Array => (json_type, "[]").into_response(),
    }
}

async fn recording_handler() -> (String, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let app = Router::new()
        .route("/{function}", post(handle))
        .with_state(recorder.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, recorder)
}

fn worker_trigger(settings: &dyn Fn(&str) -> Option<String>) -> QueueTrigger {
    // The binding the job worker's function.json declares.
    let function_json = json!({"bindings": [{
        "type": "queueTrigger", "direction": "in", "name": "message",
        "queueName": "%JOBS_QUEUE%", "connection": "AzureWebJobsStorage"
    }]});
    let with_queue = |name: &str| match name {
        "JOBS_QUEUE" => Some(QUEUE.to_owned()),
        other => settings(other),
    };
    QueueTrigger::from_function_json("job-worker", &function_json, &with_queue).unwrap()
}

fn fast_options() -> QueueOptions {
    QueueOptions {
        max_polling_interval: Duration::from_millis(200),
        function_timeout: Duration::from_secs(2),
        ..QueueOptions::default()
    }
}

/// Waits until `done` holds for the host's events, or panics after 60 s.
async fn until(host: &QueueHost, what: &str, done: impl Fn(&[HostEvent]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = host.events();
        if done(&events) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {events:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn deleted(events: &[HostEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, HostEvent::Deleted { .. }))
        .count()
}

fn poisoned(events: &[HostEvent]) -> Vec<(String, i64, PoisonReason)> {
    events
        .iter()
        .filter_map(|e| match e {
            HostEvent::Poisoned {
                message_id,
                dequeue_count,
                reason,
            } => Some((message_id.clone(), *dequeue_count, *reason)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_posted_in_the_hosts_payload_envelope_and_deleted_on_success() {
    let storage = Storage::start();
    let queue = storage.queue(QUEUE).await;
    let (handler, recorder) = recording_handler().await;
    let plain_id = send_raw(&queue, &b64("hello ünïcode")).await;
    let message = r#"{"jobId":42,"Id":"mine","flag":true,"nested":{"a":1},"list":[1],"none":null,"queueTrigger":"x","text":"t"}"#;
    send_raw(&queue, &b64(message)).await;

    let settings = storage.settings();
    let host = QueueHost::start(
        &handler,
        worker_trigger(&settings),
        fast_options(),
        &settings,
    )
    .unwrap();
    until(&host, "both deleted", |e| deleted(e) == 2).await;
    let events = host.stop().await;
    assert!(
        events
            .iter()
            .all(|e| matches!(e, HostEvent::Invoked { .. } | HostEvent::Deleted { .. })),
        "{events:#?}"
    );
    assert!(
        peek_texts(&queue).await.is_empty(),
        "deleted from the queue"
    );

    let received = recorder.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    let plain = received
        .iter()
        .find(|r| r.text() == "hello ünïcode")
        .unwrap();
    assert_eq!(plain.path, "/job-worker");
    let header = |name: &str| {
        plain
            .headers
            .get(name)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(header("x-azure-functions-hostversion"), "4.1037.0.0");
    assert_eq!(header("user-agent"), "Azure-Functions-Host/4.1037.0.0");
    assert_eq!(header("content-type"), "application/json; charset=utf-8");
    assert_eq!(header("transfer-encoding"), "chunked");
    assert!(uuid::Uuid::parse_str(&header("x-azure-functions-invocationid")).is_ok());

    // Data: the text as a JSON string inside a JSON string.
    assert_eq!(plain.body["Data"], json!({"message": "\"hello ünïcode\""}));
    let metadata = plain.body["Metadata"].as_object().unwrap();
    let mut keys: Vec<&str> = metadata.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "DequeueCount",
            "ExpirationTime",
            "Id",
            "InsertionTime",
            "NextVisibleTime",
            "PopReceipt",
            "sys"
        ]
    );
    assert_eq!(metadata["DequeueCount"], "1");
    assert_eq!(metadata["Id"], json!(format!("\"{plain_id}\"")));
    let receipt: String = serde_json::from_str(metadata["PopReceipt"].as_str().unwrap()).unwrap();
    assert!(!receipt.is_empty());
    for key in ["ExpirationTime", "InsertionTime", "NextVisibleTime"] {
        let t = metadata[key].as_str().unwrap();
        assert!(
            t.ends_with("+00:00") && !t.contains('.') && t.len() == 25,
            "{key} {t}"
        );
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap();
    }
    let sys = &metadata["sys"];
    assert_eq!(sys["MethodName"], "job-worker");
    assert!(uuid::Uuid::parse_str(sys["RandGuid"].as_str().unwrap()).is_ok());
    let utc_now = sys["UtcNow"].as_str().unwrap();
    assert!(utc_now.ends_with('Z') && utc_now.len() == 28, "{utc_now}");

    // A JSON object message: its top-level properties join the metadata the
    // way the host merges them, its own Id replacing the message id.
    let merged = received.iter().find(|r| r.text() == message).unwrap();
    let metadata = &merged.body["Metadata"];
    assert_eq!(metadata["jobId"], "\"42\"");
    assert_eq!(metadata["Id"], "\"mine\"");
    assert_eq!(metadata["flag"], "\"True\"");
    assert_eq!(metadata["text"], "\"t\"");
    assert_eq!(metadata["nested"], json!({"a": 1}));
    for absent in ["list", "none", "queueTrigger", "QueueTrigger"] {
        assert!(metadata.get(absent).is_none(), "{absent}");
    }
    assert_eq!(metadata["DequeueCount"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_redelivered_then_poisoned_and_undecodable_messages_go_straight_to_poison() {
    let storage = Storage::start();
    let queue = storage.queue(QUEUE).await;
    let poison_queue = storage.account.queue(&format!("{QUEUE}-poison")).unwrap();
    let (handler, recorder) = recording_handler().await;
    let always = send_raw(&queue, &b64("fail-always")).await;
    let once = send_raw(&queue, &b64("fail-once")).await;
    let undecodable = send_raw(&queue, "not base64 ~~").await;
    let mut answers = Vec::new();
    for text in ["text-plain", "null-body", "array-body"] {
        answers.push((text, send_raw(&queue, &b64(text)).await));
    }

    let settings = storage.settings();
    let host = QueueHost::start(
        &handler,
        worker_trigger(&settings),
        fast_options(),
        &settings,
    )
    .unwrap();
    until(&host, "all settled", |e| {
        deleted(e) >= 1 && poisoned(e).len() == 5
    })
    .await;
    let events = host.stop().await;

    let invocations = |id: &str| -> Vec<(i64, Outcome)> {
        events
            .iter()
            .filter_map(|e| match e {
                HostEvent::Invoked {
                    message_id,
                    dequeue_count,
                    outcome,
                    ..
                } if message_id == id => Some((*dequeue_count, outcome.clone())),
                _ => None,
            })
            .collect()
    };
    // Five deliveries, each visible again at once, then the poison queue.
    let tries = invocations(&always);
    assert_eq!(
        tries.iter().map(|t| t.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(tries.iter().all(|t| matches!(
        &t.1,
        Outcome::Failed {
            status: Some(500),
            ..
        }
    )));
    let released: Vec<i64> = events
        .iter()
        .filter_map(|e| match e {
            HostEvent::Released {
                message_id,
                dequeue_count,
                visibility,
            } if *message_id == always => {
                assert_eq!(*visibility, Duration::ZERO);
                Some(*dequeue_count)
            }
            _ => None,
        })
        .collect();
    assert_eq!(released, [1, 2, 3, 4]);
    let poison = poisoned(&events);
    assert!(poison.contains(&(always.clone(), 5, PoisonReason::LastAttemptFailed)));

    // A failure then a success: deleted on the second delivery.
    let tries = invocations(&once);
    assert_eq!(tries.len(), 2);
    assert!(matches!(
        tries[0].1,
        Outcome::Failed {
            status: Some(503),
            ..
        }
    ));
    assert_eq!(tries[1], (2, Outcome::Succeeded { status: 200 }));
    assert!(events.contains(&HostEvent::Deleted { message_id: once }));

    // Not base64: poisoned unchanged, never invoked.
    assert!(invocations(&undecodable).is_empty());
    assert!(poison.contains(&(undecodable, 1, PoisonReason::Undecodable)));

    // Answers the host cannot use are failures too: a text/plain answer, a
    // `null` body (never completes: functionTimeout), a JSON array.
    for (text, id) in &answers {
        let tries = invocations(id);
        assert_eq!(tries.len(), 5, "{text}");
        match *text {
            "null-body" => assert!(tries.iter().all(|t| t.1 == Outcome::TimedOut)),
            _ => assert!(tries.iter().all(|t| matches!(t.1, Outcome::Failed { .. }))),
        }
    }

    // A `null` body holds the message until functionTimeout (2 s here);
    // an immediate redelivery would come within milliseconds. The margin
    // allows for the first delivery being recorded late on a loaded machine.
    let nulls: Vec<Instant> = recorder
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.text() == "null-body")
        .map(|r| r.at)
        .collect();
    assert!(
        nulls
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_millis(1500)),
        "{nulls:?}"
    );

    let mut in_poison = peek_texts(&poison_queue).await;
    in_poison.sort();
    let mut expected = vec![
        b64("fail-always"),
        "not base64 ~~".to_owned(),
        b64("text-plain"),
        b64("null-body"),
        b64("array-body"),
    ];
    expected.sort();
    assert_eq!(in_poison, expected, "the text as it was, still base64");
    assert!(peek_texts(&queue).await.is_empty());
    assert!(
        recorder
            .received
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.text() != "not base64 ~~")
    );
}

/// Receives the message `id` and makes it visible again, `times` times, as
/// deliveries that crashed before completing would.
async fn dequeue_without_completing(queue: &QueueClient, id: &str, times: usize) {
    for _ in 0..times {
        let got = queue
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(1),
                visibility_timeout: Some(600),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_model()
            .unwrap()
            .items
            .unwrap();
        let receipt = got[0].pop_receipt.clone().unwrap();
        queue.update_message(id, &receipt, 0, None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dequeued_too_often_is_poisoned_before_any_invocation() {
    let storage = Storage::start();
    let queue = storage.queue(QUEUE).await;
    let id = send_raw(&queue, &b64("crashed every time")).await;
    dequeue_without_completing(&queue, &id, 5).await;
    // The same on the poison queue, which has no poison queue of its own.
    let poison_name = format!("{QUEUE}-poison");
    let poison_queue = storage.queue(&poison_name).await;
    let in_poison = send_raw(&poison_queue, &b64("fail-always")).await;
    dequeue_without_completing(&poison_queue, &in_poison, 5).await;

    let (handler, recorder) = recording_handler().await;
    let settings = storage.settings();
    let host = QueueHost::start(
        &handler,
        worker_trigger(&settings),
        fast_options(),
        &settings,
    )
    .unwrap();
    let function_json = json!({"bindings": [{
        "type": "queueTrigger", "direction": "in", "name": "message",
        "queueName": poison_name, "connection": "AzureWebJobsStorage"
    }]});
    let trigger =
        QueueTrigger::from_function_json("job-poison", &function_json, &settings).unwrap();
    let poison_host = QueueHost::start(&handler, trigger, fast_options(), &settings).unwrap();
    until(&host, "poisoned", |e| !poisoned(e).is_empty()).await;
    until(&poison_host, "abandoned", |e| {
        e.iter().any(|e| matches!(e, HostEvent::Abandoned { .. }))
    })
    .await;
    let events = host.stop().await;
    assert_eq!(poisoned(&events), [(id, 6, PoisonReason::DequeuedTooOften)]);
    // The poison queue's message is still invoked (dequeue count 6), and when
    // it fails it stays invisible for the rest of its lease: no poison queue.
    let events: Vec<HostEvent> = poison_host
        .stop()
        .await
        .into_iter()
        .filter(|e| match e {
            HostEvent::Invoked { message_id, .. } | HostEvent::Abandoned { message_id } => {
                *message_id == in_poison
            }
            _ => false,
        })
        .collect();
    assert!(
        matches!(
            &events[..],
            [
                HostEvent::Invoked {
                    dequeue_count: 6,
                    outcome: Outcome::Failed { .. },
                    ..
                },
                HostEvent::Abandoned { .. },
            ]
        ),
        "{events:#?}"
    );
    // The worker was never invoked for the message it poisoned.
    let received = recorder.received.lock().unwrap().clone();
    assert!(
        received
            .iter()
            .all(|r| r.path == "/job-poison" || r.text() != "crashed every time")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_timeout_delays_a_redelivery_and_batches_bound_concurrency() {
    let storage = Storage::start();
    let queue = storage.queue(QUEUE).await;
    let (handler, recorder) = recording_handler().await;
    send_raw(&queue, &b64("fail-once")).await;
    for i in 0..12 {
        send_raw(&queue, &b64(&format!("slow {i}"))).await;
    }
    let settings = storage.settings();
    let host_json = json!({
        "version": "2.0",
        "functionTimeout": "00:00:05",
        "extensions": {"queues": {
            "batchSize": 4, "newBatchThreshold": 2, "visibilityTimeout": "00:00:02",
            "maxPollingInterval": "00:00:00.200"
        }}
    });
    let options = QueueOptions::from_host_json(&host_json, 2).unwrap();
    assert_eq!(
        (
            options.batch_size,
            options.new_batch_threshold,
            options.max_dequeue_count
        ),
        (4, 2, 5)
    );
    assert_eq!(options.function_timeout, Duration::from_secs(5));
    let host = QueueHost::start(&handler, worker_trigger(&settings), options, &settings).unwrap();
    until(&host, "all deleted", |e| deleted(e) == 13).await;
    host.stop().await;

    let received = recorder.received.lock().unwrap().clone();
    let tries: Vec<&Received> = received
        .iter()
        .filter(|r| r.text() == "fail-once")
        .collect();
    assert_eq!(tries.len(), 2);
    let gap = tries[1].at - tries[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "visible again after 2 s, not {gap:?}"
    );
    let max = recorder.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=6).contains(&max),
        "at most batchSize + newBatchThreshold at once, and more than one: {max}"
    );
}

#[tokio::test]
async fn a_timer_fires_with_the_timer_info_object_and_only_sys_metadata() {
    let (handler, recorder) = recording_handler().await;
    let function_json = json!({"bindings": [{
        "type": "timerTrigger", "direction": "in", "name": "timer",
        "schedule": "%RECONCILE_SCHEDULE%"
    }]});
    let unset = |_: &str| None;
    assert!(
        TimerTrigger::from_function_json("reconcile", &function_json, &unset)
            .unwrap_err()
            .contains("RECONCILE_SCHEDULE")
    );
    let every_minute = |n: &str| (n == "RECONCILE_SCHEDULE").then(|| "0 */1 * * * *".to_owned());
    let trigger =
        TimerTrigger::from_function_json("reconcile", &function_json, &every_minute).unwrap();
    assert_eq!(trigger.period(), Some(Duration::from_secs(60)));
    assert!(trigger.use_monitor && trigger.is_cron());

    let http = reqwest::Client::new();
    let last = time::macros::datetime!(2025-01-01 09:55:00.0021234 UTC);
    let status = crate::queue_host::ScheduleStatus {
        last,
        next: last + time::Duration::minutes(5),
        last_updated: last,
    };
    let (_, outcome) = fire_timer(
        &http,
        &handler,
        &trigger,
        Some(status),
        false,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded { status: 200 });
    let (_, _) = fire_timer(
        &http,
        &handler,
        &trigger,
        None,
        true,
        Duration::from_secs(5),
    )
    .await;

    let received = recorder.received.lock().unwrap().clone();
    assert_eq!(received[0].path, "/reconcile");
    assert_eq!(
        received[0].body["Data"],
        json!({"timer": {
            "Schedule": {"AdjustForDST": true},
            "ScheduleStatus": {
                "Last": "2025-01-01T09:55:00.0021234+00:00",
                "Next": "2025-01-01T10:00:00.0021234+00:00",
                "LastUpdated": "2025-01-01T09:55:00.0021234+00:00"
            },
            "IsPastDue": false
        }})
    );
    let metadata = received[0].body["Metadata"].as_object().unwrap();
    assert_eq!(metadata.keys().collect::<Vec<_>>(), ["sys"]);
    assert_eq!(metadata["sys"]["MethodName"], "reconcile");
    assert_eq!(
        received[1].body["Data"]["timer"],
        json!({"Schedule": {"AdjustForDST": true}, "ScheduleStatus": null, "IsPastDue": true})
    );

    // A TimeSpan schedule under a minute: no DST adjustment, no monitor.
    let fast = json!({"bindings": [{"type": "timerTrigger", "name": "t", "schedule": "00:00:10"}]});
    let trigger = TimerTrigger::from_function_json("tick", &fast, &unset).unwrap();
    assert!(!trigger.is_cron() && !trigger.use_monitor);
    assert_eq!(trigger.period(), Some(Duration::from_secs(10)));
}

#[test]
fn the_apps_host_json_reads_as_the_host_reads_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let host_json: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("host.json")).unwrap()).unwrap();
    let options = QueueOptions::from_host_json(&host_json, 1).unwrap();
    assert_eq!(options.function_timeout, Duration::from_secs(300));
    assert_eq!(
        options.message_encoding,
        crate::queue_host::MessageEncoding::Base64
    );
}
