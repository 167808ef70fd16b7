//! Where containment jobs put their messages: the Storage queue the Functions
//! host's queue trigger reads ([`StorageQueue`]), or, without Azure
//! (`--simulate`, `COORDINATION=local`), a queue in this process that
//! delivers the way the host does ([`LocalQueue`]).
//!
//! Both take the message as its JSON text and a delay before it becomes
//! visible. [`StorageQueue`] writes it the way the host's trigger reads it
//! with its default `messageEncoding` (base64 of the UTF-8 text).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use azure_core::{
    credentials::TokenCredential,
    http::{ClientOptions, RequestContent, RetryOptions, policies::Policy},
};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use azure_storage_queue::{
    QueueClient, QueueClientOptions,
    models::{QueueClientSendMessageOptions, QueueMessage},
};
use base64::Engine as _;
use futures_util::future::BoxFuture;
use time::OffsetDateTime;
use tokio::{sync::Notify, time::Instant};
use url::Url;

use super::{
    CoordinationError,
    sas::account_sas,
    settings::{QUEUE_SERVICE_URI, StorageAuth, StorageSettings},
    store::{classify, unavailable},
};

/// The longest a message can be kept invisible (the queue service's limit).
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Somewhere to send a job's messages.
#[async_trait]
pub trait MessageQueue: std::fmt::Debug + Send + Sync {
    /// Send `text` (JSON), visible after `delay` (0 to 7 days).
    async fn send(&self, text: &str, delay: Duration) -> Result<(), CoordinationError>;

    /// Whether messages live only in this process's memory.
    fn in_memory(&self) -> bool;
}

/// A queue of the app's storage account.
pub struct StorageQueue {
    queue_url: Url,
    auth: QueueAuth,
    options: QueueClientOptions,
    timeout: Duration,
}

enum QueueAuth {
    Token(Arc<dyn TokenCredential>),
    Sas(String),
    Key { account: String, key: Vec<u8> },
}

impl std::fmt::Debug for StorageQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageQueue")
            .field("queue_url", &self.queue_url.as_str())
            .finish_non_exhaustive()
    }
}

impl StorageQueue {
    /// The queue `name` of the account `settings` point at; `count` counts
    /// each request into the coordination totals.
    pub fn new(
        settings: &StorageSettings,
        name: &str,
        timeout: Duration,
        count: Option<Arc<dyn Policy>>,
    ) -> Result<Self, CoordinationError> {
        let mut queue_url = settings.queue_endpoint.clone().ok_or_else(|| {
            unavailable(format!(
                "the queue service of the storage account is not known: set {QUEUE_SERVICE_URI} \
                 (identity-based connection) or QueueEndpoint in the connection string"
            ))
        })?;
        queue_url.set_query(None);
        queue_url
            .path_segments_mut()
            .map_err(|()| unavailable("the queue endpoint cannot hold a queue path"))?
            .pop_if_empty()
            .push(name);
        let auth = match &settings.auth {
            StorageAuth::ManagedIdentity { client_id } => QueueAuth::Token(
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    ..Default::default()
                }))
                .map_err(|_| unavailable("the managed identity credential could not be built"))?,
            ),
            StorageAuth::Sas(sas) => QueueAuth::Sas(sas.clone()),
            StorageAuth::AccountKey { account, key } => QueueAuth::Key {
                account: account.clone(),
                key: key.clone(),
            },
        };
        let options = QueueClientOptions {
            client_options: ClientOptions {
                // The caller retries what is safe: a send that timed out may
                // have been stored, and a second copy is harmless but not free.
                retry: RetryOptions::none(),
                per_try_policies: count.into_iter().collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(Self {
            queue_url,
            auth,
            options,
            timeout,
        })
    }

    fn client(&self) -> Result<QueueClient, CoordinationError> {
        let mut url = self.queue_url.clone();
        let credential = match &self.auth {
            QueueAuth::Token(credential) => Some(credential.clone()),
            QueueAuth::Sas(sas) => {
                url.set_query(Some(sas));
                None
            }
            // Signing is an HMAC: derived afresh for each client, it never expires in use.
            QueueAuth::Key { account, key } => {
                let now = OffsetDateTime::now_utc();
                url.set_query(Some(&account_sas(
                    account,
                    key,
                    now - time::Duration::minutes(15),
                    now + time::Duration::hours(1),
                )));
                None
            }
        };
        QueueClient::new(url, credential, Some(self.options.clone()))
            .map_err(|_| unavailable("the queue client could not be built"))
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = azure_core::Result<T>>,
    ) -> Result<Result<T, u16>, CoordinationError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(Ok(value)),
            Ok(Err(error)) => {
                classify(what, "storage credentials", &error).map(|refusal| Err(refusal.status))
            }
            Err(_) => Err(unavailable(format!(
                "{what} timed out after {} s",
                self.timeout.as_secs_f32()
            ))),
        }
    }
}

