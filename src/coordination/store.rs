//! The blob operations coordination needs, through `azure_storage_blob`.
//!
//! Every call is bounded by a timeout and counted (one count per HTTP request
//! sent to storage, by a pipeline policy). The SDK's own retries are off:
//! [`Store`] sends a request again itself only after an answer that says
//! storage was busy or failing, and only where a repeat is harmless
//! ([`Retry`]), with jittered exponential backoff within the caller's
//! deadline; the lock and the budget retry their own conflicts; everything
//! else fails closed at once. Answers that are part
//! of the protocol (404, 409, 412) come back as [`Refusal`]; every other
//! failure becomes [`CoordinationError::Unavailable`], with a reason built
//! from the status and storage error code only, never from the SDK's error
//! text (it can quote the URL, and with it a SAS).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::RwLock;

use async_trait::async_trait;
use azure_core::{
    credentials::TokenCredential,
    error::ErrorKind,
    http::{
        ClientOptions, Context, Etag, ExponentialRetryOptions, HttpClientOptions, Request,
        RequestContent, RetryOptions, Transport, new_http_client,
        policies::{Policy, PolicyResult},
    },
};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use azure_storage_blob::{
    BlobClient, BlobContainerClient, BlobContainerClientOptions,
    models::{
        BlobClientAcquireLeaseOptions, BlobClientDownloadOptions,
        BlobClientGetPropertiesResultHeaders, BlobClientSetMetadataOptions,
        BlobContainerClientListBlobsOptions, BlockBlobClientUploadOptions, LeaseStatus,
        ListBlobsIncludeItem,
    },
};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    CoordinationError,
    backoff::Backoff,
    sas::account_sas,
    settings::{StorageAuth, StorageSettings},
};

/// How long a derived SAS is valid, and how long before its end it is
/// derived again. The start is backdated for clock skew between us and storage.
const SAS_LIFETIME: time::Duration = time::Duration::hours(8);
const SAS_RENEW_BEFORE: time::Duration = time::Duration::hours(1);
const SAS_BACKDATE: time::Duration = time::Duration::minutes(15);

/// Retry-After when storage does not say: long enough for a blip to pass.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The first pause before trying a busy or failing storage request again,
/// and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Which failures a request may be sent again after.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Sending it again changes nothing the first try did not: reads, lease
    /// requests with our own ids, metadata under our lease, and conditional
    /// writes whose repeat is refused. Retried after 429, 500, 502, 503 and
    /// 504; and once, at once, after a connection that failed or was
    /// closed under the request: a pooled connection the server closed
    /// while idle (Azurite after 5 s, load balancers after minutes) fails
    /// the next request sent on it, which a second try on a new connection
    /// gets through. Only once: storage that cannot be reached at all
    /// fails the caller at once (fail closed), not at its deadline.
    Idempotent,
    /// A write conditioned on an ETag (or on the blob's absence): retried
    /// after 429, 500, 502, 503 and 504 like [`Retry::Idempotent`], whose
    /// repeat after a lost answer is refused 412 (or 409), and once after a
    /// connection that could not be made (nothing was sent); not after one
    /// lost under it. That write may have been applied, and a caller who
    /// reads a refusal as "someone else wrote" would apply its change again
    /// on a fresh read: the budget would count its slots twice, or give
    /// back two where one was meant.
    Conditional,
    /// Retried only after 429 and 503: storage throttling (`ServerBusy`)
    /// turns the request away before doing anything. A 500 may have been
    /// applied.
    Unprocessed,
}

impl Retry {
    fn after(self, error: &azure_core::Error) -> bool {
        matches!(
            (status(error), self),
            (Some(429 | 503), _)
                | (
                    Some(500 | 502 | 504),
                    Retry::Idempotent | Retry::Conditional
                )
        )
    }

