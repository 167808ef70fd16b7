//! The fleet view: which machines are restricted right now, since when, by whom.
//!
//! Defender has no "restricted" flag on a machine, so each machine's state is
//! derived from the tenant's restrict and unrestrict actions with the same rule
//! the restrict function decides by
//! ([`crate::service::decision::deciding_action`]): the `Succeeded` action that
//! *finished* last makes it `restricted` or `released`; with none it is
//! `unknown`. A `Pending`/`InProgress` action is reported beside the state and
//! never changes it.
//!
//! Only machines with at least one restrict or unrestrict action in Defender's
//! history appear: the view is built from one tenant-wide read of those
//! actions, never one call per machine.

pub mod page;
pub mod read;
pub mod text;

use std::{
    cmp::Ordering,
    collections::{HashMap, HashSet},
    sync::Arc,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    defender::{
        ids::{ActionId, MachineId},
        models::{ActionStatus, ActionType, MachineAction, OrOther, OtherFields},
        timestamp::Timestamp,
    },
    service::{
        decision::{created, finished},
        runbook::RunbookError,
    },
};

/// A machine's state, as the README's state rules derive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Restricted,
    Released,
    /// No `Succeeded` restrict or unrestrict action in Defender's history.
    Unknown,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Released => "released",
            Self::Unknown => "unknown",
        }
    }
}

/// Which machines the caller asked for (`state` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    #[default]
    Restricted,
    Released,
    /// Machines with a pending restrict or unrestrict action, whatever their state.
    Pending,
    All,
}

impl StateFilter {
    pub const ALL: [Self; 4] = [Self::Restricted, Self::Released, Self::Pending, Self::All];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Released => "released",
            Self::Pending => "pending",
            Self::All => "all",
        }
    }

    /// The `state` query parameter; absent means `restricted`. Any other
    /// value, or the parameter given twice, is refused before Defender is
    /// called.
    pub fn from_query(query: &[(String, String)]) -> Result<Self, RunbookError> {
        let mut values = query.iter().filter(|(k, _)| k == "state").map(|(_, v)| v);
        let Some(value) = values.next() else {
            return Ok(Self::default());
        };
        let invalid = |reason: String| RunbookError::Invalid {
            field: "state",
            reason,
        };
        if values.next().is_some() {
            return Err(invalid(
                "(query parameter) is given more than once; give it once".to_owned(),
            ));
        }
        let wanted = value.trim();
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                invalid(format!(
                    "(query parameter) must be restricted (the default), released, pending or \
                     all; got {:?}",
                    wanted.chars().take(64).collect::<String>()
                ))
            })
    }

    fn keeps_entry(self, entry: &Entry) -> bool {
        match self {
            Self::Restricted => entry.state() == DeviceState::Restricted,
            Self::Released => entry.state() == DeviceState::Released,
            Self::Pending => entry.pending.is_some(),
            Self::All => true,
        }
    }
}

/// One machine in the answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub machine_id: MachineId,
    /// From the machine's newest action that names it (Defender fills the
    /// name in once the device has picked an action up).
    pub computer_dns_name: Option<String>,
    pub state: DeviceState,
    /// The deciding action's `lastUpdateDateTimeUtc` (its creation time if
    /// Defender sent none), as Defender wrote it.
    pub since: Option<Timestamp>,
    /// The deciding action, as Defender returned it (every field it listed;
    /// a time that was not RFC 3339 as `null`).
    pub last_action: Option<MachineAction>,
    /// The newest `Pending`/`InProgress` restrict or unrestrict action.
    pub pending_action: Option<MachineAction>,
    /// When this service releases the restriction (`releaseAfter`), UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_at: Option<String>,
}

/// How many machines are in each state (of all machines, not only those shown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub restricted: usize,
    pub released: usize,
    pub unknown: usize,
    /// Machines with a pending action, whatever their state.
    pub pending: usize,
}

/// Every machine that has restrict or unrestrict actions, newest `since`
/// first, each kept as only what decides its state and what the view shows
/// of it: memory grows with the machines, not with their actions.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    entries: Vec<Entry>,
    pub counts: Counts,
}

