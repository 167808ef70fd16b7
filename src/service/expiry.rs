//! Time-boxed restrictions: `releaseAfter` on a restrict, and the durable
//! record that decides the automatic release.
//!
//! What decides a release is our own record, never a marker found in a
//! comment (anyone can type a comment in the portal). Every restrict action
//! this service creates gets a record `restrictions/<machine id>` naming the
//! action, with its `releaseAt` when one was asked for. An expiry can only
//! attach to the restriction a record names, so it never lifts a restriction
//! made elsewhere. A later restrict that creates a new action replaces the
//! record (and with it the expiry); a release this service creates ends it;
//! a restriction replaced elsewhere is found by the reconciler, which reads
//! the machine's actions before it releases (see [`super::reconcile`]).
//!
//! The record is a few metadata fields, so the reconciler lists every record
//! with one storage call a page and reads bodies never:
//! `action` (the restrict action id), `releaseat` (RFC 3339 or empty),
//! `state` (`active`, `releasing`, `released`, `ended`), `claim` and
//! `claimedat` (who is releasing it, for the conditional write that makes a
//! release happen once), `release` (the release action, once created).

use std::{collections::HashMap, sync::Arc};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    coordination::{
        CoordinationError,
        records::{Listed, Record, Records, WriteIf, Written},
    },
    defender::models::ActionType,
    service::{
        restrict::{Outcome, Success},
        runbook::ReleaseAfter,
    },
};

/// The one spelling of our own times (records, answers, comments).
pub use crate::service::runbook::release_after::rfc3339;

/// Where the records live.
pub const PREFIX: &str = "restrictions/";

/// The comment of the automatic release: which restriction, and why.
pub fn release_comment(restrict_action: &str, release_at: &str) -> String {
    format!(
        "Automatic release: restriction {restrict_action} expired at {release_at} \
         (releaseAfter)."
    )
}

/// What became of the expiry a request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiryNote {
    /// Nothing asked, nothing changed.
    Untouched,
    /// The restriction is released at this time.
    Set(OffsetDateTime),
    /// `"none"`: the expiry of our restriction was removed.
    Removed,
    /// Not set: the restriction was not made by this service (or is not in
    /// place yet through it).
    NotOurs,
    /// The record could not be written: the restriction stands without an
    /// expiry.
    Failed(String),
}

impl ExpiryNote {
    pub fn release_at(&self) -> Option<OffsetDateTime> {
        match self {
            Self::Set(at) => Some(*at),
            _ => None,
        }
    }

    /// The sentence for the answer's `warning`, when the expiry was not set
    /// or is kept in this process's memory only.
    pub fn warning(&self, in_memory: bool) -> Option<String> {
        match self {
            Self::NotOurs => Some(
                "releaseAfter was not set: the device's restriction was not made by this \
                 service (the portal or another tool made it), and this service never lifts a \
                 restriction it did not make."
                    .to_owned(),
            ),
            Self::Failed(e) => Some(format!(
                "releaseAfter could not be recorded ({e}): the restriction stands without an \
                 expiry. Send the restrict again with releaseAfter to set it."
            )),
            Self::Set(_) | Self::Removed if in_memory => Some(
                "The expiry is kept in this process's memory only (COORDINATION=local or \
                 --simulate): it is lost when the process stops. The deployed app keeps it in \
                 its storage account."
                    .to_owned(),
            ),
            _ => None,
        }
    }
}

/// One restriction record, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    pub machine_id: String,
    /// The restrict action this service created.
    pub action_id: String,
    pub release_at: Option<OffsetDateTime>,
    pub state: State,
    pub claimed_at: Option<OffsetDateTime>,
}

/// Where a record is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The restriction stands (with or without an expiry).
    Active,
    /// A reconciler claimed the release (`claimedat` says when).
    Releasing,
    /// Released by the reconciler.
    Released,
    /// Replaced or ended otherwise: nothing left to do.
    Ended,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Releasing => "releasing",
            Self::Released => "released",
            Self::Ended => "ended",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "releasing" => Self::Releasing,
            "released" => Self::Released,
            _ => Self::Ended,
        }
    }
}

fn meta<'a>(metadata: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

fn parse_time(s: Option<&str>) -> Option<OffsetDateTime> {
    s.filter(|s| !s.is_empty())
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
}

impl Restriction {
    fn from_metadata(machine_id: &str, metadata: &HashMap<String, String>) -> Option<Self> {
        Some(Self {
            machine_id: machine_id.to_owned(),
            action_id: meta(metadata, "action")?.to_owned(),
            release_at: parse_time(meta(metadata, "releaseat")),
            state: State::parse(meta(metadata, "state").unwrap_or("")),
            claimed_at: parse_time(meta(metadata, "claimedat")),
        })
    }

