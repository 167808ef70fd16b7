//! The Functions host's non-HTTP triggers, emulated for tests and benchmarks:
//! a Storage queue trigger ([`QueueHost`]) and a timer trigger
//! ([`fire_timer`], [`TimerHost`]), each calling a custom handler in payload
//! mode exactly as the host does.
//!
//! What the queue trigger does, per the Storage Queues extension 5.x and the
//! host's custom-handler invoker (docs/host-triggers.md has the sources):
//!
//! - **Receive.** Batches of `batchSize` (16) with a visibility of 10 minutes
//!   (fixed in the extension); the next batch is fetched once no more than
//!   `newBatchThreshold` invocations are still running, so at most
//!   `batchSize + newBatchThreshold` run at once. An empty queue is polled
//!   again after a backoff that doubles from 100 ms to `maxPollingInterval`.
//!   A message still running at half its visibility has it renewed (the pop
//!   receipt changes).
//! - **Decode.** With `messageEncoding` base64 (the default) a message that is
//!   not base64 goes straight to `<queue>-poison`, unchanged, without an
//!   invocation and whatever its dequeue count. Text that is not UTF-8 fails
//!   the binding: an ordinary failure.
//! - **Poison check before the invocation**: `DequeueCount > maxDequeueCount`
//!   moves the message to `<queue>-poison` without invoking.
//! - **Invoke.** `POST /<function>` with `{"Data": {"<name>": <message text
//!   JSON-encoded as a string>}, "Metadata": {...}}`: `DequeueCount` as a
//!   string, `Id` and `PopReceipt` JSON-encoded, the three times as ISO 8601
//!   without a fraction, `sys`; a message that is a JSON object adds its
//!   top-level properties (objects as objects, every other non-array value as
//!   its text, JSON-encoded; `null` skipped), replacing a same-named key.
//!   Keys ending in `trigger` are left out. Headers, chunked body and
//!   `functionTimeout` as the host sends them.
//! - **Result.** A 2xx answer with a JSON content type and a JSON object body
//!   deletes the message. Anything else fails: a non-2xx status, another
//!   content type, a body that is not JSON, a connection error, or no answer
//!   within `functionTimeout` (an empty or `null` body never completes, so it
//!   ends there too; the real host then restarts the handler, which this
//!   emulator only records as [`Outcome::TimedOut`]).
//! - **After a failure**: `DequeueCount >= maxDequeueCount` moves the message
//!   to `<queue>-poison`; otherwise its visibility is set to
//!   `visibilityTimeout` (0 by default: visible again at once). A queue whose
//!   name ends in `-poison` has no poison queue: its failed messages stay
//!   invisible until their 10 minutes run out.
//!
//! The timer trigger posts `{"Data": {"<name>": {"Schedule": {"AdjustForDST"},
//! "ScheduleStatus": {"Last", "Next", "LastUpdated"} | null, "IsPastDue"}},
//! "Metadata": {"sys": {...}}}`; failed runs are not retried.

// Each test binary and benchmark uses a part of this module.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use azure_core::http::{RequestContent, StatusCode, Url};
use azure_storage_queue::{
    QueueClient,
    models::{QueueClientReceiveMessagesOptions, QueueMessage, ReceivedMessage},
};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::{sync::watch, task::JoinSet};

pub const HOST_VERSION: &str = "4.1037.0.0";
/// The visibility the extension receives messages with (fixed in its code).
pub const RECEIVE_VISIBILITY: Duration = Duration::from_secs(600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------
// Configuration: function.json, host.json and app settings.
// ---------------------------------------------------------------------------

/// A function's `queueTrigger` binding (function.json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTrigger {
    /// The function (folder) name: the invocation goes to `/<function>`.
    pub function: String,
    /// The binding's `name`: the key in `Data`.
    pub name: String,
    /// `queueName`, `%SETTING%` references resolved.
    pub queue_name: String,
    /// `connection`: the app setting holding the storage account
    /// (`AzureWebJobsStorage` when empty).
    pub connection: String,
    /// `dataType: "binary"` passes the message as base64 instead of a string.
    pub binary: bool,
}