/// One machine, folded from its actions.
#[derive(Debug, Clone)]
struct Entry {
    machine_id: MachineId,
    /// From the newest created action that names the machine, and that
    /// action's creation time.
    name: Option<(Option<OffsetDateTime>, Box<str>)>,
    /// The `Succeeded` action that finished last (boxed: most machines
    /// have no pending action, and an empty box takes one word).
    deciding: Option<Box<Kept>>,
    /// The newest created `Pending`/`InProgress` action.
    pending: Option<Box<Kept>>,
}

/// An action kept for the answer: the times and type that order it, and
/// the action itself with its repeated texts shared (an outbreak's actions
/// carry the same requestor, comment and untyped fields by the thousand)
/// and its machine id only where it differs from the machine's.
#[derive(Debug, Clone)]
struct Kept {
    kind: ActionType,
    created: Option<OffsetDateTime>,
    finished: Option<OffsetDateTime>,
    id: Box<str>,
    status: OrOther<ActionStatus>,
    /// `None`: exactly the machine's id as the entry has it.
    machine_id: Option<MachineId>,
    computer_dns_name: Option<Arc<str>>,
    requestor: Option<Arc<str>>,
    requestor_comment: Option<Arc<str>>,
    creation: Option<Timestamp>,
    last_update: Option<Timestamp>,
    extra: Arc<OtherFields>,
}

/// One copy of each text the fold keeps.
#[derive(Debug, Default)]
struct Texts {
    strings: HashSet<Arc<str>>,
    fields: HashSet<Arc<OtherFields>>,
}

impl Texts {
    fn text(&mut self, text: &str) -> Arc<str> {
        if let Some(kept) = self.strings.get(text) {
            return kept.clone();
        }
        let kept: Arc<str> = Arc::from(text);
        self.strings.insert(kept.clone());
        kept
    }

    fn fields(&mut self, fields: &OtherFields) -> Arc<OtherFields> {
        if let Some(kept) = self.fields.get(fields) {
            return kept.clone();
        }
        let kept = Arc::new(fields.clone());
        self.fields.insert(kept.clone());
        kept
    }
}

impl Kept {
    fn of(
        action: &MachineAction,
        kind: ActionType,
        machine: &MachineId,
        texts: &mut Texts,
    ) -> Self {
        Self {
            kind,
            created: created(action),
            finished: finished(action),
            id: action.id.as_str().into(),
            status: action.status.clone(),
            machine_id: action
                .machine_id
                .as_ref()
                .filter(|id| id.as_str() != machine.as_str())
                .cloned(),
            computer_dns_name: action.computer_dns_name.as_deref().map(|t| texts.text(t)),
            requestor: action.requestor.as_deref().map(|t| texts.text(t)),
            requestor_comment: action.requestor_comment.as_deref().map(|t| texts.text(t)),
            creation: action.creation_date_time_utc,
            last_update: action.last_update_date_time_utc,
            extra: texts.fields(&action.extra),
        }
    }

    /// `lastUpdateDateTimeUtc`, else `creationDateTimeUtc`, as written.
    fn since(&self) -> Option<Timestamp> {
        self.last_update.or(self.creation)
    }

    /// The action as Defender listed it.
    fn action(&self, machine: &MachineId) -> MachineAction {
        MachineAction {
            id: ActionId::from(&*self.id),
            action_type: OrOther::Known(self.kind),
            status: self.status.clone(),
            machine_id: Some(self.machine_id.clone().unwrap_or_else(|| machine.clone())),
            computer_dns_name: self.computer_dns_name.as_deref().map(str::to_owned),
            requestor: self.requestor.as_deref().map(str::to_owned),
            requestor_comment: self.requestor_comment.as_deref().map(str::to_owned),
            creation_date_time_utc: self.creation,
            last_update_date_time_utc: self.last_update,
            extra: (*self.extra).clone(),
        }
    }

