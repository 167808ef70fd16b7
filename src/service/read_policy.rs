//! Key by key, or one tenant-wide read: the one rule that the batched
//! machine lookups ([`super::machine_directory`]) and state reads
//! ([`super::state_reads`]) both follow.
//!
//! Reading each key by itself gives small answers at once; a tenant-wide
//! read answers every key, however many join, for a fixed number of calls
//! (one per 10,000 records and per type filter). So a batch is read key by
//! key when that takes fewer calls than the last tenant-wide read did, or
//! while it takes at most half of what the rate budget has left right now:
//! the rest stays for the tenant-wide reads that serve everyone once the
//! budget is tight, which is when it matters.
//!
//! At equal cost the two reads differ in who they answer: key by key closes
//! its batch at once, while a tenant-wide read keeps it open until its first
//! request leaves, which on a tight budget is after a wait for a slot, and
//! answers every waiter that joined meanwhile. [`Tie`] says which one a
//! source takes then.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Which read a batch gets when key by key takes exactly as many calls as
/// the tenant-wide read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tie {
    /// The smaller answers (machine lookups: one device need not list the
    /// whole tenant).
    KeyByKey,
    /// The read that also answers the waiters joining while it waits for
    /// its slot (state reads in a burst).
    TenantWide,
}

/// The rule, and what the last tenant-wide read cost.
#[derive(Debug)]
pub(crate) struct ReadPolicy {
    /// Calls the last tenant-wide read took.
    tenant_calls: AtomicUsize,
    /// The fewest calls a tenant-wide read takes.
    least: usize,
    tie: Tie,
    /// Fewest calls only: never key by key merely because the budget has
    /// room (background work, which has time but must not spend the calls).
    cheapest: bool,
}

impl ReadPolicy {
    /// `least`: the fewest calls a tenant-wide read takes (one per type it
    /// filters on), assumed until one has been made.
    pub(crate) fn new(least: usize, tie: Tie) -> Self {
        Self {
            tenant_calls: AtomicUsize::new(least),
            least,
            tie,
            cheapest: false,
        }
    }

    /// The read that takes the fewest calls, whatever the budget has left.
    pub(crate) fn cheapest(least: usize, tie: Tie) -> Self {
        Self {
            cheapest: true,
            ..Self::new(least, tie)
        }
    }

    /// Whether `keys` keys are read one by one. `needs`: for each endpoint
    /// the key-by-key reads use, how many calls they take and how many free
    /// slots its budget has now.
    pub(crate) fn key_by_key(&self, keys: usize, needs: &[(usize, usize)]) -> bool {
        let tenant_calls = self.tenant_calls.load(Ordering::Relaxed);
        keys < tenant_calls
            || (keys == tenant_calls && self.tie == Tie::KeyByKey)
            || (!self.cheapest && needs.iter().all(|&(calls, free)| calls * 2 <= free))
    }

    /// Remember what a tenant-wide read took (pages, over every filter).
    pub(crate) fn tenant_read_took(&self, calls: usize) {
        self.tenant_calls
            .store(calls.max(self.least), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_by_key_while_cheaper_or_within_half_the_budget() {
        let policy = ReadPolicy::new(2, Tie::KeyByKey);
        // No dearer than the tenant read: one by one, however tight.
        assert!(policy.key_by_key(2, &[(2, 0)]));
        // Within half of what is left.
        assert!(policy.key_by_key(5, &[(5, 10)]));
        assert!(!policy.key_by_key(5, &[(5, 9)]));
        // Every endpoint must fit.
        assert!(!policy.key_by_key(5, &[(2, 10), (3, 5)]));
        // A large tenant makes its read dearer, and key by key cheaper.
        policy.tenant_read_took(6);
        assert!(policy.key_by_key(5, &[(5, 0)]));
        policy.tenant_read_took(1);
        assert!(!policy.key_by_key(3, &[(3, 0)]));
    }

    #[test]
    fn the_cheapest_policy_ignores_the_budget_room() {
        let policy = ReadPolicy::cheapest(2, Tie::TenantWide);
        assert!(policy.key_by_key(1, &[(1, 100)]));
        assert!(!policy.key_by_key(2, &[(2, 100)]));
        assert!(!policy.key_by_key(10, &[(10, 100)]));
    }

    #[test]
    fn a_tie_goes_tenant_wide_when_the_source_says_so() {
        let policy = ReadPolicy::new(2, Tie::TenantWide);
        assert!(policy.key_by_key(1, &[(1, 0)]));
        assert!(!policy.key_by_key(2, &[(2, 0)]));
        // Within half of what is left, key by key all the same.
        assert!(policy.key_by_key(2, &[(2, 4)]));
    }
}
