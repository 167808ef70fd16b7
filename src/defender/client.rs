//! A small client for the Defender machine and machine-action endpoints.
//!
//! One pooled `reqwest::Client` with a timeout on every call; the bearer token
//! comes from [`TokenSource`] on each call (cached by the credential). The base
//! URL is a setting, which is how tests and `--simulate` point the very same
//! code at the simulator.
//!
//! Every call draws from the shared [`RateBudget`] and runs inside the
//! invocation's deadline; a job's write uses the slot its group reserved
//! ahead within the jobs' share ([`DefenderClient::prepay`]). Retries follow what is safe:
//! - a 401 refreshes the token once and resends (the request was not executed);
//! - a 429 waits for `Retry-After` and resends (not executed either);
//! - GETs are also resent after 5xx, timeouts, dropped connections and
//!   unreadable bodies, with exponential backoff and jitter;
//! - a POST is never resent after such an ambiguous failure: it may have been
//!   executed. The caller decides, after re-reading the machine's actions.

use std::{collections::HashMap, sync::Arc, time::Duration};

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::{Method, StatusCode, header};
use serde::{Deserialize as _, de::DeserializeOwned};
use serde_json::Value;
use tokio::time::Instant;
use url::Url;
use uuid::Uuid;

use super::{
    api::Endpoint,
    auth::TokenSource,
    budget::{BudgetError, CallBudget, RateBudget, Reserved, Share},
    error::{DefenderError, Refusal},
    models::{ActionType, CommentBody, ErrorEnvelope, Machine, MachineAction, ODataPage},
};

/// Most pages followed for one lookup. A device has a handful of records; the
/// guard stops a server that keeps handing out nextLinks (a reported API bug).
const MAX_PAGES: usize = 10;

/// Most pages followed for one full list: a million rows at
/// Defender's largest page. A tenant's restrict history is far smaller; the
/// guard stops a server whose paging never ends.
const MAX_LIST_PAGES: usize = 100;

/// Rows asked for per page of machine actions (`$top`): Defender's largest
/// page, so one call usually answers. Defender may omit `@odata.nextLink`
/// when `$top` is set (microsoft-365-docs#8489), so a full page is followed
/// with `$skip` instead.
pub const PAGE_TOP: usize = 10_000;

/// Characters escaped inside an OData query value. Spaces become `%20`, as
/// PowerShell and .NET clients send them.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'>');

/// Backoff between resends of a GET.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            max_attempts: 6,
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random delay up to the exponential bound, so callers
    /// that failed together do not come back together.
    fn delay(&self, attempt: u32) -> Duration {
        let bound = self
            .first_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let millis = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(millis / 2..=millis.max(1)))
    }
}

/// How a [`DefenderClient`] calls Defender, as the Azure SDK's clients take
/// their options: every field has a default.
#[derive(Debug, Clone)]
pub struct DefenderClientOptions {
    /// The pooled HTTP client; its own timeouts are a ceiling over `timeout`.
    pub http: reqwest::Client,
    /// Timeout of one call to Defender (`DEFENDER_TIMEOUT_SECONDS`).
    pub timeout: Duration,
    /// Backoff between resends of a GET.
    pub retry: RetryPolicy,
    /// The rate budget every call draws from: this process's, or the one all
    /// instances share (`COORDINATION=storage`).
    pub budget: Arc<dyn CallBudget>,
    /// `$top` for lists of machine actions, 1 to [`PAGE_TOP`]; tests lower it
    /// to exercise paging (`DEFENDER_PAGE_SIZE`).
    pub page_top: usize,
}

impl Default for DefenderClientOptions {
    /// Defender's own limits (100 calls a minute and 1500 an hour per
    /// endpoint), 30 s a call, Defender's largest page.
    fn default() -> Self {
        Self {
            http: reqwest::Client::new(),
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            budget: Arc::new(RateBudget::new(100, 1500)),
            page_top: PAGE_TOP,
        }
    }
}

/// The Defender API client.
#[derive(Debug, Clone)]
pub struct DefenderClient {
    http: reqwest::Client,
    base: Url,
    tokens: TokenSource,
    timeout: Duration,
    budget: Arc<dyn CallBudget>,
    retry: RetryPolicy,
    /// `$top` for lists of machine actions ([`PAGE_TOP`] unless a test lowers it).
    page_top: usize,
    /// Slots reserved ahead for one write to a machine ([`Self::prepay`]),
    /// by endpoint and lower-case machine id.
    prepaid: Arc<PrepaidSlots>,
}