    /// Whether a request whose connection was lost is sent again at once
    /// (only the first time: see [`Retry::Idempotent`]).
    fn after_lost_connection(self, error: &azure_core::Error) -> bool {
        match error.kind() {
            ErrorKind::Connection => matches!(self, Retry::Idempotent | Retry::Conditional),
            ErrorKind::Io => matches!(self, Retry::Idempotent),
            _ => false,
        }
    }
}

/// The HTTP status of a failed request, if storage answered.
fn status(error: &azure_core::Error) -> Option<u16> {
    match error.kind() {
        ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
        _ => None,
    }
}

/// The `Retry-After` storage sent with a failure, if any (capped).
fn retry_after(error: &azure_core::Error) -> Option<Duration> {
    match error.kind() {
        ErrorKind::HttpResponse { raw_response, .. } => raw_response
            .as_ref()?
            .headers()
            .get_optional_str(&azure_core::http::headers::RETRY_AFTER)?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|s| Duration::from_secs(s.min(300))),
        _ => None,
    }
}

/// A protocol answer the caller handles itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    /// The storage error code (`LeaseAlreadyPresent`, `BlobNotFound`, …).
    pub code: Option<String>,
}

impl Refusal {
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

type Outcome<T> = Result<Result<T, Refusal>, CoordinationError>;

/// A blob's lease, as a waiter sees it.
#[derive(Debug)]
pub(crate) struct BlobLease {
    pub leased: bool,
    pub metadata: std::collections::HashMap<String, String>,
}

/// The kinds of storage request coordination sends, for its totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    AcquireLease,
    RenewLease,
    ReleaseLease,
    /// A waiter's look at a held lease and its announcement (HEAD).
    Properties,
    /// A holder announcing when it expects to be done.
    Metadata,
    Read,
    Write,
    Other,
}

impl OperationKind {
    const ALL: [Self; 8] = [
        Self::AcquireLease,
        Self::RenewLease,
        Self::ReleaseLease,
        Self::Properties,
        Self::Metadata,
        Self::Read,
        Self::Write,
        Self::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::AcquireLease => "acquire_lease",
            Self::RenewLease => "renew_lease",
            Self::ReleaseLease => "release_lease",
            Self::Properties => "properties",
            Self::Metadata => "metadata",
            Self::Read => "read",
            Self::Write => "write",
            Self::Other => "other",
        }
    }

    fn of(request: &Request) -> Self {
        let comp = request
            .url()
            .query_pairs()
            .find(|(k, _)| k == "comp")
            .map(|(_, v)| v.into_owned());
        let method = request.method();
        match comp.as_deref() {
            Some("lease") => match request.headers().get_optional_str(
                &azure_core::http::headers::HeaderName::from_static("x-ms-lease-action"),
            ) {
                Some("acquire") => Self::AcquireLease,
                Some("renew") => Self::RenewLease,
                Some("release") => Self::ReleaseLease,
                _ => Self::Other,
            },
            Some("metadata") => Self::Metadata,
            Some(_) => Self::Other,
            None if method == azure_core::http::Method::Head => Self::Properties,
            None if method == azure_core::http::Method::Get => Self::Read,
            None if method == azure_core::http::Method::Put
                && !request.url().query_pairs().any(|(k, _)| k == "restype") =>
            {
                Self::Write
            }
            None => Self::Other,
        }
    }
}

/// HTTP requests sent to storage, by kind (one per try).
#[derive(Debug, Default)]
pub struct OperationCounts([AtomicU64; OperationKind::ALL.len()]);

