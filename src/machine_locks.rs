//! One decision at a time per machine, within this process.
//!
//! Reading a machine's actions and then acting is a check-then-act sequence:
//! two invocations for one device that interleave could both see "nothing
//! pending" and both POST. Holding a per-machine lock across read, decide and
//! act makes the second invocation see the first one's action. Concurrent
//! duplicates therefore coalesce into one Defender action, and a restrict and
//! a release for one device are put in order.
//!
//! Other instances of the function app have their own locks; across instances
//! the state check and Defender's own "already in progress" answer remain.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::OwnedMutexGuard;

/// Entries are dropped once nobody holds or waits for them.
const SWEEP_ABOVE: usize = 256;

#[derive(Debug, Default)]
pub struct MachineLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl MachineLocks {
    /// Wait for the machine's lock.
    pub async fn lock(&self, machine_id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            let key = machine_id.to_ascii_lowercase();
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    if locks.len() >= SWEEP_ABOVE {
                        locks.retain(|_, weak| weak.strong_count() > 0);
                    }
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// Machines with a lock entry (for tests of the sweep).
    pub fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_same_machine_waits_and_another_does_not() {
        let locks = Arc::new(MachineLocks::default());
        let held = locks.lock("AAA").await;

        let other = tokio::time::timeout(Duration::from_millis(50), locks.lock("bbb")).await;
        assert!(other.is_ok(), "another machine is not blocked");
        let same = tokio::time::timeout(Duration::from_millis(50), locks.lock("aaa")).await;
        assert!(same.is_err(), "the same machine (any case) waits");

        drop(held);
        let same = tokio::time::timeout(Duration::from_millis(50), locks.lock("aaa")).await;
        assert!(same.is_ok());
    }

    #[tokio::test]
    async fn unused_entries_are_swept() {
        let locks = MachineLocks::default();
        for i in 0..(SWEEP_ABOVE * 3) {
            drop(locks.lock(&format!("m{i}")).await);
        }
        assert!(locks.len() <= SWEEP_ABOVE + 1, "{}", locks.len());
    }
}