    fn metadata(&self, extra: &[(&str, String)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = [
            ("machine", self.machine_id.clone()),
            ("action", self.action_id.clone()),
            (
                "releaseat",
                self.release_at.map(rfc3339).unwrap_or_default(),
            ),
            ("state", self.state.as_str().to_owned()),
            (
                "claimedat",
                self.claimed_at.map(rfc3339).unwrap_or_default(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        m.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        m
    }
}

/// The restriction records, in the storage account (`COORDINATION=storage`)
/// or this process's memory (local mode).
#[derive(Debug, Clone)]
pub struct Restrictions {
    records: Arc<dyn Records>,
    in_memory: bool,
}

/// A record as read, with the ETag a conditional write needs.
#[derive(Debug, Clone)]
pub struct Held {
    pub restriction: Restriction,
    pub etag: String,
}

fn name(machine_id: &str) -> String {
    format!("{PREFIX}{}", machine_id.to_ascii_lowercase())
}

impl Restrictions {
    pub fn new(records: Arc<dyn Records>, in_memory: bool) -> Self {
        Self { records, in_memory }
    }

    /// Whether the records live in this process's memory only.
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Every record (names and metadata only: one listing call a page).
    pub async fn list(&self) -> Result<Vec<Restriction>, CoordinationError> {
        let listed: Vec<Listed> = self.records.list_all(PREFIX).await?;
        Ok(listed
            .iter()
            .filter_map(|l| {
                let machine = meta(&l.metadata, "machine")
                    .map(str::to_owned)
                    .unwrap_or_else(|| l.name.trim_start_matches(PREFIX).to_owned());
                Restriction::from_metadata(&machine, &l.metadata)
            })
            .collect())
    }

    /// The machine's record, with its ETag.
    pub async fn read(&self, machine_id: &str) -> Result<Option<Held>, CoordinationError> {
        let found: Option<Record> = self.records.read(&name(machine_id)).await?;
        Ok(found.and_then(|r| {
            Restriction::from_metadata(machine_id, &r.metadata).map(|restriction| Held {
                restriction,
                etag: r.etag,
            })
        }))
    }

    /// Write `restriction` if the record still has `etag` (`None`: only if
    /// there is none, or whatever is there with `always`).
    pub async fn write(
        &self,
        restriction: &Restriction,
        condition: WriteIf,
        extra: &[(&str, String)],
    ) -> Result<Written, CoordinationError> {
        self.records
            .write(
                &name(&restriction.machine_id),
                Vec::new(),
                restriction.metadata(extra),
                condition,
            )
            .await
    }

    /// Keep the record of what a restrict or release request did, and apply
    /// its `releaseAfter` (`release_at` computed from the request's arrival).
    pub async fn after(
        &self,
        success: &Success,
        asked: Option<ReleaseAfter>,
        release_at: Option<OffsetDateTime>,
    ) -> Result<ExpiryNote, CoordinationError> {
        let machine_id = success.machine.id.to_string();
        let action_id = success.action.action.id.to_string();
        let restrict =
            success.action.action.action_type.known() == Some(ActionType::RestrictCodeExecution);
        match (restrict, success.outcome) {
            // A restriction this request created: the record names it, and
            // replaces whatever expiry an earlier restriction had.
            (true, Outcome::Requested) => {
                let restriction = Restriction {
                    machine_id,
                    action_id,
                    release_at,
                    state: State::Active,
                    claimed_at: None,
                };
                self.write(&restriction, WriteIf::Always, &[]).await?;
                Ok(match release_at {
                    Some(at) => ExpiryNote::Set(at),
                    None => ExpiryNote::Untouched,
                })
            }
            // The restriction already there: ours only if the record names it.
            (true, _) => {
                let Some(asked) = asked else {
                    return Ok(ExpiryNote::Untouched);
                };
                let held = self.read(&machine_id).await?;
                let ours = held.filter(|h| {
                    h.restriction.action_id.eq_ignore_ascii_case(&action_id)
                        && h.restriction.state == State::Active
                });
                let Some(held) = ours else {
                    return Ok(ExpiryNote::NotOurs);
                };
                let moved = Restriction {
                    release_at,
                    ..held.restriction
                };
                match self.write(&moved, WriteIf::Matches(held.etag), &[]).await? {
                    Written::Done(_) => Ok(match (asked, release_at) {
                        (_, Some(at)) => ExpiryNote::Set(at),
                        _ => ExpiryNote::Removed,
                    }),
                    // A reconciler claimed it meanwhile: the release is on
                    // its way and the expiry cannot be moved any more.
                    Written::Lost => Ok(ExpiryNote::NotOurs),
                }
            }
            // A release this service created ends the record's expiry (the
            // reconciler would find it replaced anyway).
            (false, Outcome::Requested) => {
                if let Some(held) = self.read(&machine_id).await?
                    && held.restriction.state == State::Active
                {
                    let ended = Restriction {
                        state: State::Ended,
                        ..held.restriction
                    };
                    self.write(&ended, WriteIf::Matches(held.etag), &[]).await?;
                }
                Ok(ExpiryNote::Untouched)
            }
            (false, _) => Ok(ExpiryNote::Untouched),
        }
    }

    /// The expiry of each machine with one still to come, for the fleet view.
    pub async fn release_times(
        &self,
    ) -> Result<HashMap<String, OffsetDateTime>, CoordinationError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|r| matches!(r.state, State::Active | State::Releasing))
            .filter_map(|r| Some((r.machine_id.to_ascii_lowercase(), r.release_at?)))
            .collect())
    }
}
