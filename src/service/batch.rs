//! One read answers every waiter that joined before it was sent.
//!
//! Defender counts calls per API, so in a burst the reads that come before
//! each POST (finding the machine, reading its actions) would spend the
//! budget many times over. A [`Batcher`] collects waiters in its *open batch*;
//! one reader task sends one read for the whole batch (its [`Source`] decides
//! how: key by key, or one tenant-wide list) and hands each waiter its value.
//!
//! The rule that keeps shared reads from being stale: a batch *closes* before
//! its read is sent; a waiter that comes later joins the next batch, never a
//! read already in flight. So a waiter's value always comes from a read sent
//! after it asked. A source that lists the whole tenant keeps the batch open
//! while it waits for a rate-budget slot and closes it right before its first
//! request goes out; a source that reads key by key closes it first, since
//! its keys are fixed from then on.
//!
//! A failed read fails every waiter of its batch with the same error; a waiter
//! whose deadline passes stops waiting and the read goes on for the others.
//! When every waiter of a batch has gone, its read is dropped, and with it any
//! rate-budget slot it was still waiting for.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    hash::Hash,
    sync::Arc,
};

use parking_lot::Mutex;
use tokio::{sync::watch, time::Instant};

use crate::defender::{Endpoint, client::BeforeSend, error::Refusal};

/// Closes the batch being read (idempotent): called right before the first
/// request of the read is sent, or before a key-by-key read decides its keys.
pub type Close<'a> = &'a (dyn Fn() + Sync);

/// The hook a tenant-wide read hands to the Defender client: it closes the
/// batch right before the read's first request goes out.
pub struct CloseOnSend<'a>(pub Close<'a>);

#[async_trait::async_trait]
impl BeforeSend for CloseOnSend<'_> {
    async fn before_send(&self, _: Endpoint) -> Result<Option<Instant>, Refusal> {
        (self.0)();
        Ok(None)
    }
}

/// How one batch is read.
pub trait Source: Send + Sync + 'static {
    type Key: Clone + Eq + Hash + Send + Sync + 'static;
    type Value: Clone + Send + Sync + 'static;
    type Error: Clone + Send + Sync + 'static;

    /// Read `keys` by `deadline` (the latest of the waiters'). `close` must
    /// be called before anything is sent.
    fn read(
        &self,
        keys: Vec<Self::Key>,
        deadline: Instant,
        close: Close<'_>,
    ) -> impl Future<Output = Result<Answered<Self::Key, Self::Value>, Self::Error>> + Send;

    /// `key` joined the open batch (called under the batcher's lock, after
    /// the key is a member): a source that waits for expected keys before
    /// it sends learns here that one has come.
    fn joined(&self, key: &Self::Key) {
        let _ = key;
    }

    /// A waiter's deadline passed before its batch was read.
    fn out_of_time() -> Self::Error;

    /// The reader stopped without an answer (it panicked).
    fn abandoned() -> Self::Error;
}

/// What one read found.
#[derive(Debug)]
pub struct Answered<K, V> {
    pub values: HashMap<K, V>,
    /// `true`: the read covered every key (a tenant-wide list), so a key
    /// missing from `values` has no value. `false`: only the keys in
    /// `values` were read; a waiter whose key is missing (it joined after
    /// the keys were taken) waits for the next read.
    pub complete: bool,
}

type Answer<S> =
    Result<Arc<Answered<<S as Source>::Key, <S as Source>::Value>>, <S as Source>::Error>;

/// Batches reads of one [`Source`].
pub struct Batcher<S: Source> {
    source: S,
    inner: Mutex<Inner<S>>,
}

struct Inner<S: Source> {
    /// The batch that new waiters join; `None` once it closed.
    open: Option<Arc<Batch<S>>>,
    /// A reader task is working through batches.
    reader_running: bool,
}

struct Batch<S: Source> {
    members: Mutex<Members<S::Key>>,
    done: watch::Sender<Option<Answer<S>>>,
}

struct Members<K> {
    keys: HashSet<K>,
    /// The latest deadline among the waiters: the read may take that long.
    deadline: Option<Instant>,
}