/// Slots reserved ahead, each with the [`Prepaid`] that reserved it.
#[derive(Debug, Default)]
struct PrepaidSlots {
    slots: parking_lot::Mutex<HashMap<(Endpoint, String), (Reserved, u64)>>,
    next_owner: std::sync::atomic::AtomicU64,
}

/// Slots reserved ahead for one write each to some machines
/// ([`DefenderClient::prepay`]). The first attempt of that write to one of
/// them uses its slot instead of asking the budget; the slots not used by
/// the time this is dropped are given back.
#[must_use = "the slots are given back when this is dropped"]
#[derive(Debug)]
pub struct Prepaid {
    endpoint: Endpoint,
    ids: Vec<String>,
    /// Which entries are this one's: once its slot for a machine is used,
    /// another group may reserve one for the same machine.
    owner: u64,
    prepaid: Arc<PrepaidSlots>,
    budget: Arc<dyn CallBudget>,
}

impl Drop for Prepaid {
    fn drop(&mut self) {
        let unused: Vec<Reserved> = {
            let mut slots = self.prepaid.slots.lock();
            self.ids
                .iter()
                .filter_map(|id| {
                    let key = (self.endpoint, id.clone());
                    match slots.get(&key) {
                        Some(&(_, owner)) if owner == self.owner => {
                            slots.remove(&key).map(|(slot, _)| slot)
                        }
                        _ => None,
                    }
                })
                .collect()
        };
        if !unused.is_empty() {
            self.budget.give_back(self.endpoint, unused);
        }
    }
}

/// A machine action: typed for our decisions and, when Defender sent it on
/// its own (the answer to a GET, POST or cancel of that one action), the
/// JSON it sent, to hand back exactly so. An action read from a list, or
/// handed over by another instance, is known only typed: written back from
/// its typed fields, which keep every field Defender listed
/// ([`MachineAction::extra`]), a time that was not RFC 3339 as `null`.
#[derive(Debug, Clone)]
pub struct ActionRecord {
    pub action: MachineAction,
    /// Defender's own JSON for this action, when it sent it on its own.
    received: Option<Value>,
}

impl ActionRecord {
    /// The action Defender answered a call with, typed and as sent.
    fn received(endpoint: Endpoint, json: Value) -> Result<Self, DefenderError> {
        Ok(Self {
            action: typed_action(endpoint, &json)?,
            received: Some(json),
        })
    }

    /// The action as JSON: exactly as Defender sent it when it sent it on
    /// its own, else written from the typed fields.
    pub fn to_json(&self) -> Value {
        match &self.received {
            Some(json) => json.clone(),
            None => serde_json::to_value(&self.action).unwrap_or(Value::Null),
        }
    }
}

/// An action known only typed (listed, or handed over by another instance).
impl From<MachineAction> for ActionRecord {
    fn from(action: MachineAction) -> Self {
        Self {
            action,
            received: None,
        }
    }
}

/// Machine actions read in one go, and when.
#[derive(Debug, Clone)]
pub struct ActionListing {
    pub actions: Vec<MachineAction>,
    /// When the first request of the read was sent (after any wait for the
    /// rate budget): nothing older than this is missing from `actions`.
    pub sent_at: time::OffsetDateTime,
    /// Defender calls the read took (pages included).
    pub calls: usize,
}

/// A read of the restrict history whose pages were handed on as they came.
#[derive(Debug, Clone, Copy)]
pub struct HistoryRead {
    /// When the first request of the read was sent (after any wait for the
    /// rate budget): nothing older than this is missing.
    pub sent_at: time::OffsetDateTime,
    /// Defender calls the read took (pages included).
    pub calls: usize,
}

/// The lists read page by page.
#[derive(Debug, Clone, Copy)]
enum ListOf {
    Machines,
    Actions,
}

impl ListOf {
    fn endpoint(self) -> Endpoint {
        match self {
            Self::Machines => Endpoint::ListMachines,
            Self::Actions => Endpoint::ListActions,
        }
    }
}