impl QueueTrigger {
    /// The `queueTrigger` binding of `function_json`; `settings` resolves
    /// `%NAME%` in `queueName` as the host does.
    pub fn from_function_json(
        function: &str,
        function_json: &Value,
        settings: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let binding = trigger_binding(function_json, "queueTrigger")?;
        let text = |key: &str| binding.get(key).and_then(Value::as_str).map(str::to_owned);
        let name = text("name").ok_or("the queueTrigger binding has no name")?;
        let queue_name = resolve(
            &text("queueName").ok_or("the queueTrigger binding has no queueName")?,
            settings,
        )?;
        let connection = text("connection")
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "AzureWebJobsStorage".to_owned());
        Ok(Self {
            function: function.to_owned(),
            name,
            queue_name,
            connection,
            binary: text("dataType").is_some_and(|d| d.eq_ignore_ascii_case("binary")),
        })
    }

    /// Reads `<app_root>/<function>/function.json`.
    pub fn from_app(
        app_root: &std::path::Path,
        function: &str,
        settings: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        Self::from_function_json(function, &read_function_json(app_root, function)?, settings)
    }
}

fn read_function_json(app_root: &std::path::Path, function: &str) -> Result<Value, String> {
    let path = app_root.join(function).join("function.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn trigger_binding<'a>(function_json: &'a Value, kind: &str) -> Result<&'a Value, String> {
    function_json
        .get("bindings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|b| {
            b.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case(kind))
        })
        .ok_or_else(|| format!("function.json has no {kind} binding"))
}

/// `%NAME%` → the app setting; an unset setting breaks the binding.
fn resolve(value: &str, settings: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let trimmed = value.trim();
    match trimmed.strip_prefix('%').and_then(|v| v.strip_suffix('%')) {
        Some(name) => settings(name).ok_or_else(|| format!("the app setting {name} is not set")),
        None => Ok(trimmed.to_owned()),
    }
}

/// How the queue extension's message encoding reads messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageEncoding {
    Base64,
    None,
}

/// `host.json`: `extensions.queues` and `functionTimeout`, with the
/// extension's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueOptions {
    pub batch_size: usize,
    pub new_batch_threshold: usize,
    pub max_dequeue_count: i64,
    pub visibility_timeout: Duration,
    pub max_polling_interval: Duration,
    pub message_encoding: MessageEncoding,
    pub function_timeout: Duration,
}

impl Default for QueueOptions {
    /// The defaults on a Consumption plan (one processor counted).
    fn default() -> Self {
        Self::with_processors(1)
    }
}

impl QueueOptions {
    /// Defaults for `processors` counted processors (`newBatchThreshold` is
    /// `batchSize / 2 × processors`; 1 on a `Dynamic` SKU).
    pub fn with_processors(processors: usize) -> Self {
        Self {
            batch_size: 16,
            new_batch_threshold: 8 * processors.max(1),
            max_dequeue_count: 5,
            visibility_timeout: Duration::ZERO,
            max_polling_interval: Duration::from_secs(60),
            message_encoding: MessageEncoding::Base64,
            function_timeout: Duration::from_secs(300),
        }
    }

    /// The options a `host.json` sets, over the defaults for `processors`.
    pub fn from_host_json(host_json: &Value, processors: usize) -> Result<Self, String> {
        let mut options = Self::with_processors(processors);
        if let Some(timeout) = host_json.get("functionTimeout") {
            options.function_timeout = time_span(timeout)?;
        }
        let Some(queues) = host_json.pointer("/extensions/queues") else {
            return Ok(options);
        };
        let get = |key: &str| {
            queues
                .as_object()
                .and_then(|q| q.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)))
                .map(|(_, v)| v)
        };
        let count = |v: &Value, key: &str| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("extensions.queues.{key} must be a whole number"))
        };
        if let Some(v) = get("batchSize") {
            options.batch_size = count(v, "batchSize")?.clamp(1, 32);
            options.new_batch_threshold = options.batch_size / 2 * processors.max(1);
        }
        if let Some(v) = get("newBatchThreshold") {
            options.new_batch_threshold = count(v, "newBatchThreshold")?;
        }
        if let Some(v) = get("maxDequeueCount") {
            options.max_dequeue_count =
                i64::try_from(count(v, "maxDequeueCount")?.max(1)).map_err(|e| e.to_string())?;
        }
        if let Some(v) = get("visibilityTimeout") {
            options.visibility_timeout = time_span(v)?;
        }
        if let Some(v) = get("maxPollingInterval") {
            options.max_polling_interval = time_span(v)?;
        }
        if let Some(v) = get("messageEncoding") {
            options.message_encoding = match v.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("base64") => MessageEncoding::Base64,
                Some("none") => MessageEncoding::None,
                _ => return Err(format!("unknown messageEncoding {v}")),
            };
        }
        Ok(options)
    }
}