impl<S: Source> std::fmt::Debug for Batcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<S: Source> Batcher<S> {
    pub fn new(source: S) -> Arc<Self> {
        Arc::new(Self {
            source,
            inner: Mutex::new(Inner {
                open: None,
                reader_running: false,
            }),
        })
    }

    /// `key`'s value from a read sent after this call began.
    pub async fn get(
        self: &Arc<Self>,
        key: S::Key,
        deadline: Instant,
    ) -> Result<Option<S::Value>, S::Error> {
        loop {
            let mut done = self.join(&key, deadline);
            let answer =
                match tokio::time::timeout_at(deadline, done.wait_for(Option::is_some)).await {
                    Err(_) => return Err(S::out_of_time()),
                    Ok(Ok(answer)) => answer.clone(),
                    // The reader never drops a batch unanswered; if it did
                    // (a panic), say so rather than hang.
                    Ok(Err(_)) => None,
                };
            match answer {
                Some(Ok(answered)) => match answered.values.get(&key) {
                    Some(value) => return Ok(Some(value.clone())),
                    None if answered.complete => return Ok(None),
                    // Joined after that read took its keys: the next one.
                    None => {}
                },
                Some(Err(e)) => return Err(e),
                None => return Err(S::abandoned()),
            }
        }
    }

    /// Join the open batch (or open one) and make sure a reader runs.
    fn join(
        self: &Arc<Self>,
        key: &S::Key,
        deadline: Instant,
    ) -> watch::Receiver<Option<Answer<S>>> {
        let mut inner = self.inner.lock();
        let batch = inner
            .open
            .get_or_insert_with(|| {
                Arc::new(Batch {
                    members: Mutex::new(Members {
                        keys: HashSet::new(),
                        deadline: None,
                    }),
                    done: watch::Sender::new(None),
                })
            })
            .clone();
        {
            let mut members = batch.members.lock();
            members.keys.insert(key.clone());
            members.deadline = Some(members.deadline.map_or(deadline, |d| d.max(deadline)));
        }
        self.source.joined(key);
        let receiver = batch.done.subscribe();
        if !inner.reader_running {
            inner.reader_running = true;
            let batcher = Arc::clone(self);
            tokio::spawn(async move { batcher.run_reader().await });
        }
        receiver
    }

    /// Serve batches one after another until none is open.
    async fn run_reader(self: Arc<Self>) {
        // If a read panics, the next waiter starts a new reader, and the
        // batch being read is answered `abandoned` (its sender is dropped).
        let _reset = ReaderReset(&self);
        loop {
            let batch = {
                let mut inner = self.inner.lock();
                match inner.open.clone() {
                    Some(batch) => batch,
                    None => {
                        inner.reader_running = false;
                        return;
                    }
                }
            };
            let close = || self.close(&batch);
            // Keys and deadline as they are now; a tenant-wide read answers
            // waiters that join until it closes the batch, too.
            let (keys, deadline) = snapshot(&batch);
            // When every waiter has gone (their callers hung up), the read is
            // dropped: a slot it still waited for goes back to the budget.
            let answer = tokio::select! {
                answer = self.source.read(keys, deadline, &close) => answer,
                () = batch.done.closed() => {
                    close();
                    if batch.done.receiver_count() == 0 {
                        continue;
                    }
                    // Someone joined just as the others left: read for them.
                    let (keys, deadline) = snapshot(&batch);
                    self.source.read(keys, deadline, &close).await
                }
            };
            // Closed already before anything was sent; closing again covers a
            // read that failed before sending anything.
            close();
            batch.done.send_replace(Some(answer.map(Arc::new)));
        }
    }

    /// Stop new waiters from joining `batch`.
    fn close(&self, batch: &Arc<Batch<S>>) {
        let mut inner = self.inner.lock();
        if inner
            .open
            .as_ref()
            .is_some_and(|open| Arc::ptr_eq(open, batch))
        {
            inner.open = None;
        }
    }
}