#[async_trait]
impl MessageQueue for StorageQueue {
    async fn send(&self, text: &str, delay: Duration) -> Result<(), CoordinationError> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
        let delay = delay.min(MAX_DELAY).as_secs();
        let mut created = false;
        loop {
            let client = self.client()?;
            let message: RequestContent<QueueMessage, _> = QueueMessage {
                message_text: Some(encoded.clone()),
            }
            .try_into()
            .map_err(|_| unavailable("the queue message could not be encoded"))?;
            let options = QueueClientSendMessageOptions {
                visibility_timeout: (delay > 0).then(|| i32::try_from(delay).unwrap_or(i32::MAX)),
                ..Default::default()
            };
            match self
                .call(
                    "sending a job message",
                    client.send_message(message, Some(options)),
                )
                .await?
            {
                Ok(_) => return Ok(()),
                // The queue is made on first use.
                Err(404) if !created => {
                    created = true;
                    match self
                        .call("creating the job queue", client.create(None))
                        .await?
                    {
                        Ok(_) | Err(409) => {}
                        Err(status) => {
                            return Err(unavailable(format!(
                                "storage answered {status} while creating the job queue"
                            )));
                        }
                    }
                }
                Err(status) => {
                    return Err(unavailable(format!(
                        "storage answered {status} while sending a job message"
                    )));
                }
            }
        }
    }

    fn in_memory(&self) -> bool {
        false
    }
}

/// A queue the settings do not name: every send fails with the reason, so
/// that jobs answer 503 naming the missing setting while everything else runs.
#[derive(Debug)]
pub struct MissingQueue(pub CoordinationError);

#[async_trait]
impl MessageQueue for MissingQueue {
    async fn send(&self, _text: &str, _delay: Duration) -> Result<(), CoordinationError> {
        Err(self.0.clone())
    }

    fn in_memory(&self) -> bool {
        false
    }
}

/// One delivery of a message, as the host gives it to a function.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    /// The message's text (already decoded).
    pub text: String,
    /// 1 on the first delivery.
    pub dequeue_count: u32,
}

/// Runs a function on a delivery; `Err` fails the invocation.
pub type Handler = Arc<dyn Fn(Delivery) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The host's delivery rules (`extensions.queues` in `host.json`).
#[derive(Debug, Clone, Copy)]
pub struct DeliveryRules {
    /// Deliveries after which a failing message is moved to the poison queue.
    pub max_dequeue_count: u32,
    /// How long a failed message stays invisible before it is delivered again.
    pub visibility_timeout: Duration,
    /// Messages run at once (`batchSize` + `newBatchThreshold`).
    pub concurrency: usize,
}

impl Default for DeliveryRules {
    fn default() -> Self {
        Self {
            max_dequeue_count: 5,
            visibility_timeout: Duration::ZERO,
            concurrency: 6,
        }
    }
}

/// A queue in this process's memory, with a poison queue beside it, that
/// delivers as the host's queue trigger does: at least once, a failed
/// message visible again after the visibility timeout with its dequeue
/// count up, moved to the poison queue once it failed `max_dequeue_count`
/// times. It stands in for the host where there is none: one process, no
/// durability.
#[derive(Debug, Clone)]
pub struct LocalQueue {
    inner: Arc<LocalInner>,
}

#[derive(Debug)]
struct LocalInner {
    rules: DeliveryRules,
    messages: Mutex<Vec<LocalMessage>>,
    wake: Notify,
    poison: Option<LocalQueue>,
}

#[derive(Debug, Clone)]
struct LocalMessage {
    id: String,
    text: String,
    visible_at: Instant,
    dequeue_count: u32,
    running: bool,
}

impl LocalQueue {
    /// A queue and its poison queue (`<name>-poison`), idle until [`Self::start`].
    pub fn new(rules: DeliveryRules) -> Self {
        let poison = Self::single(rules, None);
        Self::single(rules, Some(poison))
    }

    fn single(rules: DeliveryRules, poison: Option<LocalQueue>) -> Self {
        Self {
            inner: Arc::new(LocalInner {
                rules,
                messages: Mutex::new(Vec::new()),
                wake: Notify::new(),
                poison,
            }),
        }
    }