/// A .NET `TimeSpan` as host.json writes it: `"[d.]hh:mm:ss[.fffffff]"`, or
/// milliseconds as a number (maxPollingInterval accepts both).
pub fn time_span(value: &Value) -> Result<Duration, String> {
    if let Some(ms) = value.as_u64() {
        return Ok(Duration::from_millis(ms));
    }
    let text = value
        .as_str()
        .ok_or_else(|| format!("{value} is not a time span"))?;
    let bad = || format!("{text:?} is not a time span (d.hh:mm:ss)");
    let (days, clock) = match text.split_once('.') {
        Some((d, rest)) if rest.contains(':') && !d.contains(':') => {
            (d.parse::<u64>().map_err(|_| bad())?, rest)
        }
        _ => (0, text),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let [h, m, s] = parts.as_slice() else {
        return Err(bad());
    };
    let (h, m) = (
        h.parse::<u64>().map_err(|_| bad())?,
        m.parse::<u64>().map_err(|_| bad())?,
    );
    let s = s.parse::<f64>().map_err(|_| bad())?;
    if !(s.is_finite() && s >= 0.0) {
        return Err(bad());
    }
    Ok(Duration::from_secs((days * 24 + h) * 3600 + m * 60) + Duration::from_secs_f64(s))
}

/// A storage account as a connection string names it.
#[derive(Debug, Clone)]
pub struct StorageAccount {
    pub queue_endpoint: Url,
    pub account: String,
    pub key: Vec<u8>,
}

impl StorageAccount {
    /// Parses a key connection string (`AccountName`, `AccountKey`,
    /// `QueueEndpoint` or `DefaultEndpointsProtocol` + `EndpointSuffix`).
    pub fn from_connection_string(text: &str) -> Result<Self, String> {
        let mut parts = BTreeMap::new();
        for part in text.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("connection string part {part:?} has no '='"))?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        let account = parts
            .get("accountname")
            .cloned()
            .ok_or("the connection string has no AccountName")?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(parts.get("accountkey").ok_or("no AccountKey")?)
            .map_err(|e| format!("AccountKey: {e}"))?;
        let queue_endpoint = match parts.get("queueendpoint") {
            Some(endpoint) => endpoint.clone(),
            None => format!(
                "{}://{account}.queue.{}",
                parts
                    .get("defaultendpointsprotocol")
                    .map_or("https", String::as_str),
                parts
                    .get("endpointsuffix")
                    .map_or("core.windows.net", String::as_str)
            ),
        };
        Ok(Self {
            queue_endpoint: Url::parse(&queue_endpoint).map_err(|e| e.to_string())?,
            account,
            key,
        })
    }

    /// A client for `queue`, signed with an account SAS made from the key.
    pub fn queue(&self, queue: &str) -> Result<QueueClient, BoxError> {
        let mut url = self.queue_endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| "the queue endpoint cannot be a base")?
            .pop_if_empty()
            .push(queue);
        let now = OffsetDateTime::now_utc();
        url.set_query(Some(
            &restrict_code_execution::coordination::sas::account_sas(
                &self.account,
                &self.key,
                now - time::Duration::minutes(15),
                now + time::Duration::days(2),
            ),
        ));
        Ok(QueueClient::new(url, None, None)?)
    }
}

// ---------------------------------------------------------------------------
// The queue trigger.
// ---------------------------------------------------------------------------

/// How one invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx, JSON content type, JSON object body.
    Succeeded { status: u16 },
    /// The host counts it as a failure; `reason` says why.
    Failed { status: Option<u16>, reason: String },
    /// No answer within `functionTimeout` (the real host restarts the handler).
    TimedOut,
}

