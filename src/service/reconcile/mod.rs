//! The reconciler: what happens after the answer, run on the host's timer.
//!
//! Level-triggered, as kube-rs's controllers and omicron's background tasks
//! are: a run takes no input (the timer's `IsPastDue` and schedule status
//! are ignored), reads its records and Defender, acts on what differs, and
//! keeps nothing in memory for the next run. A second run right after the
//! first finds nothing to do. Each run returns a [`RunReport`], logged as
//! one line.
//!
//! Its Defender calls follow its work, not the tenant's size: Defender
//! cannot list actions by last update, so the expiry pass reads only the
//! machines whose expiry is due (one list of that machine's actions, then
//! the per-device protocol's release); the full read the Defender tag needs
//! runs at most every `TAG_RECONCILE_MINUTES` ([`tags`]).
//!
//! It spends at most a set share of each API's hourly budget
//! (`RECONCILE_BUDGET_PERCENT`): the share divided over the runs of an hour
//! (one a minute) caps each run's calls per API, and what is left waits for
//! the next run. Its calls draw from the same budget as everyone else's, and
//! an expiry starts only when its lookup, reads and release fit within the
//! reconciler's share of each window ([`Share::RECONCILER`]: below
//! interactive requests, above jobs), so the rest of each window stays free
//! for interactive requests; one that does not fit within the run waits for
//! the next.

pub mod tags;

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    coordination::records::{Records, WriteIf, Written},
    defender::{
        DefenderClient, DefenderError,
        api::Endpoint,
        budget::Share,
        models::{ActionStatus, ActionType, MachineAction},
    },
    service::{
        callbacks::{DeliveryReport, Outbox},
        decision::created,
        expiry::{self, Restriction, Restrictions, State},
        restrict::{Intent, Outcome, Restrictor},
        runbook::{CallerName, Comment, DeviceRef},
    },
};

/// A claim older than this is taken over: the reconciler that made it died
/// or failed mid-release (the per-device protocol then answers
/// `already_pending` or `already_in_state` for its release, never a second
/// one).
const CLAIM_STALE: time::Duration = time::Duration::minutes(5);
/// Runs in an hour at the schedule the infrastructure sets (every minute).
const RUNS_PER_HOUR: u32 = 60;
/// Who the automatic release names as caller.
const CALLER: &str = "reconcile (releaseAfter)";

/// The reconciler's settings.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// `RESTRICTED_TAG`: the Defender tag kept on restricted machines.
    pub restricted_tag: Option<String>,
    /// `TAG_RECONCILE_MINUTES`: the least time between two full reads.
    pub tag_every: time::Duration,
    /// `RECONCILE_BUDGET_PERCENT`: the share of each API's hourly budget.
    pub budget_percent: u32,
    /// Defender's hourly limit per API.
    pub per_hour: u32,
    /// How long one run may take (well inside `functionTimeout`).
    pub run_time: Duration,
}

impl ReconcileSettings {
    /// Calls one run may make on one API.
    pub fn calls_per_run(&self) -> usize {
        let share = u64::from(self.per_hour) * u64::from(self.budget_percent.min(100)) / 100;
        usize::try_from((share / u64::from(RUNS_PER_HOUR)).max(1)).unwrap_or(1)
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// Expiries whose time had come.
    pub due: usize,
    /// Releases this run created.
    pub released: usize,
    /// Due expiries whose release the protocol found in place or pending.
    pub already_released: usize,
    /// Due expiries that end without a release: their restriction was
    /// replaced, failed, or is no longer in Defender's history.
    pub ended: usize,
    /// Due expiries whose restriction is not final yet.
    pub waiting: usize,
    /// Due expiries another reconciler claimed first.
    pub claimed_elsewhere: usize,
    /// Due expiries left for the next run (this run's share of the budget
    /// was spent).
    pub deferred: usize,
    pub failed: usize,
    /// Whether the Defender tag's full read ran.
    pub tags_read: bool,
    pub tags_added: usize,
    pub tags_removed: usize,
    /// Defender calls this run made, per API.
    pub calls: Calls,
    /// What the callback delivery did (when callbacks are configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callbacks: Option<DeliveryReport>,
    /// The first errors, for the log line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Defender calls a run made, per API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Calls {
    pub list_actions: usize,
    pub list_machines: usize,
    pub get_machine: usize,
    pub unrestrict: usize,
    pub tag: usize,
}

impl Calls {
    pub fn total(&self) -> usize {
        self.list_actions + self.list_machines + self.get_machine + self.unrestrict + self.tag
    }
}

impl RunReport {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.failed += 1;
        if self.errors.len() < 5 {
            self.errors.push(e.to_string());
        }
    }

