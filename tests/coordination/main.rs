//! Coordination across instances against a real storage service: Azurite
//! (npm, pinned; see `azurite.rs`). Each "instance" is its own
//! [`Coordinator`] with its own HTTP pool and state, sharing nothing but the
//! storage account, as two function app instances would.

// Test helpers, not only #[test] functions, may unwrap: a panic is a failed test.
#![allow(clippy::unwrap_used)]

mod azurite;
mod callbacks;
#[path = "../common/handler_process.rs"]
mod handler_process;
mod host_triggers;
mod instances;
mod jobs;
mod lease_edges;
mod managed_identity;
#[path = "../common/queue_host.rs"]
mod queue_host;
mod reconcile;
mod storage_costs;
mod storage_faults;
mod storage_proxy;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use azurite::Azurite;
use restrict_code_execution::{
    coordination::{
        CoordinationError, Coordinator, CoordinatorOptions, Handoff, Locked, StorageAuth,
        StorageSettings,
    },
    defender::{Endpoint, models::MachineAction},
};
use tokio::time::Instant;

fn instance(settings: &StorageSettings, options: CoordinatorOptions) -> Arc<Coordinator> {
    Arc::new(Coordinator::new(settings, options).unwrap())
}

fn short_leases() -> CoordinatorOptions {
    CoordinatorOptions {
        lease_duration: Duration::from_secs(15),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_waits_for_the_machine_lease_and_gets_it_after_release() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("locks-contend");
    let (a, b) = (
        instance(&settings, Default::default()),
        instance(&settings, Default::default()),
    );
    let soon = || Instant::now() + Duration::from_secs(20);

    let held = a.lock_machine("MACHINE-1", soon()).await.unwrap();
    held.check().unwrap();

    // B cannot have it while A holds it, whatever the case of the id.
    let err = b
        .lock_machine("machine-1", Instant::now() + Duration::from_millis(800))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CoordinationError::LockTimeout {
            machine_id: "machine-1".into()
        }
    );
    // Another machine is not blocked.
    b.lock_machine("machine-2", soon())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // B waits; it gets the lease only after A released it.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let lease = b.lock_machine("machine-1", soon()).await.unwrap();
            (SystemTime::now(), lease)
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiter.is_finished(), "B got the lease while A held it");
    let released_at = SystemTime::now();
    held.release().await.unwrap();
    let (acquired_at, lease_b) = waiter.await.unwrap();
    assert!(acquired_at >= released_at);
    lease_b.check().unwrap();

    // Dropping the guard releases in the background: A gets it back.
    drop(lease_b);
    a.lock_machine("machine-1", soon()).await.unwrap();
}

#[test]
fn a_holder_that_dies_keeps_the_others_waiting_at_most_the_lease_duration() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("locks-crash");
    let lease = short_leases().lease_duration;

    // Instance A runs on its own runtime, as its own process would.
    let dying = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = instance(&settings, short_leases());
    let held = dying.block_on(async {
        a.lock_machine("machine-crash", Instant::now() + Duration::from_secs(10))
            .await
            .unwrap()
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let b = instance(&settings, short_leases());
        // A is alive and renews: past its lease duration, B still waits.
        let err = b
            .lock_machine(
                "machine-crash",
                Instant::now() + lease + Duration::from_secs(3),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, CoordinationError::LockTimeout { .. }),
            "{err}"
        );
    });

    // A crashes: its tasks stop, nothing is released.
    std::mem::forget(held);
    dying.shutdown_background();

    runtime.block_on(async {
        let b = instance(&settings, short_leases());
        let started = Instant::now();
        // The deadline is the guarantee: at most one lease duration (plus slack).
        b.lock_machine("machine-crash", started + lease + Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            started.elapsed() > Duration::from_secs(2),
            "the dead holder's lease was still there for a while"
        );
    });
}