/// Something the emulated host did, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEvent {
    Invoked {
        message_id: String,
        dequeue_count: i64,
        invocation_id: String,
        /// The exact JSON body posted.
        envelope: Value,
        outcome: Outcome,
    },
    Deleted {
        message_id: String,
    },
    /// Visible again after `visibility` (the failure path).
    Released {
        message_id: String,
        dequeue_count: i64,
        visibility: Duration,
    },
    /// Copied to the poison queue and deleted.
    Poisoned {
        message_id: String,
        dequeue_count: i64,
        reason: PoisonReason,
    },
    /// Failed with no poison queue: left invisible for the rest of its lease.
    Abandoned {
        message_id: String,
    },
    /// Its visibility renewed while the invocation ran.
    Renewed {
        message_id: String,
    },
    /// A storage call failed (the host logs it and carries on).
    StorageError {
        what: String,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonReason {
    /// Not valid base64: moved before any invocation.
    Undecodable,
    /// `DequeueCount > maxDequeueCount` when received: moved without invoking.
    DequeuedTooOften,
    /// The invocation failed with `DequeueCount >= maxDequeueCount`.
    LastAttemptFailed,
}

/// Counters of what the emulated host asked of storage.
#[derive(Debug, Default)]
pub struct StorageCounts {
    pub receives: AtomicU64,
    pub deletes: AtomicU64,
    pub updates: AtomicU64,
    pub poison_sends: AtomicU64,
}

impl StorageCounts {
    pub fn total(&self) -> u64 {
        [
            &self.receives,
            &self.deletes,
            &self.updates,
            &self.poison_sends,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

struct Shared {
    handler: String,
    trigger: QueueTrigger,
    options: QueueOptions,
    queue: QueueClient,
    poison: Option<QueueClient>,
    http: reqwest::Client,
    events: Mutex<Vec<HostEvent>>,
    in_flight: AtomicUsize,
    counts: StorageCounts,
}

impl Shared {
    fn record(&self, event: HostEvent) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }
}

/// One function's queue listener on one "instance", calling one handler.
pub struct QueueHost {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    listener: tokio::task::JoinHandle<()>,
}

impl QueueHost {
    /// Starts listening. `handler` is the handler's base URL
    /// (`http://127.0.0.1:PORT`); `settings` are the app settings
    /// (`trigger.connection` must name a key connection string).
    pub fn start(
        handler: &str,
        trigger: QueueTrigger,
        options: QueueOptions,
        settings: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, BoxError> {
        let connection = settings(&trigger.connection)
            .ok_or_else(|| format!("the app setting {} is not set", trigger.connection))?;
        let account = StorageAccount::from_connection_string(&connection)?;
        let queue = account.queue(&trigger.queue_name)?;
        // The extension has no poison queue for a poison queue, nor for a
        // name that would be too long (63 characters).
        let poison_name = format!("{}-poison", trigger.queue_name);
        let poison = (!trigger.queue_name.ends_with("-poison") && poison_name.len() <= 63)
            .then(|| account.queue(&poison_name))
            .transpose()?;
        let shared = Arc::new(Shared {
            handler: handler.trim_end_matches('/').to_owned(),
            trigger,
            options,
            queue,
            poison,
            http: reqwest::Client::builder().build()?,
            events: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            counts: StorageCounts::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let listener = tokio::spawn(listen(shared.clone(), stopped));
        Ok(Self {
            shared,
            stop,
            listener,
        })
    }

    /// Everything done so far, in order.
    pub fn events(&self) -> Vec<HostEvent> {
        self.shared
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Invocations running now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    pub fn storage(&self) -> &StorageCounts {
        &self.shared.counts
    }

    /// Stops fetching and waits for the invocations in flight to end.
    pub async fn stop(self) -> Vec<HostEvent> {
        self.stop.send_replace(true);
        let Self {
            shared, listener, ..
        } = self;
        let _ = listener.await;
        let events = shared.events.lock();
        events
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops at once, as a killed instance: invocations in flight are
    /// dropped and their messages stay invisible until their lease ends.
    pub fn kill(self) -> Vec<HostEvent> {
        self.listener.abort();
        self.events()
    }
}

const MIN_POLL: Duration = Duration::from_millis(100);

async fn listen(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let mut running: JoinSet<()> = JoinSet::new();
    let mut backoff = MIN_POLL;
    let batch = i32::try_from(shared.options.batch_size).unwrap_or(32);
    let visibility = i32::try_from(RECEIVE_VISIBILITY.as_secs()).unwrap_or(600);
    loop {
        if *stopped.borrow() {
            break;
        }
        // Fetch the next batch only once few enough are still running.
        while running.len() > shared.options.new_batch_threshold {
            running.join_next().await;
        }
        while running.try_join_next().is_some() {}
        shared.counts.receives.fetch_add(1, Ordering::Relaxed);
        let received = shared
            .queue
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(batch),
                visibility_timeout: Some(visibility),
                ..Default::default()
            }))
            .await;
        let messages = match received {
            Ok(response) => match response.into_model() {
                Ok(model) => model.items.unwrap_or_default(),
                Err(e) => {
                    shared.record(storage_error("receive", &e));
                    Vec::new()
                }
            },
            // A queue that does not exist yet is an empty one.
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Vec::new(),
            Err(e) => {
                shared.record(storage_error("receive", &e));
                Vec::new()
            }
        };
        if messages.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stopped.changed() => {}
            }
            backoff = (backoff * 2).min(shared.options.max_polling_interval.max(MIN_POLL));
            continue;
        }
        backoff = MIN_POLL;
        for message in messages {
            let shared = shared.clone();
            shared.in_flight.fetch_add(1, Ordering::Relaxed);
            running.spawn(async move {
                process(&shared, message).await;
                shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    while running.join_next().await.is_some() {}
}

fn storage_error(what: &str, error: &azure_core::Error) -> HostEvent {
    HostEvent::StorageError {
        what: what.to_owned(),
        error: error.to_string(),
    }
}

/// One received message, from decoding to delete, release or poison.
async fn process(shared: &Shared, message: ReceivedMessage) {
    let (Some(id), Some(mut receipt)) = (message.message_id.clone(), message.pop_receipt.clone())
    else {
        return;
    };
    let dequeue_count = message.dequeue_count.unwrap_or(1);
    let raw = message.message_text.clone().unwrap_or_default();
    let bytes = match shared.options.message_encoding {
        MessageEncoding::None => raw.clone().into_bytes(),
        MessageEncoding::Base64 => {
            match base64::engine::general_purpose::STANDARD.decode(raw.trim()) {
                Ok(bytes) => bytes,
                Err(_) => {
                    poison(
                        shared,
                        &id,
                        &receipt,
                        &raw,
                        dequeue_count,
                        PoisonReason::Undecodable,
                    )
                    .await;
                    return;
                }
            }
        }
    };
    // A poison queue's own messages are not checked (extension 5.3.8 fixed
    // that): they have nowhere to go.
    if dequeue_count > shared.options.max_dequeue_count && shared.poison.is_some() {
        poison(
            shared,
            &id,
            &receipt,
            &raw,
            dequeue_count,
            PoisonReason::DequeuedTooOften,
        )
        .await;
        return;
    }
    let outcome = match String::from_utf8(bytes.clone()) {
        Err(_) if !shared.trigger.binary => Outcome::Failed {
            status: None,
            reason: "the message is not UTF-8 text (binding failed)".to_owned(),
        },
        text => {
            let data = if shared.trigger.binary {
                Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes))
            } else {
                json_string(text.as_deref().unwrap_or_default())
            };
            let envelope = queue_envelope(
                &shared.trigger,
                &message,
                &id,
                &receipt,
                data,
                text.as_deref().ok(),
            );
            let invocation_id = uuid::Uuid::new_v4().to_string();
            let outcome =
                invoke_renewing(shared, &envelope, &invocation_id, &id, &mut receipt).await;
            shared.record(HostEvent::Invoked {
                message_id: id.clone(),
                dequeue_count,
                invocation_id,
                envelope,
                outcome: outcome.clone(),
            });
            outcome
        }
    };
    if matches!(outcome, Outcome::Succeeded { .. }) {
        shared.counts.deletes.fetch_add(1, Ordering::Relaxed);
        match shared.queue.delete_message(&id, &receipt, None).await {
            Ok(_) => shared.record(HostEvent::Deleted { message_id: id }),
            Err(e) => shared.record(storage_error("delete", &e)),
        }
        return;
    }
    if shared.poison.is_none() {
        shared.record(HostEvent::Abandoned { message_id: id });
        return;
    }
    if dequeue_count >= shared.options.max_dequeue_count {
        poison(
            shared,
            &id,
            &receipt,
            &raw,
            dequeue_count,
            PoisonReason::LastAttemptFailed,
        )
        .await;
        return;
    }
    let visibility = shared.options.visibility_timeout;
    shared.counts.updates.fetch_add(1, Ordering::Relaxed);
    let secs = i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX);
    match shared.queue.update_message(&id, &receipt, secs, None).await {
        Ok(_) => shared.record(HostEvent::Released {
            message_id: id,
            dequeue_count,
            visibility,
        }),
        Err(e) => shared.record(storage_error("update", &e)),
    }
}

/// The invocation, with the message's visibility renewed at half-life while
/// it runs (each renewal changes the pop receipt the delete needs).
async fn invoke_renewing(
    shared: &Shared,
    envelope: &Value,
    invocation_id: &str,
    id: &str,
    receipt: &mut String,
) -> Outcome {
    let call = invoke(
        &shared.http,
        &shared.handler,
        &shared.trigger.function,
        envelope,
        invocation_id,
        shared.options.function_timeout,
    );
    tokio::pin!(call);
    let half = RECEIVE_VISIBILITY / 2;
    loop {
        tokio::select! {
            outcome = &mut call => return outcome,
            () = tokio::time::sleep(half) => {
                shared.counts.updates.fetch_add(1, Ordering::Relaxed);
                let secs = i32::try_from(RECEIVE_VISIBILITY.as_secs()).unwrap_or(600);
                match shared.queue.update_message(id, receipt, secs, None).await {
                    Ok(response) => {
                        if let Some(next) = response
                            .headers()
                            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("x-ms-popreceipt"))
                        {
                            *receipt = next.to_owned();
                        }
                        shared.record(HostEvent::Renewed { message_id: id.to_owned() });
                    }
                    Err(e) => shared.record(storage_error("renew", &e)),
                }
            }
        }
    }
}

/// Copies the message text unchanged to `<queue>-poison` (created when
/// missing) and deletes it from the queue.
async fn poison(
    shared: &Shared,
    id: &str,
    receipt: &str,
    raw: &str,
    dequeue_count: i64,
    reason: PoisonReason,
) {
    let Some(poison) = &shared.poison else {
        shared.record(HostEvent::Abandoned {
            message_id: id.to_owned(),
        });
        return;
    };
    let send = || async {
        shared.counts.poison_sends.fetch_add(1, Ordering::Relaxed);
        let message = QueueMessage {
            message_text: Some(raw.to_owned()),
        };
        let content: RequestContent<QueueMessage, _> = message.try_into()?;
        poison.send_message(content, None).await
    };
    let mut sent = send().await;
    if sent
        .as_ref()
        .is_err_and(|e| e.http_status() == Some(StatusCode::NotFound))
    {
        let _ = poison.create(None).await;
        sent = send().await;
    }
    if let Err(e) = sent {
        shared.record(storage_error("poison", &e));
        return;
    }
    shared.counts.deletes.fetch_add(1, Ordering::Relaxed);
    match shared.queue.delete_message(id, receipt, None).await {
        Ok(_) => shared.record(HostEvent::Poisoned {
            message_id: id.to_owned(),
            dequeue_count,
            reason,
        }),
        Err(e) => shared.record(storage_error("delete after poison", &e)),
    }
}

/// A string the way the host serializes a non-object value: JSON-encoded,
/// so the handler sees a JSON string containing a JSON string.
fn json_string(text: &str) -> Value {
    Value::String(Value::String(text.to_owned()).to_string())
}

/// `2024-10-25T10:00:00+00:00`: the host re-parses a DateTimeOffset from its
/// text, which drops the fraction.
pub fn iso_seconds(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `sys`: the function name, the time with 7 fractional digits, a GUID.
pub fn sys(function: &str) -> Value {
    let now = OffsetDateTime::now_utc();
    let seconds = iso_seconds(now);
    let utc_now = format!(
        "{}.{:07}Z",
        &seconds[..seconds.len() - "+00:00".len()],
        now.nanosecond() / 100
    );
    json!({
        "MethodName": function,
        "UtcNow": utc_now,
        "RandGuid": uuid::Uuid::new_v4().to_string(),
    })
}

/// The payload-mode body for one queue message.
pub fn queue_envelope(
    trigger: &QueueTrigger,
    message: &ReceivedMessage,
    id: &str,
    receipt: &str,
    data: Value,
    text: Option<&str>,
) -> Value {
    // The trigger's binding data, in the extension's order.
    let mut binding: Vec<(String, Value)> = Vec::new();
    binding.push((
        "DequeueCount".to_owned(),
        Value::String(message.dequeue_count.unwrap_or(1).to_string()),
    ));
    let time = |t: Option<OffsetDateTime>| t.map(|t| Value::String(iso_seconds(t)));
    for (key, value) in [
        ("ExpirationTime", time(message.expiration_time)),
        ("Id", Some(json_string(id))),
        ("InsertionTime", time(message.insertion_time)),
        ("NextVisibleTime", time(message.time_next_visible)),
        ("PopReceipt", Some(json_string(receipt))),
    ] {
        if let Some(value) = value {
            binding.push((key.to_owned(), value));
        }
    }
    // A JSON object message adds its top-level properties (the host's
    // ApplyBindingData): objects stay objects, other values become their text
    // (42 → "42", true → "True"), arrays and nulls are skipped; a key that is
    // already there (compared ignoring case) is replaced.
    if let Some(Ok(Value::Object(fields))) = text.map(serde_json::from_str::<Value>) {
        for (key, value) in fields {
            let value = match value {
                Value::Object(_) => value,
                Value::Array(_) | Value::Null => continue,
                Value::String(s) => json_string(&s),
                Value::Bool(b) => json_string(if b { "True" } else { "False" }),
                Value::Number(n) => json_string(&n.to_string()),
            };
            match binding
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(&key))
            {
                Some(slot) => slot.1 = value,
                None => binding.push((key, value)),
            }
        }
    }
    let mut metadata = Map::new();
    for (key, value) in binding {
        // The host leaves out every key ending in "trigger".
        if key.to_ascii_lowercase().ends_with("trigger") {
            continue;
        }
        metadata.insert(key, value);
    }
    metadata.insert("sys".to_owned(), sys(&trigger.function));
    let mut data_map = Map::new();
    data_map.insert(trigger.name.clone(), data);
    json!({"Data": data_map, "Metadata": metadata})
}

/// One payload-mode POST with the host's headers and a chunked body, judged
/// as the host judges the answer.
pub async fn invoke(
    http: &reqwest::Client,
    handler: &str,
    function: &str,
    envelope: &Value,
    invocation_id: &str,
    function_timeout: Duration,
) -> Outcome {
    let body = envelope.to_string().into_bytes();
    // A stream has no length: reqwest sends it chunked, as the host does.
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(body)]);
    let request = http
        .post(format!("{handler}/{function}"))
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("X-Azure-Functions-InvocationId", invocation_id)
        .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
        .header("Content-Type", "application/json; charset=utf-8")
        .body(reqwest::Body::wrap_stream(stream));
    let call = async {
        let response = request.send().await.map_err(|e| Outcome::Failed {
            status: None,
            reason: format!("connection: {e}"),
        })?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            return Err(Outcome::Failed {
                status: Some(status),
                reason: format!("status {status}"),
            });
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if content_type != "application/json" && content_type != "text/json" {
            return Err(Outcome::Failed {
                status: Some(status),
                reason: format!("content type {content_type:?} (UnsupportedMediaType)"),
            });
        }
        let text = response.text().await.map_err(|e| Outcome::Failed {
            status: Some(status),
            reason: format!("body: {e}"),
        })?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(_)) => Ok(Outcome::Succeeded { status }),
            // Nothing to complete the invocation with: it hangs until
            // functionTimeout.
            Ok(Value::Null) => Ok(Outcome::TimedOut),
            _ if text.trim().is_empty() => Ok(Outcome::TimedOut),
            _ => Err(Outcome::Failed {
                status: Some(status),
                reason: "the body is not a JSON object".to_owned(),
            }),
        }
    };
    let deadline = tokio::time::Instant::now() + function_timeout;
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Outcome::TimedOut,
        Ok(Ok(Outcome::TimedOut)) => {
            // Nothing completes the invocation: the host waits out the rest
            // of functionTimeout, the message still invisible.
            tokio::time::sleep_until(deadline).await;
            Outcome::TimedOut
        }
        Ok(Ok(outcome) | Err(outcome)) => outcome,
    }
}