    /// Whether the run changed nothing.
    pub fn idle(&self) -> bool {
        self.released == 0
            && self
                .callbacks
                .as_ref()
                .is_none_or(|c| c.delivered == 0 && c.retrying == 0 && c.abandoned == 0)
            && self.ended == 0
            && self.already_released == 0
            && self.tags_added == 0
            && self.tags_removed == 0
    }
}

/// What a due expiry's restriction allows, from the machine's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiryStep {
    /// Ours is the restriction in place: release it.
    Release,
    /// Ours is not final yet.
    Wait,
    /// Nothing to release: why.
    End(&'static str),
    /// A release already replaced it (ours, from a claim that died).
    Released,
}

/// Decide a due expiry of restriction `ours` on the machine's `actions`.
/// Pure: tested without Defender.
pub fn expiry_step(ours: &str, actions: &[MachineAction]) -> ExpiryStep {
    let relevant: Vec<&MachineAction> = actions
        .iter()
        .filter(|a| a.action_type.known().is_some())
        .collect();
    let Some(mine) = relevant
        .iter()
        .find(|a| a.id.to_string().eq_ignore_ascii_case(ours))
    else {
        return ExpiryStep::End("the restriction is not in Defender's history any more");
    };
    let mine_at = created(mine);
    // A later restrict or release that did not fail replaced ours.
    let replaced_by = relevant.iter().find(|a| {
        !a.id.to_string().eq_ignore_ascii_case(ours)
            && created(a) > mine_at
            && !matches!(
                a.status.known(),
                Some(ActionStatus::Failed | ActionStatus::TimeOut | ActionStatus::Cancelled)
            )
    });
    if let Some(later) = replaced_by {
        return match later.action_type.known() {
            Some(ActionType::UnrestrictCodeExecution) => ExpiryStep::Released,
            _ => ExpiryStep::End("a later restriction replaced it"),
        };
    }
    match mine.status.known() {
        Some(ActionStatus::Succeeded) => ExpiryStep::Release,
        Some(ActionStatus::Pending | ActionStatus::InProgress) => ExpiryStep::Wait,
        _ => ExpiryStep::End("the restriction did not succeed"),
    }
}

/// The reconciler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    restrictor: Restrictor,
    client: DefenderClient,
    restrictions: Restrictions,
    records: Arc<dyn Records>,
    settings: ReconcileSettings,
    /// The pending completion callbacks, delivered on each run.
    callbacks: Option<Outbox>,
}