    /// Which of two that rank alike is kept: a fixed order of their texts.
    fn tie_key(&self) -> (&str, &str, Option<&str>, Option<&str>) {
        (
            &self.id,
            self.status.as_str(),
            self.requestor_comment.as_deref(),
            self.computer_dns_name.as_deref(),
        )
    }
}

/// Keep `action` in `slot` when it ranks above the action there; of two
/// that rank alike (a repeat, or equal times) the one [`Kept::tie_key`]
/// puts last, so that the order the actions come in never matters.
fn keep<R: Ord>(
    slot: &mut Option<Box<Kept>>,
    new: impl FnOnce() -> Kept,
    rank: R,
    rank_of: impl Fn(&Kept) -> R,
) {
    let Some(kept) = slot else {
        *slot = Some(Box::new(new()));
        return;
    };
    match rank.cmp(&rank_of(kept)) {
        Ordering::Less => {}
        Ordering::Greater => *slot = Some(Box::new(new())),
        Ordering::Equal => {
            let new = new();
            if new.tie_key() > kept.tie_key() {
                *slot = Some(Box::new(new));
            }
        }
    }
}

/// Folds the tenant's actions, in any order and page by page, into a
/// [`Fleet`]. The same rule as the restrict decision
/// ([`crate::service::decision::deciding_action`]): of the `Succeeded` actions the one that finished
/// last decides (at equal finishing times the one created first, as the
/// decision's newest-created-first scan keeps it); the pending action shown
/// is the newest created. Where times tie completely, a fixed order of the
/// actions' text decides, so the order the pages come in never matters,
/// and an action folded twice (a page boundary moved) changes nothing.
#[derive(Debug, Default)]
pub struct FleetFold {
    /// Where each machine's entry is in `entries`.
    machines: HashMap<MachineId, usize>,
    entries: Vec<Entry>,
    texts: Texts,
    actions: usize,
}

impl FleetFold {
    /// Actions folded so far (restrict and unrestrict, with a machine id).
    pub fn actions(&self) -> usize {
        self.actions
    }

    pub fn add_all(&mut self, actions: impl IntoIterator<Item = MachineAction>) {
        for action in actions {
            self.add(&action);
        }
    }

    /// Actions of other types or statuses, or without a machine id, are
    /// ignored.
    pub fn add(&mut self, action: &MachineAction) {
        let (Some(machine_id), Some(kind), Some(status)) = (
            &action.machine_id,
            action.action_type.known(),
            action.status.known(),
        ) else {
            return;
        };
        self.actions += 1;
        let at = *self.machines.entry(machine_id.clone()).or_insert_with(|| {
            self.entries.push(Entry {
                machine_id: machine_id.clone(),
                name: None,
                deciding: None,
                pending: None,
            });
            self.entries.len() - 1
        });
        let Some(entry) = self.entries.get_mut(at) else {
            return;
        };
        let made = created(action);
        if let Some(name) = &action.computer_dns_name
            && entry
                .name
                .as_ref()
                .is_none_or(|(at, kept)| (made, name.as_str()) > (*at, &**kept))
        {
            entry.name = Some((made, name.as_str().into()));
        }
        let texts = &mut self.texts;
        let machine = &entry.machine_id;
        let new = || Kept::of(action, kind, machine, texts);
        if status == ActionStatus::Succeeded {
            let rank = (finished(action), std::cmp::Reverse(made));
            keep(&mut entry.deciding, new, rank, |k| {
                (k.finished, std::cmp::Reverse(k.created))
            });
        } else if !status.is_terminal() {
            keep(&mut entry.pending, new, made, |k| k.created);
        }
    }

    /// The fleet, newest `since` first; machines with none last; ties by
    /// machine id, so the same tenant always gives the same order.
    pub fn finish(self) -> Fleet {
        drop(self.machines);
        let mut entries = self.entries;
        entries.shrink_to_fit();
        entries.sort_by(|a, b| order(a.key(), b.key()));
        let mut counts = Counts::default();
        for e in &entries {
            match e.state() {
                DeviceState::Restricted => counts.restricted += 1,
                DeviceState::Released => counts.released += 1,
                DeviceState::Unknown => counts.unknown += 1,
            }
            counts.pending += usize::from(e.pending.is_some());
        }
        Fleet { entries, counts }
    }
}