/// Every pair of slots `window` apart or closer holds at most `limit`.
fn assert_windows(slots: &[SystemTime], limit: usize, window: Duration) {
    let mut sorted = slots.to_vec();
    sorted.sort();
    for (i, start) in sorted.iter().enumerate() {
        let inside = sorted[i..]
            .iter()
            .take_while(|&&t| t.duration_since(*start).unwrap() < window)
            .count();
        assert!(
            inside <= limit,
            "{inside} slots within {window:?} from slot {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_never_hand_out_more_than_the_limit_per_window() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("budget-shared");
    let speed = 60.0;
    let options = || CoordinatorOptions {
        per_minute: 5,
        per_hour: 24,
        clock_speed: speed,
        ..Default::default()
    };
    // Three instances, as the scaled-out benchmark's burst runs.
    let instances = [
        instance(&settings, options()),
        instance(&settings, options()),
        instance(&settings, options()),
    ];
    let far = Instant::now() + Duration::from_secs(600);
    let before = instances
        .iter()
        .map(|c| c.storage_operations())
        .sum::<u64>();

    // 30 reservations at once, spread over the instances, then 30 more
    // trickling in over 60 ms, so that batches of different instances
    // overlap in every way.
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let c = instances[i % 3].clone();
            let delay = if i < 30 { 0 } else { fastrand::u64(0..60) };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                c.reserve_slot("restrict", far).await.unwrap()
            })
        })
        .collect();
    let mut slots = Vec::new();
    for task in tasks {
        slots.push(task.await.unwrap().at);
    }
    // Defender's windows at this clock speed (without our allowance).
    assert_windows(&slots, 5, Duration::from_secs(60).div_f64(speed));
    assert_windows(&slots, 24, Duration::from_secs(3600).div_f64(speed));
    let ops = instances
        .iter()
        .map(|c| c.storage_operations())
        .sum::<u64>()
        - before;
    println!(
        "budget: 60 reservations over 3 instances took {ops} storage operations ({:.2} each)",
        ops as f64 / 60.0
    );

    // Another API has its own bucket.
    let other = instances[0]
        .reserve_slot("list-actions", Instant::now() + Duration::from_millis(100))
        .await
        .unwrap();
    assert!(other.instant <= Instant::now() + Duration::from_millis(100));

    // A slot after the deadline is refused with the wait, and not reserved.
    let tight = Instant::now() + Duration::from_millis(100);
    let err = instances[1]
        .reserve_slot("restrict", tight)
        .await
        .unwrap_err();
    let CoordinationError::OverBudget { bucket, wait } = err else {
        panic!("{err}")
    };
    assert_eq!(bucket, "restrict");
    assert!(wait > Duration::from_millis(100), "{wait:?}");
}

/// A job's group reserves its writes' slots within the jobs' share, and the
/// reservation itself is what is checked: three instances that each see room
/// for one more group at the same moment cannot all take it. With 30 calls a
/// minute the jobs' share is 24: of three groups of ten reserved at once on
/// three instances, two fit and the third is told how long to wait; an
/// interactive call still gets its slot at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_admitting_job_groups_at_once_stay_within_the_jobs_share() {
    use restrict_code_execution::defender::budget::{BudgetError, CallBudget, Share};

    let azurite = Azurite::shared();
    let settings = azurite.settings("budget-share-race");
    let options = || CoordinatorOptions {
        per_minute: 30,
        ..Default::default()
    };
    let instances = [
        instance(&settings, options()),
        instance(&settings, options()),
        instance(&settings, options()),
    ];
    // Each sees room for its group before any of them reserves.
    for c in &instances {
        let wait = c
            .wait_for_share(Endpoint::Restrict, Share::JOBS.for_calls(10))
            .await
            .unwrap();
        assert_eq!(wait, Duration::ZERO);
    }
    let tasks: Vec<_> = instances
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move {
                c.reserve_share(
                    Endpoint::Restrict,
                    Share::JOBS.for_calls(10),
                    Instant::now() + Duration::from_secs(10),
                )
                .await
            })
        })
        .collect();
    let mut admitted = 0;
    let mut refused = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(slots) => {
                assert_eq!(slots.len(), 10);
                admitted += 1;
            }
            Err(BudgetError::OverBudget(over)) => refused.push(over.wait),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(admitted, 2, "two groups fit in 24, refused: {refused:?}");
    assert!(
        refused[0] > Duration::from_secs(50),
        "room for ten comes when the first group leaves the minute: {refused:?}"
    );
    // The rest of the minute is the interactive callers'.
    tokio::time::timeout(
        Duration::from_secs(2),
        instances[2].acquire(
            Endpoint::Restrict,
            Instant::now() + Duration::from_millis(500),
        ),
    )
    .await
    .expect("at once")
    .expect("an interactive slot");
}