impl Reconciler {
    pub fn new(
        restrictor: Restrictor,
        client: DefenderClient,
        records: Arc<dyn Records>,
        in_memory: bool,
        settings: ReconcileSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                restrictor,
                client,
                restrictions: Restrictions::new(records.clone(), in_memory),
                records,
                settings,
                callbacks: None,
            }),
        }
    }

    /// Deliver due completion callbacks on each run; called at startup,
    /// before the reconciler is shared.
    #[must_use]
    pub fn with_callbacks(mut self, outbox: Outbox) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.callbacks = Some(outbox);
        }
        self
    }

    /// The restriction records (the restrict function keeps them).
    pub fn restrictions(&self) -> &Restrictions {
        &self.inner.restrictions
    }

    pub fn settings(&self) -> &ReconcileSettings {
        &self.inner.settings
    }

    /// One run, as of `now`; every problem is in the report, none stops the
    /// run.
    pub async fn run(&self, now: OffsetDateTime) -> RunReport {
        let deadline = Instant::now() + self.inner.settings.run_time;
        let mut report = RunReport::default();
        self.expiries(now, deadline, &mut report).await;
        if let Some(outbox) = &self.inner.callbacks {
            report.callbacks = Some(outbox.deliver_due(now, deadline).await);
        }
        if let Some(tag) = &self.inner.settings.restricted_tag {
            tags::reconcile(self, tag, now, deadline, &mut report).await;
        }
        report
    }

    async fn expiries(&self, now: OffsetDateTime, deadline: Instant, report: &mut RunReport) {
        let listed = match self.inner.restrictions.list().await {
            Ok(listed) => listed,
            Err(e) => return report.error(format!("listing the restriction records: {e}")),
        };
        let due: Vec<Restriction> = listed.into_iter().filter(|r| is_due(r, now)).collect();
        report.due = due.len();
        let cap = self.inner.settings.calls_per_run();
        let total = due.len();
        for (k, restriction) in due.into_iter().enumerate() {
            // Each due expiry costs two action lists (ours, then the
            // protocol's read after the lock) and at most one release.
            if report.calls.list_actions + 2 > cap || Instant::now() >= deadline {
                report.deferred += 1;
                continue;
            }
            // No room now means no room for the ones after it either: they
            // wait for the next run without asking the budget again (each
            // ask is a storage read per API).
            match self.room(deadline).await {
                Ok(true) => {}
                Ok(false) => {
                    report.deferred += total - k;
                    break;
                }
                Err(e) => {
                    report.deferred += total - k;
                    report.error(format!("the budget cannot be consulted: {e}"));
                    break;
                }
            }
            if let Err(e) = self.expire(&restriction, now, deadline, report).await {
                report.error(format!("machine {}: {e}", restriction.machine_id));
            }
        }
    }

    /// Wait until an expiry's calls (the protocol's lookup, the reads and the
    /// release) fit within the reconciler's share of each API's windows;
    /// `false` when that is after `deadline` (the next run takes it).
    async fn room(&self, deadline: Instant) -> Result<bool, DefenderError> {
        let client = &self.inner.client;
        let (write, lookup, read) = tokio::try_join!(
            client.wait_for_share(Endpoint::Unrestrict, Share::RECONCILER),
            client.wait_for_share(Endpoint::GetMachine, Share::RECONCILER),
            // Two reads: ours, then the protocol's after the lock.
            client.wait_for_share(Endpoint::ListActions, Share::RECONCILER.for_calls(2)),
        )?;
        let wait = write.max(lookup).max(read);
        if wait.is_zero() {
            return Ok(true);
        }
        if Instant::now() + wait >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(wait).await;
        Ok(true)
    }

    /// One due expiry: read the machine's actions, claim the record, release.
    async fn expire(
        &self,
        due: &Restriction,
        now: OffsetDateTime,
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<(), String> {
        let restrictions = &self.inner.restrictions;
        // The record again, for its ETag (and in case it moved since listed).
        let Some(held) = restrictions
            .read(&due.machine_id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        if !is_due(&held.restriction, now) {
            return Ok(());
        }
        let listing = self
            .inner
            .client
            .machine_actions(&due.machine_id, deadline, None)
            .await
            .map_err(|e| e.to_string())?;
        report.calls.list_actions += listing.calls;
        let step = expiry_step(&held.restriction.action_id, &listing.actions);
        let finish = |state| Restriction {
            state,
            ..held.restriction.clone()
        };
        match step {
            ExpiryStep::Wait => {
                report.waiting += 1;
                return Ok(());
            }
            ExpiryStep::End(why) => {
                tracing::info!(machine_id = %due.machine_id, restriction = %due.action_id, why, "expiry ends without a release");
                report.ended += 1;
                let _ = restrictions
                    .write(&finish(State::Ended), WriteIf::Matches(held.etag), &[])
                    .await;
                return Ok(());
            }
            ExpiryStep::Released => {
                report.already_released += 1;
                let _ = restrictions
                    .write(&finish(State::Released), WriteIf::Matches(held.etag), &[])
                    .await;
                return Ok(());
            }
            ExpiryStep::Release => {}
        }
        // The claim: one conditional write decides which reconciler
        // releases, however many run at once.
        let claim = Restriction {
            state: State::Releasing,
            claimed_at: Some(now),
            ..held.restriction.clone()
        };
        let claimed = match restrictions
            .write(&claim, WriteIf::Matches(held.etag), &[])
            .await
            .map_err(|e| e.to_string())?
        {
            Written::Done(etag) => etag,
            Written::Lost => {
                report.claimed_elsewhere += 1;
                return Ok(());
            }
        };
        let release_at = held
            .restriction
            .release_at
            .map(expiry::rfc3339)
            .unwrap_or_default();
        let comment = expiry::release_comment(&held.restriction.action_id, &release_at);
        let intent = Intent {
            action: ActionType::UnrestrictCodeExecution,
            force: false,
            cancel_pending: false,
            comment: Comment::parse(Some(&serde_json::Value::String(comment)))
                .map_err(|e| e.to_string())?,
            caller: CallerName::parse(Some(&serde_json::Value::String(CALLER.to_owned())))
                .ok()
                .flatten(),
            release_at: None,
            job_id: None,
        };
        let device = DeviceRef::parse(&due.machine_id).map_err(|e| e.to_string())?;
        let result = self.inner.restrictor.run(&device, &intent, deadline).await;
        // The protocol's lookup and its read after the lock.
        report.calls.get_machine += 1;
        report.calls.list_actions += 1;
        let success = result.map_err(|e| e.to_string())?;
        let release_id = success.action.action.id.to_string();
        match success.outcome {
            Outcome::Requested => {
                report.calls.unrestrict += 1;
                report.released += 1;
            }
            Outcome::AlreadyPending | Outcome::AlreadyInState => report.already_released += 1,
        }
        tracing::info!(machine_id = %due.machine_id, restriction = %due.action_id, release = %release_id, outcome = success.outcome.as_str(), "released on expiry");
        restrictions
            .write(
                &finish(State::Released),
                WriteIf::Matches(claimed),
                &[("release", release_id)],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    pub(crate) fn client(&self) -> &DefenderClient {
        &self.inner.client
    }

    pub(crate) fn records(&self) -> &Arc<dyn Records> {
        &self.inner.records
    }
}

/// Whether an expiry's time has come (or a claim on it went stale).
fn is_due(r: &Restriction, now: OffsetDateTime) -> bool {
    let time_has_come = r.release_at.is_some_and(|at| at <= now);
    match r.state {
        State::Active => time_has_come,
        State::Releasing => time_has_come && r.claimed_at.is_none_or(|at| at + CLAIM_STALE <= now),
        State::Released | State::Ended => false,
    }
}

/// The run's one log line.
pub fn log(report: &RunReport, duration: Duration, local: bool) {
    let calls = serde_json::to_string(&report.calls).unwrap_or_default();
    let errors = report.errors.join("; ");
    let callbacks = report.callbacks.clone().unwrap_or_default();
    tracing::info!(
        due = report.due,
        released = report.released,
        already_released = report.already_released,
        ended = report.ended,
        waiting = report.waiting,
        claimed_elsewhere = report.claimed_elsewhere,
        deferred = report.deferred,
        failed = report.failed,
        callbacks_delivered = callbacks.delivered,
        callbacks_retrying = callbacks.retrying,
        callbacks_abandoned = callbacks.abandoned,
        callbacks_waiting = callbacks.waiting,
        callback_machines_read = callbacks.machines_read,
        tags_read = report.tags_read,
        tags_added = report.tags_added,
        tags_removed = report.tags_removed,
        defender_calls = report.calls.total(),
        calls_by_api = %calls,
        duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        local,
        errors = %errors,
        "reconcile run"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn action(id: &str, kind: &str, status: &str, created: &str) -> MachineAction {
        serde_json::from_value(json!({
            "id": id, "type": kind, "status": status, "machineId": "m1",
            "creationDateTimeUtc": created,
        }))
        .unwrap()
    }

    const R: &str = "RestrictCodeExecution";
    const U: &str = "UnrestrictCodeExecution";

    #[test]
    fn ours_succeeded_and_newest_is_released() {
        let actions = [
            action("a0", U, "Succeeded", "2026-12-01T10:00:00Z"),
            action("ours", R, "Succeeded", "2026-12-05T10:00:00Z"),
        ];
        assert_eq!(expiry_step("ours", &actions), ExpiryStep::Release);
    }

    #[test]
    fn a_later_restrict_or_release_replaces_ours_but_a_failed_one_does_not() {
        let ours = action("ours", R, "Succeeded", "2026-12-05T10:00:00Z");
        let later = |kind, status| action("later", kind, status, "2026-12-05T11:00:00Z");
        assert!(matches!(
            expiry_step("ours", &[ours.clone(), later(R, "Succeeded")]),
            ExpiryStep::End(_)
        ));
        assert!(matches!(
            expiry_step("ours", &[ours.clone(), later(R, "Pending")]),
            ExpiryStep::End(_)
        ));
        assert_eq!(
            expiry_step("ours", &[ours.clone(), later(U, "Pending")]),
            ExpiryStep::Released
        );
        assert_eq!(
            expiry_step("ours", &[ours.clone(), later(R, "Failed")]),
            ExpiryStep::Release
        );
    }

    #[test]
    fn ours_pending_waits_and_ours_failed_or_gone_ends() {
        let at = "2026-12-05T10:00:00Z";
        assert_eq!(
            expiry_step("ours", &[action("ours", R, "InProgress", at)]),
            ExpiryStep::Wait
        );
        assert!(matches!(
            expiry_step("ours", &[action("ours", R, "Failed", at)]),
            ExpiryStep::End(_)
        ));
        assert!(matches!(expiry_step("ours", &[]), ExpiryStep::End(_)));
    }

    #[test]
    fn due_only_once_its_time_has_come_and_a_claim_only_when_stale() {
        let now = OffsetDateTime::now_utc();
        let r = |state, release_at, claimed_at| Restriction {
            machine_id: "m1".into(),
            action_id: "a".into(),
            release_at,
            state,
            claimed_at,
        };
        let past = Some(now - time::Duration::seconds(1));
        assert!(is_due(&r(State::Active, past, None), now));
        assert!(!is_due(
            &r(State::Active, Some(now + time::Duration::seconds(5)), None),
            now
        ));
        assert!(!is_due(&r(State::Active, None, None), now));
        assert!(!is_due(&r(State::Releasing, past, Some(now)), now));
        assert!(is_due(
            &r(
                State::Releasing,
                past,
                Some(now - time::Duration::minutes(6))
            ),
            now
        ));
        assert!(!is_due(&r(State::Released, past, None), now));
        assert!(!is_due(&r(State::Ended, past, None), now));
    }

    #[test]
    fn the_share_of_the_hourly_budget_caps_each_run() {
        let settings = |percent| ReconcileSettings {
            restricted_tag: None,
            tag_every: time::Duration::minutes(15),
            budget_percent: percent,
            per_hour: 1500,
            run_time: Duration::from_secs(60),
        };
        assert_eq!(settings(20).calls_per_run(), 5);
        assert_eq!(settings(100).calls_per_run(), 25);
        assert_eq!(settings(0).calls_per_run(), 1);
    }
}
