//! Machine actions and their life on the simulated clock.
//!
//! An action's status is never stored; it is computed from simulated time on
//! every read, so no background task is needed and a sped-up or jumped clock
//! is seen immediately:
//!
//! ```text
//! created ──pending_for──▶ InProgress ──in_progress_for──▶ Succeeded (or Failed,
//!    │                                                      when scheduled for the machine)
//!    │ (device offline: the countdown starts only when it comes back)
//!    └──────────── 3 sim days without pick-up ────────────▶ TimeOut
//! ```
//!
//! A cancel takes effect `cancel_takes` after the call: an action that is
//! still under way then is `Cancelled`; one that finished first keeps its
//! final status (the cancel lost the race).
//!
//! Defender documents a three-day retry window for isolation on offline
//! devices; the simulator assumes the same for restrict.

use serde_json::{Map, Value, json};
use time::{Duration, OffsetDateTime};

use super::ActionFields;
use super::clock::{END_OF_TIME, timestamp};
use crate::defender::{
    models::{ActionStatus, ActionType, MachineAction},
    timestamp::Timestamp,
};

/// How long an action waits for an offline device before `TimeOut`.
pub(crate) const OFFLINE_TIMEOUT: Duration = Duration::days(3);

/// The configured phase lengths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Life {
    pub(crate) pending_for: Duration,
    pub(crate) in_progress_for: Duration,
    /// Between a cancel call and its effect.
    pub(crate) cancel_takes: Duration,
    pub(crate) fields: ActionFields,
}

#[derive(Debug, Clone)]
pub(crate) struct Cancellation {
    pub(crate) requestor: String,
    pub(crate) comment: String,
    /// When the cancel was called.
    pub(crate) at: OffsetDateTime,
    /// When it takes effect (`at + cancel_takes`).
    pub(crate) effective: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub(crate) struct ActionRecord {
    /// Creation order; breaks ties between equal creation times.
    pub(crate) seq: u64,
    pub(crate) id: String,
    pub(crate) kind: ActionType,
    pub(crate) machine_id: String,
    /// The machine's name, reported once the device has picked the action up.
    pub(crate) machine_name: Option<String>,
    pub(crate) requestor: String,
    pub(crate) comment: String,
    pub(crate) created: OffsetDateTime,
    /// When the `Pending` countdown started: at creation for an online device,
    /// when it came back for an offline one; `None` while it is held.
    pub(crate) countdown_from: Option<OffsetDateTime>,
    pub(crate) cancellation: Option<Cancellation>,
    /// Whether the device fails to carry the action out.
    pub(crate) fails: bool,
}

/// Where an action is at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Phase {
    pub(crate) status: ActionStatus,
    /// `lastUpdateDateTimeUtc`: the last transition, `None` while `Pending`.
    pub(crate) updated: Option<OffsetDateTime>,
    /// Whether the device has picked the action up (it then reports its name).
    pub(crate) picked_up: bool,
}

impl ActionRecord {
    /// The action's phase at `now`.
    pub(crate) fn phase(&self, now: OffsetDateTime, life: Life) -> Phase {
        if let Some(cancel) = self.cancellation.as_ref().filter(|c| now >= c.effective) {
            let before = self.natural_phase(cancel.effective, life);
            // An action that finished before the cancel took effect keeps
            // its final status.
            if !before.status.is_terminal() {
                return Phase {
                    status: ActionStatus::Cancelled,
                    updated: Some(cancel.effective),
                    picked_up: before.picked_up,
                };
            }
        }
        self.natural_phase(now, life)
    }

    /// The phase ignoring cancellation.
    fn natural_phase(&self, now: OffsetDateTime, life: Life) -> Phase {
        let timeout_at = add(self.created, OFFLINE_TIMEOUT);
        let pickup = self
            .countdown_from
            .map(|start| add(start, life.pending_for))
            .filter(|pickup| *pickup < timeout_at);
        let Some(pickup) = pickup.filter(|p| now >= *p) else {
            // Not picked up (yet): Pending until the timeout.
            // A pick-up is only ever scheduled before the timeout, so reaching
            // the timeout un-picked means it never happened.
            return if now >= timeout_at {
                Phase {
                    status: ActionStatus::TimeOut,
                    updated: Some(timeout_at),
                    picked_up: false,
                }
            } else {
                Phase {
                    status: ActionStatus::Pending,
                    updated: None,
                    picked_up: false,
                }
            };
        };
        let done = add(pickup, life.in_progress_for);
        if now < done {
            Phase {
                status: ActionStatus::InProgress,
                updated: Some(pickup),
                picked_up: true,
            }
        } else {
            Phase {
                status: if self.fails {
                    ActionStatus::Failed
                } else {
                    ActionStatus::Succeeded
                },
                updated: Some(done),
                picked_up: true,
            }
        }
    }

