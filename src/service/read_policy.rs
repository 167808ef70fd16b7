//! Key by key, or one tenant-wide read: the one rule that the batched
//! machine lookups ([`super::machine_directory`]) and state reads
//! ([`super::state_reads`]) both follow.
//!
//! Reading each key by itself gives small answers at once; a tenant-wide
//! read answers every key, however many join, for a fixed number of calls
//! (one per 10,000 records and per type filter). So a batch is read key by
//! key when that takes no more calls than the last tenant-wide read did, or
//! while it takes at most half of what the rate budget has left right now:
//! the rest stays for the tenant-wide reads that serve everyone once the
//! budget is tight, which is when it matters.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The rule, and what the last tenant-wide read cost.
#[derive(Debug)]
pub(crate) struct ReadPolicy {
    /// Calls the last tenant-wide read took.
    tenant_calls: AtomicUsize,
    /// The fewest calls a tenant-wide read takes.
    least: usize,
}

impl ReadPolicy {
    /// `least`: the fewest calls a tenant-wide read takes (one per type it
    /// filters on), assumed until one has been made.
    pub(crate) fn new(least: usize) -> Self {
        Self {
            tenant_calls: AtomicUsize::new(least),
            least,
        }
    }

    /// Whether `keys` keys are read one by one. `needs`: for each endpoint
    /// the key-by-key reads use, how many calls they take and how many free
    /// slots its budget has now.
    pub(crate) fn key_by_key(&self, keys: usize, needs: &[(usize, usize)]) -> bool {
        keys <= self.tenant_calls.load(Ordering::Relaxed)
            || needs.iter().all(|&(calls, free)| calls * 2 <= free)
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
        let policy = ReadPolicy::new(2);
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
}