/// Rows of a list, with their id (to keep a row two pages both carry once).
trait Listed: DeserializeOwned {
    fn id(&self) -> &str;
}

impl Listed for Machine {
    fn id(&self) -> &str {
        self.id.as_str()
    }
}

impl Listed for MachineAction {
    fn id(&self) -> &str {
        self.id.as_str()
    }
}

/// A list read in full.
struct Listing<T> {
    rows: Vec<T>,
    sent_at: time::OffsetDateTime,
    calls: usize,
}

/// The one hook a caller hands into a call, run for each attempt: told the
/// attempt's rate-budget slot before the client waits for it, and asked
/// right before the request leaves. Defender's client knows nothing of what
/// it does (a batched read closes its batch; a write checks the machine's
/// lease and notes that it was sent); a refusal comes back as
/// [`DefenderError::Refused`], carrying the hook's own error.
#[async_trait::async_trait]
pub trait BeforeSend: Sync {
    /// The rate budget gave the attempt its slot at `at`; the client waits
    /// until then.
    fn slot(&self, at: Instant) {
        let _ = at;
    }

    /// Right before the attempt at `endpoint` is sent, after any wait for the
    /// rate budget. `Err`: it is not sent. `Ok(Some(until))`: the client
    /// stops waiting for the attempt by then (its timeout is cut to fit).
    /// Defender may still process an attempt we stopped waiting for; the
    /// re-read after an unclear answer is what catches that. Once it answers
    /// `Ok`, the attempt is sent.
    async fn before_send(&self, endpoint: Endpoint) -> Result<Option<Instant>, Refusal>;
}

/// Notes when the first attempt of a list went out, then runs the caller's
/// hook.
struct FirstSent<'a> {
    at: parking_lot::Mutex<Option<time::OffsetDateTime>>,
    then: Option<&'a dyn BeforeSend>,
}

#[async_trait::async_trait]
impl BeforeSend for FirstSent<'_> {
    fn slot(&self, at: Instant) {
        if let Some(hook) = self.then {
            hook.slot(at);
        }
    }

    async fn before_send(&self, endpoint: Endpoint) -> Result<Option<Instant>, Refusal> {
        self.at
            .lock()
            .get_or_insert_with(time::OffsetDateTime::now_utc);
        match self.then {
            Some(hook) => hook.before_send(endpoint).await,
            None => Ok(None),
        }
    }
}

/// Why the budget gave `endpoint` no slot, as the client's error.
fn budget_error(endpoint: Endpoint, error: BudgetError) -> DefenderError {
    match error {
        BudgetError::OverBudget(over) => DefenderError::OverBudget {
            endpoint,
            wait: over.wait,
        },
        BudgetError::Refused(refusal) => DefenderError::Refused { endpoint, refusal },
    }
}

/// One request to make; its method comes from the endpoint.
struct Call<'a> {
    endpoint: Endpoint,
    url: Url,
    /// A JSON body (restrict, unrestrict and cancel send a comment; the
    /// tags API its tag and action).
    body: Option<&'a Value>,
    hook: Option<&'a dyn BeforeSend>,
    /// The machine (or action) a write is for: its slot may be prepaid.
    target: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(endpoint: Endpoint, url: Url) -> Self {
        Self {
            endpoint,
            url,
            body: None,
            hook: None,
            target: None,
        }
    }
}