/// Marks the reader stopped and drops the batch it was reading when the
/// reader's task ends abnormally (a panic), so that the next waiter starts a
/// new one and the current waiters are answered at once.
struct ReaderReset<'a, S: Source>(&'a Batcher<S>);

impl<S: Source> Drop for ReaderReset<'_, S> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut inner = self.0.inner.lock();
            inner.open = None;
            inner.reader_running = false;
        }
    }
}

/// The batch's keys and the latest deadline among its waiters, as they are now.
fn snapshot<S: Source>(batch: &Batch<S>) -> (Vec<S::Key>, Instant) {
    let members = batch.members.lock();
    (
        members.keys.iter().cloned().collect(),
        members.deadline.unwrap_or_else(Instant::now),
    )
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            OnceLock,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    type LateWaiter = tokio::task::JoinHandle<Result<Option<String>, String>>;

    /// Reads key by key; on its first read, another waiter joins after the
    /// keys were taken and before the batch closes (as a waiter on another
    /// worker thread can).
    struct KeyByKey {
        batcher: OnceLock<std::sync::Weak<Batcher<KeyByKey>>>,
        reads: AtomicUsize,
        late: Mutex<Option<LateWaiter>>,
    }

    impl Source for KeyByKey {
        type Key = String;
        type Value = String;
        type Error = String;

        async fn read(
            &self,
            keys: Vec<String>,
            _deadline: Instant,
            close: Close<'_>,
        ) -> Result<Answered<String, String>, String> {
            if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
                let batcher = self.batcher.get().and_then(std::sync::Weak::upgrade);
                if let Some(batcher) = batcher {
                    let late = tokio::spawn(async move {
                        batcher
                            .get("late".to_owned(), Instant::now() + Duration::from_secs(30))
                            .await
                    });
                    tokio::task::yield_now().await;
                    *self.late.lock() = Some(late);
                }
            }
            close();
            Ok(Answered {
                values: keys.into_iter().map(|k| (k.clone(), k)).collect(),
                complete: false,
            })
        }

        fn out_of_time() -> String {
            "out of time".into()
        }

        fn abandoned() -> String {
            "abandoned".into()
        }
    }

    #[tokio::test]
    async fn a_waiter_that_joins_after_the_keys_were_taken_waits_for_the_next_read() {
        let batcher = Batcher::new(KeyByKey {
            batcher: OnceLock::new(),
            reads: AtomicUsize::new(0),
            late: Mutex::new(None),
        });
        let _ = batcher.source.batcher.set(Arc::downgrade(&batcher));
        let soon = || Instant::now() + Duration::from_secs(30);

        let first = batcher.get("first".to_owned(), soon()).await;

        assert_eq!(first, Ok(Some("first".to_owned())));
        let late = batcher.source.late.lock().take();
        let late = late
            .expect("the late waiter joined")
            .await
            .expect("no panic");
        assert_eq!(late, Ok(Some("late".to_owned())), "never an unread None");
        assert_eq!(batcher.source.reads.load(Ordering::SeqCst), 2);
    }

    struct PanicsOnce(AtomicUsize);

    impl Source for PanicsOnce {
        type Key = u32;
        type Value = u32;
        type Error = String;

        async fn read(
            &self,
            keys: Vec<u32>,
            _deadline: Instant,
            close: Close<'_>,
        ) -> Result<Answered<u32, u32>, String> {
            close();
            assert!(
                self.0.fetch_add(1, Ordering::SeqCst) > 0,
                "a bug in one read"
            );
            Ok(Answered {
                values: keys.into_iter().map(|k| (k, k)).collect(),
                complete: false,
            })
        }

        fn out_of_time() -> String {
            "out of time".into()
        }

        fn abandoned() -> String {
            "abandoned".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_panicking_read_does_not_wedge_the_reads_after_it() {
        let batcher = Batcher::new(PanicsOnce(AtomicUsize::new(0)));
        let soon = || Instant::now() + Duration::from_secs(30);

        let first = batcher.get(1, soon()).await;
        let second = batcher.get(2, soon()).await;

        assert_eq!(first, Err("abandoned".to_owned()));
        assert_eq!(second, Ok(Some(2)));
    }
}