impl OperationCounts {
    fn add(&self, kind: OperationKind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The non-zero counts, by kind.
    pub fn by_kind(&self) -> Vec<(&'static str, u64)> {
        OperationKind::ALL
            .iter()
            .map(|&kind| (kind.name(), self.0[kind as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// Counts every HTTP request the pipeline sends (one per try).
#[derive(Debug)]
struct CountRequests(Arc<OperationCounts>);

// The trait's `Context` lifetime is elided in its definition; the impl must
// elide it too.
#[allow(elided_lifetimes_in_paths)]
#[async_trait]
impl Policy for CountRequests {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.0.add(OperationKind::of(request));
        next[0].send(ctx, request, &next[1..]).await
    }
}

enum Auth {
    Token(Arc<dyn TokenCredential>),
    Sas(String),
    Key { account: String, key: Vec<u8> },
}

/// The container client, and when its derived SAS runs out (if it has one).
type Current = (Arc<BlobContainerClient>, Option<OffsetDateTime>);

/// The coordination container in the host's storage account.
pub(crate) struct Store {
    container_url: url::Url,
    auth: Auth,
    description: String,
    options: BlobContainerClientOptions,
    current: RwLock<Option<Current>>,
    operations: Arc<OperationCounts>,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("container_url", &self.container_url.as_str())
            .field("auth", &self.description)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Build the clients; nothing is sent until the first operation.
    pub fn new(
        settings: &StorageSettings,
        timeout: Duration,
        http: Option<reqwest::Client>,
    ) -> Result<Self, CoordinationError> {
        let operations = Arc::new(OperationCounts::default());
        let transport = match http {
            Some(client) => Transport::new(Arc::new(client)),
            // The storage crate's own default: decompression off.
            None => Transport::new(new_http_client(Some(HttpClientOptions {
                automatic_decompression: false,
            }))),
        };
        let client_options = ClientOptions {
            retry: RetryOptions::none(),
            per_try_policies: vec![Arc::new(CountRequests(operations.clone()))],
            transport: Some(transport.clone()),
            ..Default::default()
        };
        let auth = match &settings.auth {
            StorageAuth::ManagedIdentity { client_id } => {
                let credential =
                    ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                        user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                        client_options: ClientOptions {
                            // A few quick retries inside our own timeout; the
                            // default can block for about 80 s.
                            retry: RetryOptions::exponential(ExponentialRetryOptions {
                                initial_delay: azure_core::time::Duration::milliseconds(200),
                                max_retries: 2,
                                max_total_elapsed: azure_core::time::Duration::seconds(5),
                                max_delay: azure_core::time::Duration::seconds(1),
                            }),
                            transport: Some(transport),
                            ..Default::default()
                        },
                    }))
                    .map_err(|_| {
                        unavailable("the managed identity credential could not be built")
                    })?;
                Auth::Token(credential)
            }
            StorageAuth::Sas(sas) => Auth::Sas(sas.clone()),
            StorageAuth::AccountKey { account, key } => Auth::Key {
                account: account.clone(),
                key: key.clone(),
            },
        };
        let mut container_url = settings.blob_endpoint.clone();
        container_url.set_query(None);
        container_url
            .path_segments_mut()
            .map_err(|()| unavailable("the blob endpoint cannot hold a container path"))?
            .pop_if_empty()
            .push(&settings.container);
        Ok(Self {
            container_url,
            auth,
            description: settings.auth.describe(),
            options: BlobContainerClientOptions {
                client_options,
                ..Default::default()
            },
            current: RwLock::new(None),
            operations,
            timeout,
        })
    }

    /// HTTP requests sent to storage so far, by kind.
    pub fn operations(&self) -> &OperationCounts {
        &self.operations
    }

    /// A pipeline policy that counts requests into this store's totals, for
    /// other storage clients (the jobs' queue).
    pub(crate) fn counting_policy(&self) -> Arc<dyn Policy> {
        Arc::new(CountRequests(self.operations.clone()))
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    pub fn container_url(&self) -> &url::Url {
        &self.container_url
    }

    /// The container client; with a key, one whose SAS is not about to end.
    fn container(&self) -> Result<Arc<BlobContainerClient>, CoordinationError> {
        let now = OffsetDateTime::now_utc();
        let fresh = |c: &Option<Current>| match c {
            Some((client, None)) => Some(client.clone()),
            Some((client, Some(expiry))) if *expiry - SAS_RENEW_BEFORE > now => {
                Some(client.clone())
            }
            _ => None,
        };
        if let Some(client) = fresh(&self.current.read()) {
            return Ok(client);
        }
        let mut current = self.current.write();
        if let Some(client) = fresh(&current) {
            return Ok(client);
        }
        let mut url = self.container_url.clone();
        let (credential, expiry) = match &self.auth {
            Auth::Token(credential) => (Some(credential.clone()), None),
            Auth::Sas(sas) => {
                url.set_query(Some(sas));
                (None, None)
            }
            Auth::Key { account, key } => {
                let expiry = now + SAS_LIFETIME;
                url.set_query(Some(&account_sas(account, key, now - SAS_BACKDATE, expiry)));
                (None, Some(expiry))
            }
        };
        let client = BlobContainerClient::new(url, credential, Some(self.options.clone()))
            .map(Arc::new)
            .map_err(|_| unavailable("the storage client could not be built"))?;
        *current = Some((client.clone(), expiry));
        Ok(client)
    }

    fn blob(&self, name: &str) -> Result<BlobClient, CoordinationError> {
        Ok(self.container()?.blob_client(name))
    }

    /// Run one storage call, each try within the timeout, trying again after
    /// an answer that says storage was too busy or failed (see [`Retry`])
    /// with jittered exponential backoff, as long as the next try can start
    /// before the call's end: `deadline` when one is given (then the
    /// caller's own error applies once it passes), else one timeout after
    /// the first try. A try that timed out is not repeated.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        deadline: Option<Instant>,
        retry: Retry,
        mut call: F,
    ) -> Result<Option<Result<T, Refusal>>, CoordinationError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = azure_core::Result<T>>,
    {
        let end = deadline.unwrap_or_else(|| Instant::now() + self.timeout);
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        let mut reconnected = false;
        loop {
            let limit = Instant::now() + self.timeout;
            let until = deadline.map_or(limit, |d| d.min(limit));
            let error = match tokio::time::timeout_at(until, call()).await {
                Ok(Ok(value)) => return Ok(Some(Ok(value))),
                Ok(Err(error)) => error,
                Err(_) if until < limit => return Ok(None),
                Err(_) => {
                    return Err(unavailable(format!(
                        "{what} timed out after {} s",
                        self.timeout.as_secs_f32()
                    )));
                }
            };
            if !reconnected && retry.after_lost_connection(&error) && Instant::now() < end {
                reconnected = true;
                tracing::debug!(what, "the connection to storage was lost; trying once more");
                continue;
            }
            let pause = backoff.pause().max(retry_after(&error).unwrap_or_default());
            if !retry.after(&error) || Instant::now() + pause >= end {
                return classify(what, &self.description, &error).map(|r| Some(Err(r)));
            }
            tracing::debug!(what, status = ?status(&error),
                pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "storage was busy or failing; trying again");
            tokio::time::sleep(pause).await;
        }
    }

    /// Acquire a lease on `blob` with our proposed id. `None`: `deadline`
    /// came first.
    pub async fn acquire_lease(
        &self,
        blob: &str,
        seconds: i32,
        lease_id: &str,
        deadline: Instant,
    ) -> Result<Option<Result<(), Refusal>>, CoordinationError> {
        let client = self.blob(blob)?;
        let options = BlobClientAcquireLeaseOptions {
            proposed_lease_id: Some(lease_id.to_owned()),
            ..Default::default()
        };
        let answer = self
            .call(
                "acquiring a lease",
                Some(deadline),
                Retry::Idempotent,
                || client.acquire_lease(seconds, Some(options.clone())),
            )
            .await?;
        Ok(answer.map(|r| r.map(drop)))
    }

    pub async fn renew_lease(&self, blob: &str, lease_id: &str) -> Outcome<()> {
        let client = self.blob(blob)?;
        let answer = self
            .call("renewing a lease", None, Retry::Idempotent, || {
                client.renew_lease(lease_id.to_owned(), None)
            })
            .await?;
        Ok(answer.map_or(Ok(()), |r| r.map(drop)))
    }

    pub async fn release_lease(&self, blob: &str, lease_id: &str) -> Outcome<()> {
        let client = self.blob(blob)?;
        let answer = self
            .call("releasing a lease", None, Retry::Idempotent, || {
                client.release_lease(lease_id.to_owned(), None)
            })
            .await?;
        Ok(answer.map_or(Ok(()), |r| r.map(drop)))
    }

    /// Whether the blob is leased now, and its metadata (one HEAD).
    pub async fn lease_and_metadata(
        &self,
        blob: &str,
        deadline: Instant,
    ) -> Result<Option<Result<BlobLease, Refusal>>, CoordinationError> {
        let client = self.blob(blob)?;
        let answer = self
            .call(
                "reading a blob's properties",
                Some(deadline),
                Retry::Idempotent,
                || client.get_properties(None),
            )
            .await?;
        Ok(answer.map(|r| {
            r.map(|response| BlobLease {
                // Absent or unreadable: not known to be free, so wait.
                leased: !matches!(response.lease_status(), Ok(Some(LeaseStatus::Unlocked))),
                metadata: response.metadata().unwrap_or_default(),
            })
        }))
    }

    /// Replace the metadata of a blob we hold the lease on.
    pub async fn set_metadata(
        &self,
        blob: &str,
        lease_id: &str,
        metadata: &std::collections::HashMap<String, String>,
    ) -> Outcome<()> {
        let client = self.blob(blob)?;
        let options = BlobClientSetMetadataOptions {
            lease_id: Some(lease_id.to_owned()),
            ..Default::default()
        };
        let answer = self
            .call("writing a blob's metadata", None, Retry::Idempotent, || {
                client.set_metadata(metadata, Some(options.clone()))
            })
            .await?;
        Ok(answer.map_or(Ok(()), |r| r.map(drop)))
    }

    pub async fn create_container(&self) -> Outcome<()> {
        let client = self.container()?;
        let answer = self
            .call("creating the container", None, Retry::Unprocessed, || {
                client.create(None)
            })
            .await?;
        Ok(answer.map_or(Ok(()), |r| r.map(drop)))
    }

    /// The blob's content and ETag; `Ok(Err(refusal))` with 404 when absent.
    pub async fn read(&self, blob: &str) -> Outcome<(Vec<u8>, Etag)> {
        let client = self.blob(blob)?;
        let client = &client;
        let read = || async move {
            let download = client
                .download(Some(BlobClientDownloadOptions::default()))
                .await?;
            let etag = download.properties.etag.clone();
            let body = download.body.collect().await?;
            Ok((body.to_vec(), etag))
        };
        match self
            .call("reading a blob", None, Retry::Idempotent, read)
            .await?
        {
            Some(Ok((body, Some(etag)))) => Ok(Ok((body, etag))),
            Some(Ok((_, None))) => Err(unavailable("storage answered a read without an ETag")),
            Some(Err(refusal)) => Ok(Err(refusal)),
            None => Err(unavailable("reading a blob timed out")),
        }
    }

    /// Write `body` if the blob still has `etag`, or, with `None`, only if it
    /// does not exist yet. A 412 or 409 means someone else wrote first.
    pub async fn write(&self, blob: &str, body: Vec<u8>, etag: Option<Etag>) -> Outcome<Etag> {
        let client = self.blob(blob)?;
        let options = BlockBlobClientUploadOptions {
            blob_content_type: Some("application/json".into()),
            ..Default::default()
        };
        let options = match etag {
            Some(etag) => BlockBlobClientUploadOptions {
                if_match: Some(etag),
                ..options
            },
            None => options.if_not_exists(),
        };
        let content: RequestContent<azure_core::Bytes, azure_core::http::NoFormat> =
            azure_core::Bytes::from(body).into();
        // Conditional, so a try that landed before its answer was lost (a
        // 5xx) is refused when sent again (412, or 409 for a creation), which
        // the callers take for "someone else wrote": the lock finds its blob
        // there; the budget reads again and applies its change once more (a
        // reservation counted twice: slower, never a 429). Not sent again
        // after a connection lost under it ([`Retry::Conditional`]).
        let answer = self
            .call("writing a blob", None, Retry::Conditional, || {
                client.upload(content.clone(), Some(options.clone()))
            })
            .await?;
        match answer {
            Some(Ok(result)) => result
                .etag
                .map(Ok)
                .ok_or_else(|| unavailable("storage answered a write without an ETag")),
            Some(Err(refusal)) => Ok(Err(refusal)),
            None => Err(unavailable("writing a blob timed out")),
        }
    }
}

/// When a [`Store::put`] may write.
#[derive(Debug, Clone)]
pub(crate) enum PutIf {
    /// Only if the blob does not exist yet (`If-None-Match: *`).
    Absent,
    /// Only if the blob still has this ETag.
    Matches(Etag),
    /// Whatever is there.
    Always,
}

/// One blob of a listing: its name and metadata.
#[derive(Debug, Clone)]
pub(crate) struct ListedBlob {
    pub name: String,
    pub metadata: std::collections::HashMap<String, String>,
}

impl Store {
    /// Write `body` with `metadata` under `condition`; a 409 or 412 refusal
    /// means someone else wrote first.
    pub async fn put(
        &self,
        blob: &str,
        body: Vec<u8>,
        metadata: std::collections::HashMap<String, String>,
        condition: PutIf,
    ) -> Outcome<Etag> {
        let client = self.blob(blob)?;
        let options = BlockBlobClientUploadOptions {
            blob_content_type: Some("application/json".into()),
            metadata: Some(metadata),
            ..Default::default()
        };
        let options = match condition {
            PutIf::Absent => options.if_not_exists(),
            PutIf::Matches(etag) => BlockBlobClientUploadOptions {
                if_match: Some(etag),
                ..options
            },
            PutIf::Always => options,
        };
        let content: RequestContent<azure_core::Bytes, azure_core::http::NoFormat> =
            azure_core::Bytes::from(body).into();
        // A record written `Always` or `Absent` is sent again only when
        // storage says it did nothing: a lost answer must not turn into a
        // "someone else wrote first".
        let answer = self
            .call("writing a blob", None, Retry::Unprocessed, || {
                client.upload(content.clone(), Some(options.clone()))
            })
            .await?;
        match answer {
            Some(Ok(result)) => result
                .etag
                .map(Ok)
                .ok_or_else(|| unavailable("storage answered a write without an ETag")),
            Some(Err(refusal)) => Ok(Err(refusal)),
            None => Err(unavailable("writing a blob timed out")),
        }
    }

    /// The blob's content, metadata and ETag; `Ok(Err(refusal))` with 404 when absent.
    pub async fn read_with_metadata(
        &self,
        blob: &str,
    ) -> Outcome<(Vec<u8>, std::collections::HashMap<String, String>, Etag)> {
        let client = self.blob(blob)?;
        let client = &client;
        let read = || async move {
            let download = client
                .download(Some(BlobClientDownloadOptions::default()))
                .await?;
            let etag = download.properties.etag.clone();
            let metadata = download.properties.metadata.clone();
            let body = download.body.collect().await?;
            Ok((body.to_vec(), metadata, etag))
        };
        match self
            .call("reading a blob", None, Retry::Idempotent, read)
            .await?
        {
            Some(Ok((body, metadata, Some(etag)))) => Ok(Ok((body, metadata, etag))),
            Some(Ok((_, _, None))) => Err(unavailable("storage answered a read without an ETag")),
            Some(Err(refusal)) => Ok(Err(refusal)),
            None => Err(unavailable("reading a blob timed out")),
        }
    }

    /// One page of the blobs whose names start with `prefix`, in name order,
    /// with their metadata, from `marker` on; and the marker of the next page.
    pub async fn list_page(
        &self,
        prefix: &str,
        max: usize,
        marker: Option<String>,
    ) -> Outcome<(Vec<ListedBlob>, Option<String>)> {
        use futures_util::StreamExt as _;
        let client = self.container()?;
        let options = BlobContainerClientListBlobsOptions {
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            marker,
            maxresults: Some(i32::try_from(max.clamp(1, 5000)).unwrap_or(5000)),
            prefix: Some(prefix.to_owned()),
            ..Default::default()
        };
        let (client, options) = (&client, &options);
        let list = || async move {
            let mut pages = client.list_blobs(Some(options.clone()))?.into_pages();
            match pages.next().await {
                Some(page) => page?.into_model().map(Some),
                None => Ok(None),
            }
        };
        match self
            .call("listing blobs", None, Retry::Idempotent, list)
            .await?
        {
            Some(Ok(None)) => Ok(Ok((Vec::new(), None))),
            Some(Ok(Some(page))) => {
                let blobs = page
                    .blob_items
                    .into_iter()
                    .filter_map(|item| {
                        Some(ListedBlob {
                            name: item.name?,
                            metadata: item.metadata.and_then(|m| m.values).unwrap_or_default(),
                        })
                    })
                    .collect();
                let next = page.next_marker.filter(|m| !m.is_empty());
                Ok(Ok((blobs, next)))
            }
            Some(Err(refusal)) => Ok(Err(refusal)),
            None => Err(unavailable("listing blobs timed out")),
        }
    }
}

pub(crate) fn unavailable(reason: impl Into<String>) -> CoordinationError {
    CoordinationError::Unavailable {
        retry_after: DEFAULT_RETRY_AFTER,
        reason: reason.into(),
    }
}

/// 404, 409 and 412 are answers; everything else fails closed.
pub(crate) fn classify(
    what: &str,
    auth: &str,
    error: &azure_core::Error,
) -> Result<Refusal, CoordinationError> {
    match error.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let status = u16::from(*status);
            let code = error_code.clone();
            if matches!(status, 404 | 409 | 412) {
                return Ok(Refusal { status, code });
            }
            let retry_after = raw_response
                .as_ref()
                .and_then(|r| {
                    r.headers()
                        .get_optional_str(&azure_core::http::headers::RETRY_AFTER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .map(|s| Duration::from_secs(s.clamp(1, 300)))
                .unwrap_or(DEFAULT_RETRY_AFTER);
            let code = code.map(|c| format!(" {c}")).unwrap_or_default();
            let reason = match status {
                401 | 403 => format!(
                    "storage refused {what} ({status}{code}) with the {auth}; the identity needs \
                     Storage Blob Data Contributor (or Owner) on the account"
                ),
                429 | 503 => format!("storage is throttling ({status}{code}) while {what}"),
                _ => format!("storage answered {status}{code} to {what}"),
            };
            Err(CoordinationError::Unavailable {
                retry_after,
                reason,
            })
        }
        ErrorKind::Connection | ErrorKind::Io => Err(unavailable(format!(
            "storage could not be reached while {what}"
        ))),
        ErrorKind::Credential => Err(unavailable(format!(
            "no storage token could be had from the {auth}"
        ))),
        _ => Err(unavailable(format!("{what} failed"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose connection was lost may have been applied: sent
    /// again once, and only where a repeat changes nothing; one that never
    /// reached storage, wherever a repeat is allowed.
    #[test]
    fn a_lost_connection_is_tried_again_once_where_a_repeat_is_harmless() {
        let lost = azure_core::Error::with_message(
            ErrorKind::Io,
            "connection closed before message completed",
        );
        assert!(Retry::Idempotent.after_lost_connection(&lost));
        assert!(!Retry::Conditional.after_lost_connection(&lost));
        assert!(!Retry::Unprocessed.after_lost_connection(&lost));
        let refused = azure_core::Error::with_message(ErrorKind::Connection, "connection refused");
        assert!(Retry::Idempotent.after_lost_connection(&refused));
        assert!(Retry::Conditional.after_lost_connection(&refused));
        assert!(!Retry::Unprocessed.after_lost_connection(&refused));
        // Not again and again: storage down fails the caller at once.
        for error in [&lost, &refused] {
            assert!(!Retry::Idempotent.after(error));
        }
    }
}