// ---------------------------------------------------------------------------
// The timer trigger.
// ---------------------------------------------------------------------------

/// A function's `timerTrigger` binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerTrigger {
    pub function: String,
    pub name: String,
    /// `schedule`, `%SETTING%` resolved: a CRON expression or a TimeSpan.
    pub schedule: String,
    /// `useMonitor` (default true; off for schedules more often than a minute).
    pub use_monitor: bool,
}

impl TimerTrigger {
    pub fn from_function_json(
        function: &str,
        function_json: &Value,
        settings: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let binding = trigger_binding(function_json, "timerTrigger")?;
        let name = binding
            .get("name")
            .and_then(Value::as_str)
            .ok_or("the timerTrigger binding has no name")?
            .to_owned();
        let schedule = resolve(
            binding
                .get("schedule")
                .and_then(Value::as_str)
                .ok_or("the timerTrigger binding has no schedule")?,
            settings,
        )?;
        let every = Self::period_of(&schedule);
        let use_monitor = binding
            .get("useMonitor")
            .and_then(Value::as_bool)
            .unwrap_or(true)
            && every.is_none_or(|p| p >= Duration::from_secs(60));
        Ok(Self {
            function: function.to_owned(),
            name,
            schedule,
            use_monitor,
        })
    }

    pub fn from_app(
        app_root: &std::path::Path,
        function: &str,
        settings: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        Self::from_function_json(function, &read_function_json(app_root, function)?, settings)
    }