impl DefenderClient {
    /// `base` is the API root, such as `https://api.security.microsoft.com`;
    /// `tokens` the credential's bearer tokens; `None` options are the defaults.
    pub fn new(base: Url, tokens: TokenSource, options: Option<DefenderClientOptions>) -> Self {
        let DefenderClientOptions {
            http,
            timeout,
            retry,
            budget,
            page_top,
        } = options.unwrap_or_default();
        let mut base = base;
        // Url::join replaces the last segment unless the path ends with '/'.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Self {
            http,
            base,
            tokens,
            timeout,
            budget,
            retry,
            page_top: page_top.clamp(1, PAGE_TOP),
            prepaid: Arc::default(),
        }
    }

    /// Reserve now, within `share` of `endpoint`'s windows, one slot for a
    /// write to each of `machine_ids`, all or none: a job's group takes its
    /// slots so before it takes any lease, and the writes then use them.
    /// The reservation is what the share is checked against, so instances
    /// admitting groups at once cannot together fill more than the share.
    /// `OverBudget` says how long until the share has room for all of them.
    pub async fn prepay(
        &self,
        endpoint: Endpoint,
        machine_ids: &[String],
        share: Share,
        deadline: Instant,
    ) -> Result<Prepaid, DefenderError> {
        let mut ids: Vec<String> = machine_ids
            .iter()
            .map(|id| id.to_ascii_lowercase())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let owner = self
            .prepaid
            .next_owner
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prepaid = |ids| Prepaid {
            endpoint,
            ids,
            owner,
            prepaid: self.prepaid.clone(),
            budget: self.budget.clone(),
        };
        if ids.is_empty() {
            return Ok(prepaid(ids));
        }
        let slots = self
            .budget
            .reserve_share(endpoint, share.for_calls(ids.len()), deadline)
            .await
            .map_err(|e| budget_error(endpoint, e))?;
        let mut held = self.prepaid.slots.lock();
        let mut kept = Vec::with_capacity(ids.len());
        let mut spare = Vec::new();
        for (id, slot) in ids.into_iter().zip(slots) {
            // Another group holding a slot for the same write keeps it.
            if let std::collections::hash_map::Entry::Vacant(entry) =
                held.entry((endpoint, id.clone()))
            {
                entry.insert((slot, owner));
                kept.push(id);
            } else {
                spare.push(slot);
            }
        }
        drop(held);
        if !spare.is_empty() {
            self.budget.give_back(endpoint, spare);
        }
        Ok(prepaid(kept))
    }

    /// How long until `endpoint`'s budget has a slot within `share` of each
    /// window (nothing reserved): what a lower-priority caller waits for
    /// before it starts.
    pub async fn wait_for_share(
        &self,
        endpoint: Endpoint,
        share: Share,
    ) -> Result<Duration, DefenderError> {
        self.budget
            .wait_for_share(endpoint, share)
            .await
            .map_err(|e| budget_error(endpoint, e))
    }

    /// Calls to `endpoint` the rate budget allows at once, now.
    pub fn free_slots(&self, endpoint: Endpoint) -> usize {
        self.budget.free_now(endpoint)
    }

    /// `GET /api/machines?$filter=aadDeviceId eq <guid>&$top=10000`, every page.
    ///
    /// The literal is unquoted, as RealmJoin's production runbooks send it; the
    /// GUID was validated, so nothing can be injected into the filter.
    pub async fn machines_by_aad_device(
        &self,
        id: Uuid,
        deadline: Instant,
    ) -> Result<Vec<Machine>, DefenderError> {
        let filter = format!("aadDeviceId eq {}", id.hyphenated());
        Ok(self
            .list_all(ListOf::Machines, Some(&filter), MAX_PAGES, deadline, None)
            .await?
            .rows)
    }

    /// `GET /api/machines?$filter=<filter>&$top=10000`, every page: the
    /// machines a containment job selects (`machineTags/any(...)`,
    /// `rbacGroupId eq N`). The caller builds the filter from checked values.
    pub async fn machines_matching(
        &self,
        filter: &str,
        deadline: Instant,
    ) -> Result<Vec<Machine>, DefenderError> {
        Ok(self
            .list_all(
                ListOf::Machines,
                Some(filter),
                MAX_LIST_PAGES,
                deadline,
                None,
            )
            .await?
            .rows)
    }

    /// `GET /api/machines/{id}`; `None` when Defender does not know the id.
    pub async fn machine(
        &self,
        machine_id: &str,
        deadline: Instant,
    ) -> Result<Option<Machine>, DefenderError> {
        let url = self.url(Endpoint::GetMachine, machine_id)?;
        match self
            .send::<Machine>(Call::new(Endpoint::GetMachine, url), deadline)
            .await
        {
            Ok(machine) => Ok(Some(machine)),
            Err(DefenderError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every action of one machine, of any type, every page:
    /// `GET /api/machineactions?$filter=machineId eq '<id>'&$top=10000`.
    ///
    /// Only documented OData is sent: no `$orderby` (the client sorts) and no
    /// `or` (the caller keeps the types it needs). Reading every page, rather
    /// than the newest few, is what makes the filter by machine alone safe: a
    /// machine's scans and investigations cannot crowd its restrict actions
    /// out of the answer.
    pub async fn machine_actions(
        &self,
        machine_id: &str,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
    ) -> Result<ActionListing, DefenderError> {
        self.list_actions(&format!("machineId eq '{machine_id}'"), deadline, hook)
            .await
    }

    /// The tenant's restrict and unrestrict actions: two type-filtered lists
    /// (`$filter=type eq '<type>'`), every page, read together.
    pub async fn restrict_history(
        &self,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
    ) -> Result<ActionListing, DefenderError> {
        let [restrict_filter, release_filter] = [
            ActionType::RestrictCodeExecution,
            ActionType::UnrestrictCodeExecution,
        ]
        .map(|action| format!("type eq '{}'", action.as_str()));
        let (restricts, releases) = tokio::try_join!(
            self.list_actions(&restrict_filter, deadline, hook),
            self.list_actions(&release_filter, deadline, hook),
        )?;
        let mut listing = restricts;
        listing.sent_at = listing.sent_at.min(releases.sent_at);
        listing.calls += releases.calls;
        listing.actions.extend(releases.actions);
        Ok(listing)
    }

    /// The tenant's restrict and unrestrict actions (two type-filtered
    /// lists, side by side), each page handed to `on_page` as it arrives
    /// and dropped after it: for a caller that folds the history instead
    /// of holding it. A page of one list may come between pages of the
    /// other; an action may come twice (a page boundary moved).
    pub async fn restrict_history_pages(
        &self,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
        on_page: &(dyn Fn(Vec<MachineAction>) + Sync),
    ) -> Result<HistoryRead, DefenderError> {
        let [restrict_filter, release_filter] = [
            ActionType::RestrictCodeExecution,
            ActionType::UnrestrictCodeExecution,
        ]
        .map(|action| format!("type eq '{}'", action.as_str()));
        let list = |filter| {
            self.list_pages(
                ListOf::Actions,
                Some(filter),
                MAX_LIST_PAGES,
                deadline,
                hook,
                on_page,
            )
        };
        let ((restricts_sent, restrict_calls), (releases_sent, release_calls)) =
            tokio::try_join!(list(&restrict_filter), list(&release_filter))?;
        Ok(HistoryRead {
            sent_at: restricts_sent.min(releases_sent),
            calls: restrict_calls + release_calls,
        })
    }

    /// `GET /api/machineactions?$filter=<filter>`, every page.
    async fn list_actions(
        &self,
        filter: &str,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
    ) -> Result<ActionListing, DefenderError> {
        let listing = self
            .list_all(
                ListOf::Actions,
                Some(filter),
                MAX_LIST_PAGES,
                deadline,
                hook,
            )
            .await?;
        Ok(ActionListing {
            actions: listing.rows,
            sent_at: listing.sent_at,
            calls: listing.calls,
        })
    }

    /// Every machine of the tenant (`GET /api/machines?$top=10000`, every
    /// page): one call answers the lookups of many devices at once.
    /// Also says how many calls (pages) it took.
    pub async fn all_machines(
        &self,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
    ) -> Result<(Vec<Machine>, usize), DefenderError> {
        let listing = self
            .list_all(ListOf::Machines, None, MAX_LIST_PAGES, deadline, hook)
            .await?;
        Ok((listing.rows, listing.calls))
    }

    /// `GET <list>?$filter=<filter>&$top=<page>`, every page, kept whole.
    /// Rows seen twice (a page boundary moved) are kept once.
    async fn list_all<T: Listed>(
        &self,
        list: ListOf,
        filter: Option<&str>,
        max_pages: usize,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
    ) -> Result<Listing<T>, DefenderError> {
        let mut rows: Vec<T> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let (sent_at, calls) = self
            .list_pages(list, filter, max_pages, deadline, hook, |page: Vec<T>| {
                for row in page {
                    if seen.insert(row.id().to_ascii_lowercase()) {
                        rows.push(row);
                    }
                }
            })
            .await?;
        Ok(Listing {
            rows,
            sent_at,
            calls,
        })
    }

    /// `GET <list>?$filter=<filter>&$top=<page>`, following `@odata.nextLink`
    /// (same origin only) or, when a full page comes without one, `$skip`.
    /// Each page is handed to `on_page` as it arrives and dropped after it,
    /// so a caller that folds the rows never holds more than one page; a
    /// row may come twice when a page boundary moved. Returns when the first
    /// request was sent and how many calls the list took.
    async fn list_pages<T: Listed>(
        &self,
        list: ListOf,
        filter: Option<&str>,
        max_pages: usize,
        deadline: Instant,
        hook: Option<&dyn BeforeSend>,
        mut on_page: impl FnMut(Vec<T>),
    ) -> Result<(time::OffsetDateTime, usize), DefenderError> {
        let endpoint = list.endpoint();
        let base = self.url(endpoint, "")?;
        let query = |skip: usize| {
            let mut q = format!("$top={}", self.page_top);
            if let Some(filter) = filter {
                q = format!("$filter={}&{q}", utf8_percent_encode(filter, QUERY_VALUE));
            }
            if skip > 0 {
                q.push_str(&format!("&$skip={skip}"));
            }
            q
        };
        let mut url = base.clone();
        url.set_query(Some(&query(0)));

        let first_sent = FirstSent {
            at: parking_lot::Mutex::new(None),
            then: hook,
        };
        let mut skip = 0;
        let finished = |calls, first_sent: FirstSent<'_>| {
            let sent_at = first_sent
                .at
                .into_inner()
                .unwrap_or_else(time::OffsetDateTime::now_utc);
            (sent_at, calls)
        };
        for calls in 1..=max_pages {
            let call = Call {
                hook: Some(&first_sent),
                ..Call::new(endpoint, url.clone())
            };
            let page: ODataPage<T> = match self.send(call, deadline).await {
                // The docs say the machine list answers 404 when there are
                // "no recent machines": that is no (more) match, not a failure.
                Err(DefenderError::Status { status: 404, .. })
                    if matches!(list, ListOf::Machines) =>
                {
                    return Ok(finished(calls, first_sent));
                }
                other => other?,
            };
            let count = page.value.len();
            skip += count;
            on_page(page.value);
            url = match page.next_link {
                Some(next) => self.same_origin(endpoint, &next)?,
                None if count >= self.page_top => {
                    let mut next = base.clone();
                    next.set_query(Some(&query(skip)));
                    next
                }
                None => return Ok(finished(calls, first_sent)),
            };
        }
        Err(DefenderError::Protocol {
            endpoint,
            reason: format!("more than {max_pages} pages of {}", endpoint.path("")),
        })
    }

    /// `GET /api/machineactions/{id}`; `None` when Defender does not know the id.
    pub async fn action(
        &self,
        action_id: &str,
        deadline: Instant,
    ) -> Result<Option<ActionRecord>, DefenderError> {
        let endpoint = Endpoint::GetAction;
        let url = self.url(endpoint, action_id)?;
        match self.send::<Value>(Call::new(endpoint, url), deadline).await {
            Ok(json) => ActionRecord::received(endpoint, json).map(Some),
            Err(DefenderError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /api/machines/{id}/restrictCodeExecution` (or unrestrict).
    /// Never resent after an ambiguous failure.
    pub async fn create_action(
        &self,
        machine_id: &str,
        action: ActionType,
        comment: &str,
        deadline: Instant,
    ) -> Result<ActionRecord, DefenderError> {
        self.post(
            Endpoint::create(action),
            machine_id,
            comment,
            None,
            deadline,
        )
        .await
    }

    /// [`Self::create_action`], with `hook` run before each attempt.
    pub async fn create_action_with(
        &self,
        machine_id: &str,
        action: ActionType,
        comment: &str,
        hook: &dyn BeforeSend,
        deadline: Instant,
    ) -> Result<ActionRecord, DefenderError> {
        self.post(
            Endpoint::create(action),
            machine_id,
            comment,
            Some(hook),
            deadline,
        )
        .await
    }

    /// `POST /api/machineactions/{id}/cancel`, with `hook` (if any) run
    /// before each attempt. Never resent after an ambiguous failure.
    pub async fn cancel_action_with(
        &self,
        action_id: &str,
        comment: &str,
        hook: Option<&dyn BeforeSend>,
        deadline: Instant,
    ) -> Result<ActionRecord, DefenderError> {
        self.post(Endpoint::Cancel, action_id, comment, hook, deadline)
            .await
    }

    /// Add or remove the tag `value` on `machine_ids`: one machine through
    /// `POST /api/machines/{id}/tags`, more (up to 500) through
    /// `POST /api/machines/AddOrRemoveTagForMultipleMachines`. Safe to send
    /// again (adding a tag a machine has changes nothing), so a GET's
    /// retries apply to neither, and the caller sends again at its next run.
    pub async fn tag_machines(
        &self,
        value: &str,
        add: bool,
        machine_ids: &[String],
        deadline: Instant,
    ) -> Result<(), DefenderError> {
        let action = if add { "Add" } else { "Remove" };
        let (endpoint, id, body) = match machine_ids {
            [one] => (
                Endpoint::TagMachine,
                one.as_str(),
                serde_json::json!({"Value": value, "Action": action}),
            ),
            many => (
                Endpoint::TagMachines,
                "",
                serde_json::json!({"Value": value, "Action": action, "MachineIds": many}),
            ),
        };
        let call = Call {
            body: Some(&body),
            ..Call::new(endpoint, self.url(endpoint, id)?)
        };
        let _: Value = self.send(call, deadline).await?;
        Ok(())
    }

    /// `POST` a comment to `endpoint` for the machine or action `id`, and
    /// read back the machine action it answers with.
    async fn post(
        &self,
        endpoint: Endpoint,
        id: &str,
        comment: &str,
        hook: Option<&dyn BeforeSend>,
        deadline: Instant,
    ) -> Result<ActionRecord, DefenderError> {
        let body = serde_json::to_value(CommentBody {
            comment: comment.to_owned(),
        })
        .unwrap_or_default();
        let call = Call {
            body: Some(&body),
            hook,
            ..Call::new(endpoint, self.url(endpoint, id)?)
        };
        let json: Value = self
            .send(
                Call {
                    target: Some(id),
                    ..call
                },
                deadline,
            )
            .await?;
        ActionRecord::received(endpoint, json)
    }

    /// The URL of `endpoint` for the machine or action `id` (ignored by lists).
    fn url(&self, endpoint: Endpoint, id: &str) -> Result<Url, DefenderError> {
        let path = endpoint.path(id);
        self.base.join(&path).map_err(|e| DefenderError::Protocol {
            endpoint,
            reason: format!("cannot build the URL for {path}: {e}"),
        })
    }

    /// A nextLink must point back at the configured API: the bearer token is
    /// never sent anywhere else.
    fn same_origin(&self, endpoint: Endpoint, link: &str) -> Result<Url, DefenderError> {
        let url = Url::parse(link).map_err(|e| DefenderError::Protocol {
            endpoint,
            reason: format!("nextLink is not a URL: {e}"),
        })?;
        if url.origin() != self.base.origin() {
            return Err(DefenderError::Protocol {
                endpoint,
                reason: format!(
                    "nextLink points at {}, not at the configured API {}",
                    url.origin().ascii_serialization(),
                    self.base.origin().ascii_serialization()
                ),
            });
        }
        Ok(url)
    }

    /// Make the call, resending where that is safe (see the module docs).
    async fn send<T: DeserializeOwned>(
        &self,
        call: Call<'_>,
        deadline: Instant,
    ) -> Result<T, DefenderError> {
        let op = call.endpoint;
        let resend_on_ambiguous_failure = op.method() == Method::GET;
        let mut token = tokio::time::timeout_at(deadline, self.tokens.token())
            .await
            .map_err(|_| DefenderError::OutOfTime { endpoint: op })??;
        let mut refreshed = false;
        let mut attempt: u32 = 0;
        loop {
            // Out of time is a timeout, not a budget that has no slot left.
            if Instant::now() >= deadline {
                return Err(DefenderError::OutOfTime { endpoint: op });
            }
            let refused = |refusal| DefenderError::Refused {
                endpoint: op,
                refusal,
            };
            // A slot reserved ahead serves the first attempt only: a resend
            // after a 429 asks the budget like any other call.
            let prepaid = match call.target {
                Some(target) if attempt == 0 => self
                    .prepaid
                    .slots
                    .lock()
                    .remove(&(op, target.to_ascii_lowercase()))
                    .map(|(slot, _)| slot),
                _ => None,
            };
            let budget = match (prepaid, call.hook) {
                (Some(slot), hook) => {
                    self.budget
                        .use_reserved(op, slot, deadline, &|at| {
                            if let Some(hook) = hook {
                                hook.slot(at);
                            }
                        })
                        .await
                }
                (None, Some(hook)) => {
                    self.budget
                        .acquire_announcing(op, deadline, &|at| hook.slot(at))
                        .await
                }
                (None, None) => self.budget.acquire(op, deadline).await,
            };
            budget.map_err(|e| budget_error(op, e))?;
            if deadline <= Instant::now() {
                return Err(DefenderError::OutOfTime { endpoint: op });
            }
            let until = match call.hook {
                Some(hook) => hook.before_send(op).await.map_err(refused)?,
                None => None,
            };
            // Measured after the hook: its storage write can be slow, and a
            // write sent after the deadline would reach Defender after the
            // caller was told that nothing was sent.
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(DefenderError::OutOfTime { endpoint: op });
            }
            let mut timeout = self.timeout.min(remaining);
            if let Some(until) = until {
                timeout = timeout.min(until.saturating_duration_since(Instant::now()));
            }
            let error = match self.attempt(&call, token.secret(), timeout).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            attempt += 1;

            let wait = match &error {
                DefenderError::Status { status: 401, .. } if !refreshed => {
                    refreshed = true;
                    token = self.tokens.refresh(&token).await?;
                    continue;
                }
                DefenderError::Status {
                    status: 429,
                    retry_after,
                    ..
                } => retry_after.unwrap_or_else(|| self.retry.delay(attempt)),
                e if resend_on_ambiguous_failure && e.is_transient() => self.retry.delay(attempt),
                _ => return Err(error),
            };
            // A Retry-After beyond the deadline (or absurdly large) is not waited for.
            let fits = Instant::now()
                .checked_add(wait)
                .is_some_and(|resume| resume < deadline);
            if attempt >= self.retry.max_attempts || !fits {
                return Err(error);
            }
            tracing::info!(
                operation = op.describe(),
                attempt,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                error = %error,
                "retrying a Defender call"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt<T: DeserializeOwned>(
        &self,
        call: &Call<'_>,
        token: &str,
        timeout: Duration,
    ) -> Result<T, DefenderError> {
        let op = call.endpoint;
        let mut request = self
            .http
            .request(op.method(), call.url.clone())
            .timeout(timeout)
            .bearer_auth(token)
            .header(header::ACCEPT, "application/json");
        if let Some(body) = call.body {
            request = request.json(body);
        }

        let response = request
            .send()
            .await
            .map_err(|e| transport(op, timeout, &e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport(op, timeout, &e))?;

        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| DefenderError::Decode {
                endpoint: op,
                reason: e.to_string(),
            });
        }
        let (code, message, target) = match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
            Ok(envelope) => (
                envelope.error.code,
                envelope.error.message,
                envelope.error.target,
            ),
            Err(_) => (String::new(), reason_phrase(status), None),
        };
        Err(DefenderError::Status {
            endpoint: op,
            status: status.as_u16(),
            code,
            message,
            target,
            retry_after,
        })
    }
}

fn typed_action(op: Endpoint, json: &Value) -> Result<MachineAction, DefenderError> {
    MachineAction::deserialize(json).map_err(|e| DefenderError::Decode {
        endpoint: op,
        reason: format!("not a MachineAction: {e}"),
    })
}

fn transport(op: Endpoint, timeout: Duration, e: &reqwest::Error) -> DefenderError {
    if e.is_timeout() {
        DefenderError::Timeout {
            endpoint: op,
            timeout,
        }
    } else {
        // The Display of a reqwest error carries the URL but never headers,
        // so the token cannot leak through it.
        DefenderError::Transport {
            endpoint: op,
            reason: error_chain(e),
        }
    }
}

/// `Retry-After` in seconds (Defender sends delta-seconds).
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        // A day at most: a larger value is a broken header, not advice.
        .map(|seconds| Duration::from_secs(seconds.min(86_400)))
}

fn reason_phrase(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("no error body")
        .to_owned()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let policy = RetryPolicy::default();
        for _ in 0..100 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
            assert!(policy.delay(30) <= Duration::from_secs(8));
        }
    }
}