impl Entry {
    fn state(&self) -> DeviceState {
        match self.deciding.as_ref().map(|k| k.kind) {
            Some(ActionType::RestrictCodeExecution) => DeviceState::Restricted,
            Some(ActionType::UnrestrictCodeExecution) => DeviceState::Released,
            None => DeviceState::Unknown,
        }
    }

    fn since(&self) -> Option<Timestamp> {
        self.deciding.as_ref().and_then(|k| k.since())
    }

    fn key(&self) -> (Option<OffsetDateTime>, &str) {
        (self.since().map(Timestamp::at), self.machine_id.as_str())
    }

    fn device(&self) -> Device {
        Device {
            machine_id: self.machine_id.clone(),
            computer_dns_name: self.name.as_ref().map(|(_, n)| n.to_string()),
            state: self.state(),
            since: self.since(),
            last_action: self.deciding.as_ref().map(|k| k.action(&self.machine_id)),
            pending_action: self.pending.as_ref().map(|k| k.action(&self.machine_id)),
            release_at: None,
        }
    }
}

/// The view's order: newest `since` first, none last, then by machine id.
fn order(
    (a_since, a_id): (Option<OffsetDateTime>, &str),
    (b_since, b_id): (Option<OffsetDateTime>, &str),
) -> Ordering {
    b_since.cmp(&a_since).then_with(|| a_id.cmp(b_id))
}

/// Where a page ends: the last machine answered, in the view's order. The
/// next page starts after it, so a page boundary holds even when the fleet
/// was read again in between (a machine whose `since` changed meanwhile may
/// show on two pages or on none: each page is as of its own read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    since: Option<OffsetDateTime>,
    machine_id: String,
}

impl Cursor {
    /// The continuation token: URL-safe base64 of `<since as Unix
    /// nanoseconds or ->/<machine id>`.
    pub fn token(&self) -> String {
        let since = self
            .since
            .map_or_else(|| "-".to_owned(), |t| t.unix_timestamp_nanos().to_string());
        URL_SAFE_NO_PAD.encode(format!("{since}/{}", self.machine_id))
    }

    /// A token [`Self::token`] wrote; anything else is refused before
    /// Defender is called.
    pub fn from_token(token: &str) -> Result<Self, RunbookError> {
        let invalid = || RunbookError::Invalid {
            field: "continuation",
            reason: "(query parameter) is not a continuation token this service wrote; \
                     give the one from the previous page's answer"
                .to_owned(),
        };
        let text = URL_SAFE_NO_PAD
            .decode(token.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(invalid)?;
        let (since, machine_id) = text.split_once('/').ok_or_else(invalid)?;
        let since = match since {
            "-" => None,
            nanos => Some(
                nanos
                    .parse::<i128>()
                    .ok()
                    .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
                    .ok_or_else(invalid)?,
            ),
        };
        if machine_id.is_empty() || machine_id.len() > 256 {
            return Err(invalid());
        }
        Ok(Self {
            since,
            machine_id: machine_id.to_owned(),
        })
    }
}

/// Which page of the view the caller asked for (`pageSize`, `continuation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub size: usize,
    pub after: Option<Cursor>,
}

impl PageRequest {
    /// Devices per page unless `pageSize` says otherwise.
    pub const DEFAULT_SIZE: usize = 1_000;
    /// The most `pageSize` allows.
    pub const MAX_SIZE: usize = 10_000;