    /// A CRON schedule adjusts for DST; a TimeSpan one does not.
    pub fn is_cron(&self) -> bool {
        !self.schedule.contains(':')
    }

    /// The period of a TimeSpan schedule, or of the CRON forms
    /// `0 */N * * * *` (every N minutes) and `*/N * * * * *` (seconds).
    pub fn period(&self) -> Option<Duration> {
        Self::period_of(&self.schedule)
    }

    fn period_of(schedule: &str) -> Option<Duration> {
        if schedule.contains(':') {
            return time_span(&Value::String(schedule.to_owned())).ok();
        }
        let fields: Vec<&str> = schedule.split_whitespace().collect();
        let every = |f: &str| match f {
            "*" => Some(1),
            f => f.strip_prefix("*/").and_then(|n| n.parse::<u64>().ok()),
        };
        match fields.as_slice() {
            [s, "*", "*", "*", "*", "*"] => every(s).map(Duration::from_secs),
            ["0", m, "*", "*", "*", "*"] => every(m).map(|n| Duration::from_secs(60 * n)),
            _ => None,
        }
    }
}

/// `ScheduleStatus`: the schedule's state before this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleStatus {
    pub last: OffsetDateTime,
    pub next: OffsetDateTime,
    pub last_updated: OffsetDateTime,
}

