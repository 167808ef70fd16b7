//! Deciding what to do from a machine's recent actions, before acting.
//!
//! Defender has no "is this device restricted" property; the state follows
//! from the machine's restrict/unrestrict actions (the machine entity,
//! <https://learn.microsoft.com/defender-endpoint/api/machine>, has no
//! restriction property; the portal only changes its button). And
//! Defender itself is unsafe with duplicates: a pending action can finish
//! *after* a later opposite one and leave the device in the wrong state. So,
//! before any POST:
//! 1. an opposite-type action still Pending/InProgress is a conflict: refuse,
//!    or cancel it first when the caller asked for that (`cancelPending`);
//! 2. a same-type action still Pending/InProgress is returned as is;
//! 3. when the Succeeded action that *finished* last is of the wanted type,
//!    the device is already in the wanted state (unless `force`). Finishing
//!    order, not creation order: an action for an offline device can finish
//!    long after a later one;
//! 4. otherwise act.
//!
//! Failed, TimeOut and Cancelled actions do not change the state. With no
//! Succeeded action at all the state is unknown (history is not kept forever),
//! so the service acts rather than assume.

use time::OffsetDateTime;

use crate::defender::{
    ids::MachineId,
    models::{ActionStatus, ActionType, MachineAction},
    timestamp::Timestamp,
};

/// What the caller's request comes to, given the machine's actions.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// An opposite-type action is still pending; acting now could end out of order.
    Conflict(MachineAction),
    /// Cancel these opposite-type actions, then decide again.
    Cancel(Vec<MachineAction>),
    /// The same action is already on its way.
    AlreadyPending(MachineAction),
    /// The newest successful action already did what is asked.
    AlreadyInState(MachineAction),
    /// Create the action.
    Act,
}

/// What the caller asked for.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub action: ActionType,
    pub force: bool,
    pub cancel_pending: bool,
}

/// `machine_id`: the machine deciding for, as a [`MachineId`] or the text of one.
pub fn decide<M>(machine_id: &M, actions: &[MachineAction], wanted: Wanted) -> Decision
where
    M: ?Sized,
    MachineId: PartialEq<M>,
{
    // Only this machine's restrict/unrestrict actions, newest first. The
    // server's order and filter are not trusted with the decision.
    let mut relevant: Vec<(&MachineAction, ActionType, ActionStatus)> = actions
        .iter()
        .filter(|a| a.machine_id.as_ref().is_none_or(|id| *id == *machine_id))
        .filter_map(|a| Some((a, a.action_type.known()?, a.status.known()?)))
        .collect();
    relevant.sort_by_key(|(a, _, _)| std::cmp::Reverse(created(a)));

    let pending = |kind: ActionType| {
        relevant
            .iter()
            .filter(move |(_, t, s)| *t == kind && !s.is_terminal())
            .map(|(a, _, _)| (*a).clone())
    };

    let opposite: Vec<MachineAction> = pending(wanted.action.opposite()).collect();
    if let Some(newest) = opposite.first() {
        return if wanted.cancel_pending {
            Decision::Cancel(opposite)
        } else {
            Decision::Conflict(newest.clone())
        };
    }
    if let Some(same) = pending(wanted.action).next() {
        return Decision::AlreadyPending(same);
    }
    match deciding_action(relevant.iter().map(|(a, _, _)| *a)) {
        Some((a, t)) if t == wanted.action && !wanted.force => Decision::AlreadyInState(a.clone()),
        _ => Decision::Act,
    }
}

/// The action that decides a machine's state, and its type: the state is what
/// the `Succeeded` restrict or unrestrict action that *finished* last left
/// behind. `None`: no such action, the state is unknown. Of equal finishing
/// times the last one in `actions` wins. The fleet view uses the same rule.
pub(crate) fn deciding_action<'a>(
    actions: impl IntoIterator<Item = &'a MachineAction>,
) -> Option<(&'a MachineAction, ActionType)> {
    actions
        .into_iter()
        .filter(|a| a.status.known() == Some(ActionStatus::Succeeded))
        .filter_map(|a| Some((a, a.action_type.known()?)))
        .max_by_key(|(a, _)| finished(a))
}

/// When an action reached its state: its last update, else its creation.
pub(crate) fn finished(action: &MachineAction) -> Option<OffsetDateTime> {
    action
        .last_update_date_time_utc
        .map(Timestamp::at)
        .or_else(|| created(action))
}