    /// The wire form at `now`.
    pub(crate) fn to_wire(&self, now: OffsetDateTime, life: Life) -> MachineAction {
        let phase = self.phase(now, life);
        let cancel = self.cancellation.as_ref();
        let mut extra = Map::new();
        // E_FAIL for a failed action, 0 otherwise (as captured).
        let error_hresult: i64 = if phase.status == ActionStatus::Failed {
            -2_147_467_259
        } else {
            0
        };
        let fields = json!({
            "scope": null,
            "requestSource": "PublicApi",
            "cancellationRequestor": cancel.map(|c| c.requestor.clone()),
            "cancellationComment": cancel.map(|c| c.comment.clone()),
            "cancellationDateTimeUtc": cancel.map(|c| timestamp(c.at)),
            "commands": [],
            "externalId": null,
            "errorHResult": error_hresult,
            "troubleshootInfo": null,
            "relatedFileInfo": null,
            "title": match self.kind {
                ActionType::RestrictCodeExecution => "Restrict code execution",
                ActionType::UnrestrictCodeExecution => "Unrestrict code execution",
            },
        });
        if let Value::Object(fields) = fields {
            extra.extend(fields);
        }
        MachineAction {
            id: self.id.as_str().into(),
            action_type: self.kind.into(),
            status: phase.status.into(),
            machine_id: Some(self.machine_id.as_str().into()),
            computer_dns_name: if phase.picked_up || life.fields == ActionFields::FromCreation {
                self.machine_name.clone()
            } else {
                None
            },
            requestor: Some(self.requestor.clone()),
            requestor_comment: Some(self.comment.clone()),
            creation_date_time_utc: Some(Timestamp::defender_style(self.created)),
            last_update_date_time_utc: match (phase.updated, life.fields) {
                (Some(updated), _) => Some(Timestamp::defender_style(updated)),
                (None, ActionFields::FromCreation) => Some(Timestamp::defender_style(self.created)),
                (None, ActionFields::WhenPickedUp) => None,
            },
            extra: extra.into(),
        }
    }
}