/// `Data.<name>` of a timer invocation (a JSON object, not a string).
pub fn timer_info(
    trigger: &TimerTrigger,
    status: Option<ScheduleStatus>,
    is_past_due: bool,
) -> Value {
    let when = |t: OffsetDateTime| {
        t.to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .unwrap_or_default()
            .replace('Z', "+00:00")
    };
    json!({
        "Schedule": {"AdjustForDST": trigger.is_cron()},
        "ScheduleStatus": status.map(|s| json!({
            "Last": when(s.last),
            "Next": when(s.next),
            "LastUpdated": when(s.last_updated),
        })),
        "IsPastDue": is_past_due,
    })
}

/// The whole timer invocation body: `Metadata` holds only `sys`.
pub fn timer_envelope(
    trigger: &TimerTrigger,
    status: Option<ScheduleStatus>,
    is_past_due: bool,
) -> Value {
    let mut data = Map::new();
    data.insert(
        trigger.name.clone(),
        timer_info(trigger, status, is_past_due),
    );
    json!({"Data": data, "Metadata": {"sys": sys(&trigger.function)}})
}

/// Fires the timer once, as the host does; the outcome is only recorded
/// (the host never retries a timer run).
pub async fn fire_timer(
    http: &reqwest::Client,
    handler: &str,
    trigger: &TimerTrigger,
    status: Option<ScheduleStatus>,
    is_past_due: bool,
    function_timeout: Duration,
) -> (Value, Outcome) {
    let envelope = timer_envelope(trigger, status, is_past_due);
    let outcome = invoke(
        http,
        handler.trim_end_matches('/'),
        &trigger.function,
        &envelope,
        &uuid::Uuid::new_v4().to_string(),
        function_timeout,
    )
    .await;
    (envelope, outcome)
}