/// Unknown creation times (absent, or not RFC 3339) sort as the oldest.
pub(crate) fn created(action: &MachineAction) -> Option<OffsetDateTime> {
    action.creation_date_time_utc.map(Timestamp::at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ActionType::{RestrictCodeExecution as R, UnrestrictCodeExecution as U};

    const M: &str = "c5cb89852ce0d21636c0491709a4571b5f190e75";

    fn action(id: &str, kind: ActionType, status: &str, minute: u32) -> MachineAction {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "type": kind.as_str(),
            "status": status,
            "machineId": M,
            "creationDateTimeUtc": format!("2026-11-28T10:{minute:02}:00.0000000Z"),
        }))
        .unwrap()
    }

    fn wanted(action: ActionType) -> Wanted {
        Wanted {
            action,
            force: false,
            cancel_pending: false,
        }
    }

    #[test]
    fn no_history_acts() {
        assert_eq!(decide(M, &[], wanted(R)), Decision::Act);
        assert_eq!(decide(M, &[], wanted(U)), Decision::Act);
    }

    #[test]
    fn a_pending_same_type_action_is_returned() {
        for status in ["Pending", "InProgress"] {
            let actions = [action("a", R, status, 1)];
            assert_eq!(
                decide(M, &actions, wanted(R)),
                Decision::AlreadyPending(actions[0].clone())
            );
        }
    }

    #[test]
    fn a_pending_opposite_action_conflicts_unless_cancel_is_asked() {
        let actions = [action("r", R, "InProgress", 1)];
        assert_eq!(
            decide(M, &actions, wanted(U)),
            Decision::Conflict(actions[0].clone())
        );
        let cancel = Wanted {
            cancel_pending: true,
            ..wanted(U)
        };
        assert_eq!(
            decide(M, &actions, cancel),
            Decision::Cancel(actions.to_vec())
        );
    }

    #[test]
    fn an_opposite_pending_action_wins_over_a_same_type_one() {
        // The out-of-order hazard: an older restrict still pending behind a
        // pending release could finish last.
        let actions = [action("u", U, "Pending", 2), action("r", R, "Pending", 1)];
        assert_eq!(
            decide(M, &actions, wanted(U)),
            Decision::Conflict(actions[1].clone())
        );
    }

    #[test]
    fn the_newest_succeeded_action_decides_the_state() {
        let restricted = [
            action("r2", R, "Succeeded", 3),
            action("u1", U, "Succeeded", 2),
        ];
        assert_eq!(
            decide(M, &restricted, wanted(R)),
            Decision::AlreadyInState(restricted[0].clone())
        );
        assert_eq!(decide(M, &restricted, wanted(U)), Decision::Act);
        let forced = Wanted {
            force: true,
            ..wanted(R)
        };
        assert_eq!(decide(M, &restricted, forced), Decision::Act);
    }

    #[test]
    fn the_action_that_finished_last_decides_even_if_it_was_created_first() {
        // A restrict for an offline device, created at :00, finished at :30;
        // a release created at :05 finished at :06. The device is restricted.
        let mut restrict = action("r", R, "Succeeded", 0);
        restrict.last_update_date_time_utc = Timestamp::parse("2026-11-28T10:30:00Z");
        let mut release = action("u", U, "Succeeded", 5);
        release.last_update_date_time_utc = Timestamp::parse("2026-11-28T10:06:00Z");
        let actions = [release, restrict];
        assert_eq!(decide(M, &actions, wanted(U)), Decision::Act);
        assert_eq!(
            decide(M, &actions, wanted(R)),
            Decision::AlreadyInState(actions[1].clone())
        );
    }

    #[test]
    fn failed_timed_out_and_cancelled_actions_do_not_change_the_state() {
        let actions = [
            action("u3", U, "Failed", 5),
            action("u2", U, "TimeOut", 4),
            action("u1", U, "Cancelled", 3),
            action("r", R, "Succeeded", 1),
        ];
        assert_eq!(
            decide(M, &actions, wanted(R)),
            Decision::AlreadyInState(actions[3].clone())
        );
    }

    #[test]
    fn order_comes_from_creation_time_not_from_the_list_and_other_types_are_ignored() {
        let mut isolate = action("i", R, "Pending", 9);
        isolate.action_type = "Isolate".into();
        let mut other_machine = action("x", R, "Pending", 8);
        other_machine.machine_id = Some("ffff".into());
        let actions = [
            isolate,
            other_machine,
            action("r1", R, "Succeeded", 1),
            action("u2", U, "Succeeded", 2),
        ];
        assert_eq!(
            decide(M, &actions, wanted(U)),
            Decision::AlreadyInState(actions[3].clone())
        );
        assert_eq!(decide(M, &actions, wanted(R)), Decision::Act);
    }
}