/// `t + d`, saturating at the latest representable instant.
fn add(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    t.checked_add(d).map_or(END_OF_TIME, |t| t.min(END_OF_TIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-01-01 00:00:00 UTC);
    const LIFE: Life = Life {
        pending_for: Duration::seconds(2),
        in_progress_for: Duration::seconds(3),
        cancel_takes: Duration::ZERO,
        fields: ActionFields::WhenPickedUp,
    };

    fn record(countdown_from: Option<OffsetDateTime>) -> ActionRecord {
        ActionRecord {
            seq: 0,
            id: "a".to_owned(),
            kind: ActionType::RestrictCodeExecution,
            machine_id: "m".to_owned(),
            machine_name: Some("DESKTOP".to_owned()),
            requestor: "app".to_owned(),
            comment: "c".to_owned(),
            created: T0,
            countdown_from,
            cancellation: None,
            fails: false,
        }
    }

    fn status_at(r: &ActionRecord, secs: i64) -> ActionStatus {
        r.phase(T0 + Duration::seconds(secs), LIFE).status
    }

    #[test]
    fn online_life_pending_in_progress_succeeded() {
        let r = record(Some(T0));
        assert_eq!(status_at(&r, 0), ActionStatus::Pending);
        assert_eq!(status_at(&r, 1), ActionStatus::Pending);
        assert_eq!(status_at(&r, 2), ActionStatus::InProgress);
        assert_eq!(status_at(&r, 4), ActionStatus::InProgress);
        assert_eq!(status_at(&r, 5), ActionStatus::Succeeded);
        assert_eq!(status_at(&r, 500_000), ActionStatus::Succeeded);

        let pending = r.to_wire(T0, LIFE);
        assert_eq!(pending.computer_dns_name, None);
        assert_eq!(pending.last_update_date_time_utc, None);
        assert_eq!(pending.extra.to_map()["title"], "Restrict code execution");
        assert_eq!(pending.extra.to_map()["scope"], Value::Null);
        let done = r.to_wire(T0 + Duration::seconds(9), LIFE);
        assert_eq!(done.status, "Succeeded");
        assert_eq!(done.computer_dns_name.as_deref(), Some("DESKTOP"));
        assert_eq!(
            done.last_update_date_time_utc
                .map(|t| t.to_string())
                .as_deref(),
            Some("2024-01-01T00:00:05.0000000Z")
        );
    }

    #[test]
    fn offline_action_times_out_after_three_days() {
        let r = record(None);
        assert_eq!(status_at(&r, 3 * 86_400 - 1), ActionStatus::Pending);
        let timed_out = r.phase(T0 + OFFLINE_TIMEOUT, LIFE);
        assert_eq!(timed_out.status, ActionStatus::TimeOut);
        assert_eq!(timed_out.updated, Some(T0 + OFFLINE_TIMEOUT));
    }

    #[test]
    fn device_back_online_starts_the_countdown() {
        let r = record(Some(T0 + Duration::hours(1)));
        assert_eq!(status_at(&r, 3600), ActionStatus::Pending);
        assert_eq!(status_at(&r, 3602), ActionStatus::InProgress);
        assert_eq!(status_at(&r, 3605), ActionStatus::Succeeded);
        // Back too late to be picked up before the timeout.
        let late = record(Some(T0 + OFFLINE_TIMEOUT - Duration::seconds(1)));
        assert_eq!(
            late.phase(T0 + OFFLINE_TIMEOUT, LIFE).status,
            ActionStatus::TimeOut
        );
    }

    #[test]
    fn cancellation_freezes_the_phase() {
        let mut r = record(Some(T0));
        r.cancellation = Some(Cancellation {
            requestor: "app".to_owned(),
            comment: "stop".to_owned(),
            at: T0 + Duration::seconds(3),
            effective: T0 + Duration::seconds(3),
        });
        let phase = r.phase(T0 + Duration::days(9), LIFE);
        assert_eq!(phase.status, ActionStatus::Cancelled);
        assert!(phase.picked_up);
        let wire = r.to_wire(T0 + Duration::days(9), LIFE);
        assert_eq!(wire.extra.to_map()["cancellationComment"], "stop");
        assert_eq!(
            wire.extra.to_map()["cancellationDateTimeUtc"],
            "2024-01-01T00:00:03.0000000Z"
        );
    }

    #[test]
    fn fields_from_creation_while_pending() {
        let r = record(Some(T0));
        let life = Life {
            fields: ActionFields::FromCreation,
            ..LIFE
        };
        let pending = r.to_wire(T0, life);
        assert_eq!(pending.status, "Pending");
        assert_eq!(pending.computer_dns_name.as_deref(), Some("DESKTOP"));
        assert_eq!(
            pending
                .last_update_date_time_utc
                .map(|t| t.to_string())
                .as_deref(),
            Some("2024-01-01T00:00:00.0000000Z")
        );
    }

    #[test]
    fn scheduled_failure_ends_failed() {
        let mut r = record(Some(T0));
        r.fails = true;
        assert_eq!(status_at(&r, 4), ActionStatus::InProgress);
        assert_eq!(status_at(&r, 5), ActionStatus::Failed);
        let wire = r.to_wire(T0 + Duration::seconds(5), LIFE);
        assert_ne!(wire.extra.to_map()["errorHResult"], 0);
    }

    #[test]
    fn delayed_cancel_takes_effect_later_or_loses_the_race() {
        let cancel_at = |at: i64, takes: i64| Cancellation {
            requestor: "app".to_owned(),
            comment: "stop".to_owned(),
            at: T0 + Duration::seconds(at),
            effective: T0 + Duration::seconds(at + takes),
        };
        let mut r = record(Some(T0));
        r.cancellation = Some(cancel_at(0, 1));
        assert_eq!(status_at(&r, 0), ActionStatus::Pending);
        assert_eq!(status_at(&r, 1), ActionStatus::Cancelled);
        assert_eq!(status_at(&r, 60), ActionStatus::Cancelled);
        // Effective at 6 s, but the action succeeded at 5 s.
        r.cancellation = Some(cancel_at(1, 5));
        assert_eq!(status_at(&r, 3), ActionStatus::InProgress);
        assert_eq!(status_at(&r, 5), ActionStatus::Succeeded);
        assert_eq!(status_at(&r, 60), ActionStatus::Succeeded);
    }
}