    /// `pageSize` (1 to 10,000; default 1,000) and `continuation` (a token
    /// from the previous page), each at most once.
    pub fn from_query(query: &[(String, String)]) -> Result<Self, RunbookError> {
        let once = |name: &'static str| -> Result<Option<&str>, RunbookError> {
            let mut values = query.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
            let value = values.next();
            if values.next().is_some() {
                return Err(RunbookError::Invalid {
                    field: name,
                    reason: "(query parameter) is given more than once; give it once".to_owned(),
                });
            }
            Ok(value.map(String::as_str))
        };
        let size = match once("pageSize")? {
            None => Self::DEFAULT_SIZE,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| {
                    (1..=Self::MAX_SIZE).contains(n) && v.bytes().all(|b| b.is_ascii_digit())
                })
                .ok_or_else(|| RunbookError::Invalid {
                    field: "pageSize",
                    reason: format!(
                        "(query parameter) must be a whole number from 1 to {}; got {:?}",
                        Self::MAX_SIZE,
                        v.chars().take(64).collect::<String>()
                    ),
                })?,
        };
        let after = once("continuation")?.map(Cursor::from_token).transpose()?;
        Ok(Self { size, after })
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            size: Self::DEFAULT_SIZE,
            after: None,
        }
    }
}

/// One page of the view.
#[derive(Debug, Clone)]
pub struct Page {
    pub devices: Vec<Device>,
    /// Machines the filter keeps, on every page.
    pub matching: usize,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

impl Fleet {
    /// Derive each machine's state from the tenant's actions, in any order.
    pub fn from_actions(actions: impl IntoIterator<Item = MachineAction>) -> Self {
        let mut fold = FleetFold::default();
        fold.add_all(actions);
        fold.finish()
    }

    /// Machines with restrict or unrestrict actions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The ids of the machines in `state`, in the view's order.
    pub fn machines_in(&self, state: DeviceState) -> impl Iterator<Item = &MachineId> {
        self.entries
            .iter()
            .filter(move |e| e.state() == state)
            .map(|e| &e.machine_id)
    }

    /// The page `page` asks for of the machines `filter` keeps, in the
    /// view's order.
    pub fn page(&self, filter: StateFilter, page: &PageRequest) -> Page {
        let start = page.after.as_ref().map_or(0, |after| {
            let after = (after.since, after.machine_id.as_str());
            self.entries
                .partition_point(|e| order(e.key(), after) != Ordering::Greater)
        });
        let mut kept = self.entries[start..]
            .iter()
            .filter(|e| filter.keeps_entry(e));
        let devices: Vec<Device> = kept.by_ref().take(page.size).map(Entry::device).collect();
        let next = match (kept.next(), devices.last()) {
            (Some(_), Some(last)) => Some(Cursor {
                since: last.since.map(Timestamp::at),
                machine_id: last.machine_id.to_string(),
            }),
            _ => None,
        };
        let matching = match filter {
            StateFilter::Restricted => self.counts.restricted,
            StateFilter::Released => self.counts.released,
            StateFilter::Pending => self.counts.pending,
            StateFilter::All => self.entries.len(),
        };
        Page {
            devices,
            matching,
            next,
        }
    }

    /// Every machine, in the view's order (tests).
    #[cfg(test)]
    pub fn devices(&self) -> Vec<Device> {
        self.entries.iter().map(Entry::device).collect()
    }

    /// Every machine `filter` keeps, in the view's order (tests).
    #[cfg(test)]
    pub fn select(self, filter: StateFilter) -> (Vec<Device>, Counts) {
        let page = self.page(
            filter,
            &PageRequest {
                size: usize::MAX,
                after: None,
            },
        );
        (page.devices, self.counts)
    }
}

/// The JSON answer: one page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer<'a> {
    pub devices: &'a [Device],
    /// Devices on this page.
    pub count: usize,
    /// Devices the filter keeps, on every page.
    pub matching: usize,
    /// The filter applied (`state`).
    pub state: &'static str,
    pub counts: Counts,
    /// When the read of Defender's actions this page comes from was sent
    /// (RFC 3339, UTC): a view may be answered from a read a few seconds
    /// old, shared with the views asked at the same time.
    pub as_of: String,
    /// `pageSize` as applied.
    pub page_size: usize,
    /// Give it as `continuation` for the next page; `null` on the last.
    pub continuation: Option<String>,
}

impl<'a> Answer<'a> {
    /// `as_of` as [`rfc3339`] wrote it.
    pub fn new(
        page: &'a Page,
        filter: StateFilter,
        counts: Counts,
        as_of: String,
        page_size: usize,
    ) -> Self {
        Self {
            devices: &page.devices,
            count: page.devices.len(),
            matching: page.matching,
            state: filter.as_str(),
            counts,
            as_of,
            page_size,
            continuation: page.next.as_ref().map(Cursor::token),
        }
    }
}

