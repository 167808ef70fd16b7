//! One round at a time per machine, within this process.
//!
//! Reading a machine's actions and then acting is a check-then-act sequence:
//! two invocations for one device that interleave could both see "nothing
//! pending" and both POST. So each machine's requests wait in a queue, and
//! one round at a time serves them: it takes every request queued so far,
//! reads the machine's actions once, and serves them in order (see
//! [`super::restrict`]). Concurrent duplicates therefore coalesce into one
//! Defender action, and a restrict and a release for one device are put in
//! order.
//!
//! A machine has an entry here exactly while a round is running for it.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::defender::ids::MachineId;

/// Queued jobs per machine.
#[derive(Debug)]
pub struct MachineQueues<J> {
    queues: Mutex<HashMap<MachineId, Vec<J>>>,
}

impl<J> Default for MachineQueues<J> {
    fn default() -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl<J> MachineQueues<J> {
    /// Queue `job`. `true` when no round runs for the machine: the caller
    /// must start one, which then [`take`](Self::take)s until it gets `None`.
    pub fn push(&self, key: &MachineId, job: J) -> bool {
        let mut queues = self.queues.lock();
        match queues.get_mut(key) {
            Some(queue) => {
                queue.push(job);
                false
            }
            None => {
                queues.insert(key.clone(), vec![job]);
                true
            }
        }
    }

    /// Every job queued for the machine, in order; `None` when there is none,
    /// which also ends the machine's round.
    pub fn take(&self, key: &MachineId) -> Option<Vec<J>> {
        let mut queues = self.queues.lock();
        match queues.get_mut(key) {
            Some(queue) if !queue.is_empty() => Some(std::mem::take(queue)),
            _ => {
                queues.remove(key);
                None
            }
        }
    }

    /// End the machine's round without serving what is queued (the round
    /// failed): the queued jobs are dropped, which their invocations notice.
    pub fn abandon(&self, key: &MachineId) {
        let mut queues = self.queues.lock();
        queues.remove(key);
    }

    /// Machines with a running round.
    pub fn len(&self) -> usize {
        self.queues.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_job_starts_a_round_and_later_ones_join_it() {
        let queues = MachineQueues::default();
        let (aaa, bbb) = (MachineId::from("aaa"), MachineId::from("bbb"));
        assert!(queues.push(&aaa, 1));
        assert!(!queues.push(&aaa, 2), "a round is running");
        assert!(
            !queues.push(&MachineId::from("AAA"), 3),
            "the same machine in another case joins it"
        );
        assert!(queues.push(&bbb, 4), "another machine has its own round");
        assert_eq!(queues.take(&aaa), Some(vec![1, 2, 3]));
        assert!(!queues.push(&aaa, 5), "still running until take says None");
        assert_eq!(queues.take(&aaa), Some(vec![5]));
        assert_eq!(queues.take(&aaa), None);
        assert!(queues.push(&aaa, 6), "the round ended: a new one starts");
        assert_eq!(queues.len(), 2);
    }

    #[test]
    fn an_abandoned_round_lets_the_next_job_start_one() {
        let queues = MachineQueues::default();
        let aaa = MachineId::from("aaa");
        assert!(queues.push(&aaa, 1));
        queues.abandon(&aaa);
        assert!(queues.is_empty());
        assert!(queues.push(&aaa, 2));
    }
}