/// A timer that fires every `period` on one instance (the host's singleton
/// lock keeps a timer on one instance at a time), keeping the schedule status
/// the host's monitor would: `Last` the previous run (year 1 before the
/// first), `Next` this occurrence.
pub struct TimerHost {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(Value, Outcome)>>,
}

impl TimerHost {
    pub fn start(
        handler: &str,
        trigger: TimerTrigger,
        period: Duration,
        function_timeout: Duration,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let handler = handler.to_owned();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut runs = Vec::new();
            let mut last = OffsetDateTime::new_utc(
                time::Date::from_ordinal_date(1, 1).unwrap_or(time::Date::MIN),
                time::Time::MIDNIGHT,
            );
            let mut next = OffsetDateTime::now_utc() + period;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    _ = stopped.changed() => return runs,
                }
                let status = trigger.use_monitor.then_some(ScheduleStatus {
                    last,
                    next,
                    last_updated: last,
                });
                runs.push(
                    fire_timer(&http, &handler, &trigger, status, false, function_timeout).await,
                );
                last = OffsetDateTime::now_utc();
                next = last + period;
            }
        });
        Self { stop, task }
    }

    /// Stops the timer; every run's body and outcome.
    pub async fn stop(self) -> Vec<(Value, Outcome)> {
        self.stop.send_replace(true);
        self.task.await.unwrap_or_default()
    }
}
