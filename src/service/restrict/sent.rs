//! What an invocation's orders came to, for its log line when the caller
//! hangs up before the answer.
//!
//! A round sees a POST or cancel through even after its caller went away
//! ([`super::round`]); the action it created then has no answer to go into.
//! The invocation runs its work inside [`Sent::scope`]: each order it queues
//! for a machine round is counted there until the round is done with it, and
//! what the order came to (the action, or the error) is kept. Once every
//! order is done, the invocation's line can say what was sent.

use std::{future::Future, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{
    defender::ids::ActionId,
    service::{restrict::Outcome, service_error::ServiceError},
};

tokio::task_local! {
    static SENT: Sent;
}

/// What the orders of one invocation came to. Cheap to clone: clones share it.
#[derive(Debug, Clone)]
pub struct Sent(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    results: Mutex<Vec<OrderResult>>,
    /// Orders queued and not done with yet.
    open: watch::Sender<usize>,
}

/// What one order came to.
#[derive(Debug, Clone)]
pub enum OrderResult {
    /// It succeeded with this action (created, or already pending or done).
    Acted {
        outcome: Outcome,
        action_id: ActionId,
    },
    /// It failed after its round started it.
    Failed(ServiceError),
}

impl Default for Sent {
    fn default() -> Self {
        Self(Arc::new(Inner {
            results: Mutex::new(Vec::new()),
            open: watch::Sender::new(0),
        }))
    }
}

impl Sent {
    /// Run `work` with its machine orders counted here.
    pub async fn scope<F: Future>(&self, work: F) -> F::Output {
        SENT.scope(self.clone(), work).await
    }

    /// Resolves once no order of the invocation is queued or being served.
    pub async fn settled(&self) {
        let mut open = self.0.open.subscribe();
        let _ = open.wait_for(|&n| n == 0).await;
    }

    /// What the orders done so far came to, in the order they finished.
    pub fn results(&self) -> Vec<OrderResult> {
        self.0.results.lock().clone()
    }

    /// The action the last order that acted came to.
    pub fn last_action(&self) -> Option<(Outcome, ActionId)> {
        self.results().into_iter().rev().find_map(|r| match r {
            OrderResult::Acted { outcome, action_id } => Some((outcome, action_id)),
            OrderResult::Failed(_) => None,
        })
    }
}

/// One order counted in the invocation's [`Sent`], if the invocation runs
/// in one; done with when dropped.
#[derive(Debug)]
pub(super) struct OrderReport(Option<Sent>);

impl OrderReport {
    /// Count an order of the current invocation.
    pub fn open() -> Self {
        let sent = SENT.try_with(Clone::clone).ok();
        if let Some(sent) = &sent {
            sent.0.open.send_modify(|n| *n += 1);
        }
        Self(sent)
    }

    /// What the order came to.
    pub fn record(&self, result: OrderResult) {
        if let Some(sent) = &self.0 {
            sent.0.results.lock().push(result);
        }
    }
}

impl Drop for OrderReport {
    fn drop(&mut self) {
        if let Some(sent) = &self.0 {
            sent.0.open.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}