/// A slot reserved ahead whose call goes late is moved to the call's time in
/// the same write that reserves it: with the minute full of the group's own
/// three slots, the late call still goes at once (its old slot is the one
/// removed), and the bucket still holds three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_call_moves_its_reserved_slot_instead_of_taking_another() {
    use restrict_code_execution::defender::budget::{CallBudget, Share};

    let azurite = Azurite::shared();
    let settings = azurite.settings("budget-move");
    let c = instance(
        &settings,
        CoordinatorOptions {
            per_minute: 3,
            clock_speed: 60.0,
            ..Default::default()
        },
    );
    let soon = || Instant::now() + Duration::from_millis(300);
    let slots = c
        .reserve_share(Endpoint::Restrict, Share::ALL.for_calls(3), soon())
        .await
        .unwrap();
    // Late: far beyond the allowance (a sixtieth of a second at 60x).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = c.storage_operations();
    tokio::time::timeout(
        Duration::from_millis(250),
        c.use_reserved(Endpoint::Restrict, slots[0], soon(), &|_| {}),
    )
    .await
    .expect("at once")
    .expect("the moved slot");
    assert_eq!(c.storage_operations() - before, 2, "one read and one write");
    // Still three in the minute: no fourth call fits.
    let err = c
        .reserve_slot("restrict", Instant::now() + Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, CoordinationError::OverBudget { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_waits_for_its_slot() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("budget-wait");
    let c = instance(
        &settings,
        CoordinatorOptions {
            per_minute: 1,
            clock_speed: 60.0,
            ..Default::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    c.reserve(Endpoint::Restrict, deadline).await.unwrap();
    let second = c.reserve_slot("restrict", deadline).await.unwrap();
    c.reserve(Endpoint::Restrict, deadline).await.unwrap();
    // The third waited for its own slot, which is after the second's.
    assert!(Instant::now() > second.instant);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_operations_per_lock_and_per_reservation() {
    let azurite = Azurite::shared();
    let c = instance(&azurite.settings("ops-count"), Default::default());
    let deadline = || Instant::now() + Duration::from_secs(10);
    let ops = |c: &Coordinator, before: u64| c.storage_operations() - before;

    let before = c.storage_operations();
    let first = c.lock_machine("m1", deadline()).await.unwrap();
    let first_acquire = ops(&c, before);
    let before = c.storage_operations();
    first.release().await.unwrap();
    let release = ops(&c, before);
    let before = c.storage_operations();
    let again = c.lock_machine("m1", deadline()).await.unwrap();
    let acquire = ops(&c, before);
    again.release().await.unwrap();

    let before = c.storage_operations();
    c.reserve_slot("restrict", deadline()).await.unwrap();
    let first_reserve = ops(&c, before);
    let before = c.storage_operations();
    c.reserve_slot("restrict", deadline()).await.unwrap();
    let reserve = ops(&c, before);

    // A waiter polls while another instance holds the lease for a second.
    let other = instance(&azurite.settings("ops-count"), Default::default());
    let held = c.lock_machine("m2", deadline()).await.unwrap();
    let before = other.storage_operations();
    let waiter = tokio::spawn({
        let other = other.clone();
        async move { other.lock_machine("m2", deadline()).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    held.release().await.unwrap();
    waiter.await.unwrap().release().await.unwrap();
    let contended = ops(&other, before);

    println!(
        "storage operations: first lock of a machine {first_acquire} (container and blob \
         created), lock {acquire}, release {release}; lock while another instance held it for \
         1 s {contended} (polls and release included); first reservation {first_reserve}, \
         reservation {reserve}"
    );
    // Uncontended steady state: one request to lock, one to release, a read
    // and a conditional write per reservation.
    assert_eq!((acquire, release, reserve), (1, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_sleeps_until_the_time_the_holder_announced_instead_of_polling() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("announce");
    let (a, b) = (
        instance(&settings, Default::default()),
        instance(&settings, Default::default()),
    );
    let soon = || Instant::now() + Duration::from_secs(30);
    let held_for = Duration::from_secs(8);

    // Without an announcement, B polls while A holds the lease.
    let held = a.lock_machine("quiet", soon()).await.unwrap();
    let before = b.storage_operations();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.lock_machine("quiet", soon()).await.unwrap() }
    });
    tokio::time::sleep(held_for).await;
    held.release().await.unwrap();
    waiter.await.unwrap().release().await.unwrap();
    let polling = b.storage_operations() - before;

    // A announces that it will be busy until about then (its POST's budget
    // slot): B looks once, sleeps, and looks again when it is due.
    let held = a.lock_machine("announced", soon()).await.unwrap();
    let released = Instant::now() + held_for;
    held.announce(released);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = b.storage_operations();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            let lease = b.lock_machine("announced", soon()).await.unwrap();
            (Instant::now(), lease)
        }
    });
    tokio::time::sleep_until(released).await;
    held.release().await.unwrap();
    let (acquired, lease) = waiter.await.unwrap();
    let announced = b.storage_operations() - before;
    lease.release().await.unwrap();

    println!(
        "storage operations of a waiter, lease held {held_for:?}: {polling} polling, {announced} \
         with the hold announced"
    );
    assert!(
        acquired >= released,
        "B got the lease only after A released it"
    );
    assert!(
        acquired < released + Duration::from_secs(2),
        "B woke up when it was due"
    );
    // Acquire (409), look, look when due (maybe once more), acquire, release.
    assert!(announced <= 6, "{announced} storage operations");
    assert!(announced < polling, "{announced} vs {polling} when polling");
}

#[test]
fn a_holder_that_dies_after_announcing_a_late_time_delays_the_others_only_until_its_lease_expires()
{
    let azurite = Azurite::shared();
    let settings = azurite.settings("announce-crash");
    let lease = short_leases().lease_duration;
    let dying = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = instance(&settings, short_leases());
    dying.block_on(async {
        let held = a
            .lock_machine("machine-late", Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        // Its POST's slot is ten minutes away, it says; then it dies.
        held.announce(Instant::now() + Duration::from_secs(600));
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::mem::forget(held);
    });
    dying.shutdown_background();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let b = instance(&settings, short_leases());
        let started = Instant::now();
        // The lease expires within its duration; a sleeping waiter looks
        // again within a third of it.
        let bound = lease + lease / 3 + Duration::from_secs(2);
        b.lock_machine("machine-late", started + bound)
            .await
            .unwrap();
        assert!(started.elapsed() > Duration::from_secs(2));
    });
}

type Seen = Arc<std::sync::Mutex<Vec<MachineAction>>>;

/// Wait for `machine`'s lease on `instance`, noting every handoff seen, each
/// answered with `answers`.
fn wait_recording_handoffs(
    instance: &Arc<Coordinator>,
    machine: &'static str,
    answers: bool,
) -> (tokio::task::JoinHandle<Locked>, Seen) {
    let seen = Seen::default();
    let waiter = tokio::spawn({
        let (instance, seen) = (instance.clone(), seen.clone());
        async move {
            let mut record = |h: &Handoff| {
                seen.lock().unwrap().push(h.action.clone());
                answers
            };
            instance
                .lock_machine_unless(
                    machine,
                    Instant::now() + Duration::from_secs(20),
                    &mut record,
                )
                .await
                .unwrap()
        }
    });
    (waiter, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_reaches_waiters_and_is_gone_once_the_next_holder_may_write() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("handoff");
    let (a, b, c) = (
        instance(&settings, Default::default()),
        instance(&settings, Default::default()),
        instance(&settings, Default::default()),
    );
    let soon = || Instant::now() + Duration::from_secs(20);
    let action: MachineAction = serde_json::from_value(
        serde_json::json!({"id": "w-1", "type": "RestrictCodeExecution", "status": "Pending"}),
    )
    .unwrap();

    // A's POST was answered: it hands the action off, then releases.
    let held = a.lock_machine("m", soon()).await.unwrap();
    held.hand_off(&action, SystemTime::now()).await;
    let (waiter, seen_by_b) = wait_recording_handoffs(&b, "m", false);
    tokio::time::sleep(Duration::from_millis(800)).await;
    held.release().await.unwrap();
    let Locked::Held(b_lease) = waiter.await.unwrap() else {
        panic!("B still needed the lease");
    };
    assert_eq!(seen_by_b.lock().unwrap().first(), Some(&action));

    // B may write now: it withdraws A's handoff first. C, waiting, never
    // sees it again.
    b_lease.withdraw_handoff().await.unwrap();
    let (waiter, seen_by_c) = wait_recording_handoffs(&c, "m", true);
    tokio::time::sleep(Duration::from_millis(800)).await;
    b_lease.release().await.unwrap();
    assert!(matches!(waiter.await.unwrap(), Locked::Held(_)));
    assert!(seen_by_c.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_before_its_slot_comes_gives_it_back_to_every_instance() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("give-back");
    let one_a_minute = CoordinatorOptions {
        per_minute: 1,
        per_hour: 100,
        ..Default::default()
    };
    let (a, b) = (
        instance(&settings, one_a_minute.clone()),
        instance(&settings, one_a_minute),
    );
    let far = || Instant::now() + Duration::from_secs(300);
    let start = Instant::now();
    a.reserve_slot("restrict", far()).await.unwrap();

    // The next slot is a minute away; its caller gives up after half a second.
    let waiting = tokio::spawn({
        let a = a.clone();
        async move { a.reserve(Endpoint::Restrict, far()).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    waiting.abort();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Another instance gets that slot, not the one after it.
    let slot = b.reserve_slot("restrict", far()).await.unwrap();
    let after = slot.instant - start;
    assert!(
        after > Duration::from_secs(55) && after < Duration::from_secs(90),
        "the given-back slot, about a minute after the first: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_fails_closed_at_once_and_recovers_when_it_is_back() {
    let mut azurite = Azurite::start();
    let settings = azurite.settings("outage");
    let c = instance(&settings, short_leases());
    let far = || Instant::now() + Duration::from_secs(60);

    let held = c.lock_machine("m-held", far()).await.unwrap();
    c.reserve_slot("restrict", far()).await.unwrap();

    azurite.stop();
    let started = Instant::now();
    let lock = c.lock_machine("m-other", far()).await.unwrap_err();
    let budget = c.reserve_slot("restrict", far()).await.unwrap_err();
    for err in [&lock, &budget] {
        let CoordinationError::Unavailable {
            retry_after,
            reason,
        } = err
        else {
            panic!("expected Unavailable, got {err}")
        };
        assert!(!retry_after.is_zero());
        // No SAS or key in what the caller (and the log) gets.
        let text = format!("{err} {err:?} {reason}");
        assert!(
            !text.contains("sig=") && !text.contains("Eby8vdM0"),
            "{text}"
        );
        assert!(text.contains("could not be reached"), "{text}");
    }
    // Not a wait for the deadline: both failed before it.
    assert!(Instant::now() < started + Duration::from_secs(30));

    // The holder cannot renew: its check fails before the lease could lapse.
    let until = Instant::now() + Duration::from_secs(15);
    while held.check().is_ok() {
        assert!(
            Instant::now() < until,
            "check still passes without renewals"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(held);

    // Storage is back (empty: in-memory): the same coordinator works again,
    // recreating its container.
    let _azurite = Azurite::start_on(azurite.port);
    c.lock_machine("m-other", far())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    c.reserve_slot("restrict", far()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sas_connection_string_is_used_as_given() {
    let azurite = Azurite::shared();
    let mut settings = azurite.settings("sas-given");
    let StorageAuth::AccountKey { account, key } = settings.auth.clone() else {
        panic!("expected a key")
    };
    let now = time::OffsetDateTime::now_utc();
    settings.auth = StorageAuth::Sas(restrict_code_execution::coordination::sas::account_sas(
        &account,
        &key,
        now - time::Duration::minutes(5),
        now + time::Duration::hours(1),
    ));
    let c = instance(&settings, Default::default());
    c.lock_machine("m1", Instant::now() + Duration::from_secs(10))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // A SAS with a wrong signature is refused: fail closed, secret-free text.
    settings.auth = StorageAuth::Sas(
        "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&sig=AAAA".into(),
    );
    let err = instance(&settings, Default::default())
        .lock_machine("m1", Instant::now() + Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CoordinationError::Unavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!err.to_string().contains("sig="), "{err}");
}

/// A `tracing` writer into memory.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// Current-thread runtime: the capture (a thread-local default) sees every task.
#[tokio::test]
async fn no_key_or_sas_reaches_the_log_even_at_trace_level() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(log.clone())
        .finish();
    let _capture = tracing::subscriber::set_default(subscriber);
    // A callsite first hit by another test's thread before this scoped
    // subscriber existed may have cached "never"; recompute every interest.
    tracing::callsite::rebuild_interest_cache();

    let mut azurite = Azurite::start();
    let settings = azurite.settings("log-capture");
    let c = instance(&settings, short_leases());
    let far = Instant::now() + Duration::from_secs(20);
    let lease = c.lock_machine("m1", far).await.unwrap();
    c.reserve_slot("restrict", far).await.unwrap();
    lease.release().await.unwrap();
    azurite.stop();
    c.lock_machine("m2", far).await.unwrap_err();
    c.reserve_slot("restrict", far).await.unwrap_err();

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("/log-capture"),
        "the capture saw the storage requests"
    );
    // The SDK logs request URLs, SAS included, with the values redacted.
    assert!(text.contains("sig=REDACTED"), "the capture saw a SAS query");
    assert!(!text.contains("Eby8vdM0"), "the account key was logged");
    for (at, _) in text.match_indices("sig=") {
        assert!(
            text[at + 4..].starts_with("REDACTED"),
            "a SAS signature was logged: {}",
            &text[at..(at + 40).min(text.len())]
        );
    }
}