/// RFC 3339 in UTC; the wall clock always formats.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// One machine restricted by one action carrying these strings, restricted
/// at 10:05: for the renderers' tests.
#[cfg(test)]
pub(crate) fn one_restricted(
    machine_id: &str,
    name: &str,
    requestor: &str,
    comment: &str,
) -> Fleet {
    let action = serde_json::json!({
        "id": "a1", "type": "RestrictCodeExecution", "status": "Succeeded",
        "machineId": machine_id, "computerDnsName": name,
        "requestor": requestor, "requestorComment": comment,
        "creationDateTimeUtc": "2026-11-28T10:00:00Z",
        "lastUpdateDateTimeUtc": "2026-11-28T10:05:00Z",
    });
    Fleet::from_actions(vec![
        serde_json::from_value(action).unwrap_or_else(|e| panic!("{e}")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::decision::{Decision, Wanted, decide};

    const A: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";
    const B: &str = "39a7550d43b78a7757871f5c146184282381ec3d";

    fn action(
        id: &str,
        machine: &str,
        kind: &str,
        status: &str,
        created: u32,
        updated: Option<u32>,
    ) -> MachineAction {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "type": kind,
            "status": status,
            "machineId": machine,
            "requestor": "app",
            "requestorComment": format!("comment {id}"),
            "creationDateTimeUtc": format!("2026-11-28T10:{created:02}:00Z"),
            "lastUpdateDateTimeUtc": updated.map(|m| format!("2026-11-28T10:{m:02}:00.1234567Z")),
            "scope": null,
            "commands": [],
        }))
        .unwrap()
    }

    const R: &str = "RestrictCodeExecution";
    const U: &str = "UnrestrictCodeExecution";

    fn ids(devices: &[Device]) -> Vec<&str> {
        devices.iter().map(|d| d.machine_id.as_str()).collect()
    }

    #[test]
    fn the_action_that_finished_last_decides_and_pending_never_changes_the_state() {
        // A: a restrict created first but finished last (offline device), a
        // release finished before it, and a pending release.
        let actions = vec![
            action("u1", A, U, "Succeeded", 5, Some(6)),
            action("r1", A, R, "Succeeded", 0, Some(30)),
            action("u2", A, U, "Pending", 40, None),
            action("scan", A, "RunAntiVirusScan", "Succeeded", 50, Some(51)),
            // B: released; a failed restrict after it changes nothing.
            action("r2", B, R, "Succeeded", 1, Some(2)),
            action("u3", B, U, "Succeeded", 3, Some(4)),
            action("r3", B, R, "Failed", 10, Some(11)),
        ];
        let fleet = Fleet::from_actions(actions.clone());
        assert_eq!(ids(&fleet.devices()), [A, B], "newest since first");
        let a = &fleet.devices()[0];
        assert_eq!(a.state, DeviceState::Restricted);
        assert_eq!(
            a.since.map(|t| t.to_string()).as_deref(),
            Some("2026-11-28T10:30:00.1234567Z")
        );
        assert_eq!(a.last_action.as_ref().map(|x| x.id.as_str()), Some("r1"));
        assert_eq!(a.pending_action.as_ref().map(|x| x.id.as_str()), Some("u2"));
        let b = &fleet.devices()[1];
        assert_eq!(b.state, DeviceState::Released);
        assert_eq!(b.last_action.as_ref().map(|x| x.id.as_str()), Some("u3"));
        assert!(b.pending_action.is_none());
        assert_eq!(
            fleet.counts,
            Counts {
                restricted: 1,
                released: 1,
                unknown: 0,
                pending: 1
            }
        );

        // The same rule as the restrict decision: restricting A again would
        // find it already restricted by the same action.
        let mine: Vec<MachineAction> = actions
            .iter()
            .filter(|x| x.machine_id.as_deref() == Some(A) && x.status != "Pending")
            .cloned()
            .collect();
        let wanted = Wanted {
            action: ActionType::RestrictCodeExecution,
            force: false,
            cancel_pending: false,
        };
        assert!(matches!(decide(A, &mine, wanted), Decision::AlreadyInState(x) if x.id == "r1"));
    }

    #[test]
    fn no_succeeded_action_is_unknown_and_sorts_last() {
        let fleet = Fleet::from_actions(vec![
            action("r1", A, R, "Pending", 1, None),
            action("u1", A, U, "Cancelled", 0, Some(1)),
            action("r2", B, R, "Succeeded", 1, Some(2)),
        ]);
        assert_eq!(ids(&fleet.devices()), [B, A]);
        assert_eq!(fleet.devices()[1].state, DeviceState::Unknown);
        assert_eq!(fleet.devices()[1].since, None);
        assert!(fleet.devices()[1].last_action.is_none());
        let (pending, counts) = fleet.clone().select(StateFilter::Pending);
        assert_eq!(ids(&pending), [A]);
        assert_eq!(counts.unknown, 1);
        assert_eq!(ids(&fleet.clone().select(StateFilter::Restricted).0), [B]);
        assert!(fleet.clone().select(StateFilter::Released).0.is_empty());
        assert_eq!(ids(&fleet.select(StateFilter::All).0), [B, A]);
    }

    #[test]
    fn machine_ids_group_case_insensitively_and_actions_without_one_are_ignored() {
        let mut upper = action("u1", &A.to_uppercase(), U, "Succeeded", 5, Some(6));
        upper.computer_dns_name = Some("DESKTOP-ALPHA".into());
        let mut orphan = action("x", A, R, "Succeeded", 9, Some(59));
        orphan.machine_id = None;
        let fleet = Fleet::from_actions(vec![
            action("r1", A, R, "Succeeded", 0, Some(1)),
            upper,
            orphan,
        ]);
        assert_eq!(fleet.devices().len(), 1);
        assert_eq!(fleet.devices()[0].state, DeviceState::Released);
        assert_eq!(
            fleet.devices()[0].computer_dns_name.as_deref(),
            Some("DESKTOP-ALPHA")
        );
    }

    #[test]
    fn the_deciding_action_is_returned_as_defender_sent_it() {
        let fleet = Fleet::from_actions(vec![action("r1", A, R, "Succeeded", 0, Some(1))]);
        let json = serde_json::to_value(&fleet.devices()[0]).unwrap();
        assert_eq!(json["lastAction"]["scope"], serde_json::Value::Null);
        assert_eq!(json["lastAction"]["commands"], serde_json::json!([]));
        assert_eq!(json["lastAction"]["requestorComment"], "comment r1");
        assert_eq!(json["state"], "restricted");
        assert_eq!(json["pendingAction"], serde_json::Value::Null);
        assert!(json.get("sinceAt").is_none());
    }

    #[test]
    fn folding_in_any_order_with_repeats_agrees_with_the_restrict_decision() {
        let statuses = [
            "Succeeded",
            "Succeeded",
            "Pending",
            "InProgress",
            "Failed",
            "Cancelled",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let machines: Vec<String> = (0..12).map(|m| format!("{m:040x}")).collect();
        let actions: Vec<MachineAction> = (0..300)
            .map(|i| {
                let created = rng.u32(0..40);
                // Equal finishing times happen: minutes, not seconds.
                let updated = rng.bool().then(|| created + rng.u32(0..15));
                action(
                    &format!("a{i}"),
                    &machines[rng.usize(..machines.len())],
                    if rng.bool() { R } else { U },
                    statuses[rng.usize(..statuses.len())],
                    created,
                    updated,
                )
            })
            .collect();
        let reference = Fleet::from_actions(actions.clone()).devices();
        let mut shuffled: Vec<MachineAction> = actions
            .iter()
            .chain(actions.iter().take(100))
            .cloned()
            .collect();
        rng.shuffle(&mut shuffled);
        let folded = Fleet::from_actions(shuffled);
        let json = |d: &[Device]| serde_json::to_value(d).unwrap();
        assert_eq!(
            json(&folded.devices()),
            json(&reference),
            "order and repeats change nothing"
        );
        assert_eq!(
            folded.counts.restricted + folded.counts.released + folded.counts.unknown,
            folded.len()
        );

        for device in &reference {
            let mine: Vec<MachineAction> = actions
                .iter()
                .filter(|a| a.machine_id.as_ref() == Some(&device.machine_id))
                .cloned()
                .collect();
            // The restrict decision's own scan: newest created first.
            let mut newest_first = mine.clone();
            newest_first.sort_by_key(|a| std::cmp::Reverse(created(a)));
            let deciding = crate::service::decision::deciding_action(newest_first.iter());
            assert_eq!(
                device.last_action.as_ref().map(finished),
                deciding.map(|(a, _)| finished(a)),
                "{}",
                device.machine_id
            );
            let state = match deciding.map(|(_, t)| t) {
                Some(ActionType::RestrictCodeExecution) => DeviceState::Restricted,
                Some(ActionType::UnrestrictCodeExecution) => DeviceState::Released,
                None => DeviceState::Unknown,
            };
            assert_eq!(device.state, state, "{}", device.machine_id);
            let newest_pending = newest_first
                .iter()
                .find(|a| a.status == "Pending" || a.status == "InProgress")
                .map(created);
            assert_eq!(device.pending_action.as_ref().map(created), newest_pending);
        }
    }

    #[test]
    fn pages_follow_the_view_order_and_tokens_round_trip() {
        let fleet = Fleet::from_actions(vec![
            action("r1", A, R, "Succeeded", 0, Some(1)),
            action("r2", B, R, "Succeeded", 0, Some(2)),
            action("r3", "c3", R, "Succeeded", 0, Some(2)),
            action("u4", "d4", U, "Pending", 5, None),
        ]);
        let all = fleet.devices();
        let order = ids(&all);
        assert_eq!(
            order,
            ["39a7550d43b78a7757871f5c146184282381ec3d", "c3", A, "d4"]
        );
        let mut walked = Vec::new();
        let mut after = None;
        loop {
            let page = fleet.page(StateFilter::All, &PageRequest { size: 1, after });
            assert_eq!(page.matching, 4);
            walked.extend(page.devices.iter().map(|d| d.machine_id.to_string()));
            let Some(next) = page.next else { break };
            let token = next.token();
            assert_eq!(Cursor::from_token(&token), Ok(next.clone()));
            after = Some(next);
        }
        assert_eq!(walked, order);
        // A filter pages over the machines it keeps only.
        let restricted = fleet.page(
            StateFilter::Restricted,
            &PageRequest {
                size: 2,
                after: None,
            },
        );
        assert_eq!(restricted.matching, 3);
        assert_eq!(ids(&restricted.devices), &order[..2]);
        let rest = fleet.page(
            StateFilter::Restricted,
            &PageRequest {
                size: 2,
                after: restricted.next,
            },
        );
        assert_eq!(ids(&rest.devices), [A]);
        assert!(rest.next.is_none());
        for bad in ["", "!!", "eA", "LS8", "MTIzYWJjL20"] {
            assert!(Cursor::from_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_state_parameter() {
        let q = |v: &[&str]| -> Vec<(String, String)> {
            v.iter()
                .map(|v| ("state".to_owned(), (*v).to_owned()))
                .chain([("code".to_owned(), "key".to_owned())])
                .collect()
        };
        assert_eq!(
            StateFilter::from_query(&q(&[])),
            Ok(StateFilter::Restricted)
        );
        assert_eq!(StateFilter::from_query(&q(&["all"])), Ok(StateFilter::All));
        assert_eq!(
            StateFilter::from_query(&q(&["Pending"])),
            Ok(StateFilter::Pending)
        );
        for bad in [&["restrict"][..], &[""], &["all", "all"], &["isolated"]] {
            let err = StateFilter::from_query(&q(bad)).unwrap_err();
            assert_eq!(err.field().as_deref(), Some("state"), "{bad:?}");
        }
    }
}