    /// Deliver this queue's messages to `worker` and the poison queue's to
    /// `poison`, on tasks of their own, for as long as the process runs.
    pub fn start(&self, worker: Handler, poison: Handler) {
        if let Some(queue) = &self.inner.poison {
            tokio::spawn(queue.clone().deliver(poison));
        }
        tokio::spawn(self.clone().deliver(worker));
    }

    /// Messages waiting or running (tests).
    pub fn len(&self) -> usize {
        self.inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, text: String, delay: Duration, dequeue_count: u32) {
        self.inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(LocalMessage {
                id: uuid::Uuid::new_v4().to_string(),
                text,
                visible_at: Instant::now() + delay,
                dequeue_count,
                running: false,
            });
        self.inner.wake.notify_one();
    }

    async fn deliver(self, handler: Handler) {
        let running = Arc::new(tokio::sync::Semaphore::new(
            self.inner.rules.concurrency.max(1),
        ));
        loop {
            let Ok(permit) = running.clone().acquire_owned().await else {
                return;
            };
            let next = {
                let mut messages = self
                    .inner
                    .messages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let visible = messages
                    .iter_mut()
                    .filter(|m| !m.running && m.visible_at <= now)
                    .min_by_key(|m| m.visible_at);
                match visible {
                    Some(message) => {
                        message.running = true;
                        message.dequeue_count += 1;
                        Ok(message.clone())
                    }
                    None => Err(messages
                        .iter()
                        .filter(|m| !m.running)
                        .map(|m| m.visible_at)
                        .min()),
                }
            };
            match next {
                Ok(message) => {
                    let queue = self.clone();
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let delivery = Delivery {
                            id: message.id.clone(),
                            text: message.text.clone(),
                            dequeue_count: message.dequeue_count,
                        };
                        let result = handler(delivery).await;
                        queue.settle(&message, result);
                        drop(permit);
                    });
                }
                Err(next_visible) => {
                    drop(permit);
                    let wake = self.inner.wake.notified();
                    match next_visible {
                        Some(at) => {
                            let _ = tokio::time::timeout_at(at, wake).await;
                        }
                        None => wake.await,
                    }
                }
            }
        }
    }

    /// After an invocation: delete on success; on failure, visible again
    /// after the visibility timeout, or to the poison queue after the last try.
    fn settle(&self, message: &LocalMessage, result: Result<(), String>) {
        let mut messages = self
            .inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(index) = messages.iter().position(|m| m.id == message.id) else {
            return;
        };
        match result {
            Ok(()) => {
                messages.remove(index);
            }
            Err(reason) => {
                let failed = &mut messages[index];
                if failed.dequeue_count >= self.inner.rules.max_dequeue_count {
                    let failed = messages.remove(index);
                    tracing::warn!(
                        message_id = %failed.id,
                        dequeue_count = failed.dequeue_count,
                        reason = %reason,
                        "message failed on its last delivery; moved to the poison queue"
                    );
                    if let Some(poison) = &self.inner.poison {
                        poison.push(failed.text, Duration::ZERO, 0);
                    }
                } else {
                    failed.running = false;
                    failed.visible_at = Instant::now() + self.inner.rules.visibility_timeout;
                }
            }
        }
        drop(messages);
        self.inner.wake.notify_one();
    }
}

#[async_trait]
impl MessageQueue for LocalQueue {
    async fn send(&self, text: &str, delay: Duration) -> Result<(), CoordinationError> {
        self.push(text.to_owned(), delay.min(MAX_DELAY), 0);
        Ok(())
    }

    fn in_memory(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_failing_message_is_delivered_max_dequeue_count_times_then_poisoned() {
        let queue = LocalQueue::new(DeliveryRules::default());
        let tries = Arc::new(AtomicU32::new(0));
        let poisoned = Arc::new(Mutex::new(Vec::new()));
        let (t, p) = (tries.clone(), poisoned.clone());
        queue.start(
            Arc::new(move |d: Delivery| {
                let t = t.clone();
                Box::pin(async move {
                    assert_eq!(d.dequeue_count, t.fetch_add(1, Ordering::SeqCst) + 1);
                    if d.text == "ok" {
                        Ok(())
                    } else {
                        Err("no".to_owned())
                    }
                })
            }),
            Arc::new(move |d: Delivery| {
                p.lock().unwrap().push((d.text, d.dequeue_count));
                Box::pin(async { Ok(()) })
            }),
        );
        queue.send("bad", Duration::ZERO).await.unwrap();
        for _ in 0..200 {
            if !poisoned.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tries.load(Ordering::SeqCst), 5);
        assert_eq!(*poisoned.lock().unwrap(), [("bad".to_owned(), 1)]);
        assert!(queue.is_empty());
    }
}
