//! Lease edges found by review: a wait dropped mid-acquire, and an
//! announcement left behind by a holder that left before its slot.
use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};

use super::{azurite::Azurite, instance, short_leases};

/// A TCP relay to `upstream` that holds back any client chunk that acquires a lease by `delay`.
async fn delaying_relay(upstream: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                    if text.contains("x-ms-lease-action: acquire") {
                        tokio::time::sleep(delay).await;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The round in restrict.rs drops `lock_machine_unless` when all its callers hang up
/// (`tokio::select!` on `all_departed`). If that happens while the acquire is in flight,
/// storage grants a lease nobody knows: every other instance waits for it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_dropped_while_acquiring_leaves_no_lease_behind() {
    let azurite = Azurite::shared();
    let direct = azurite.settings("edge-drop");
    let mut relayed = direct.clone();
    let upstream: std::net::SocketAddr = format!(
        "{}:{}",
        direct.blob_endpoint.host_str().unwrap(),
        direct.blob_endpoint.port().unwrap()
    )
    .parse()
    .unwrap();
    let relay = delaying_relay(upstream, Duration::from_millis(700)).await;
    relayed.blob_endpoint.set_port(Some(relay.port())).unwrap();

    let a = instance(&relayed, short_leases());
    let b = instance(&direct, short_leases());
    // Make sure the container and the blob exist (the relayed acquire is then a single request).
    b.lock_machine("m-drop", Instant::now() + Duration::from_secs(5))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // A's round: its callers hang up while its acquire is on its way.
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        a.lock_machine("m-drop", Instant::now() + Duration::from_secs(10)),
    )
    .await;
    assert!(dropped.is_err(), "the wait was dropped mid-acquire");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Nobody holds the machine now: B should get it at once.
    let started = Instant::now();
    let got = b
        .lock_machine("m-drop", Instant::now() + Duration::from_secs(5))
        .await;
    assert!(
        got.is_ok(),
        "B could not take a lease nobody holds for {:?}: {got:?}",
        started.elapsed()
    );
}

/// A holder announces a late slot (its POST's), then its caller hangs up before the slot:
/// the round releases the lease without sending anything. The announcement stays in the
/// blob's metadata: the next holder (which announces nothing: its own call is due at once)
/// keeps its waiters asleep for up to a third of the lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_announcement_does_not_put_the_next_holders_waiters_to_sleep() {
    let azurite = Azurite::shared();
    let settings = azurite.settings("edge-stale");
    let (a, b, c) = (
        instance(&settings, Default::default()),
        instance(&settings, Default::default()),
        instance(&settings, Default::default()),
    );
    let soon = || Instant::now() + Duration::from_secs(30);

    let held = a.lock_machine("m-stale", soon()).await.unwrap();
    held.announce(Instant::now() + Duration::from_secs(120));
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await.unwrap(); // its caller left before the slot came

    let b_lease = b.lock_machine("m-stale", soon()).await.unwrap();
    let waiter = tokio::spawn({
        let c = c.clone();
        async move {
            let lease = c.lock_machine("m-stale", soon()).await.unwrap();
            (Instant::now(), lease)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    b_lease.release().await.unwrap();
    let (acquired, _lease) = waiter.await.unwrap();
    let late = acquired - released;
    assert!(
        late < Duration::from_secs(3),
        "C took the lease {late:?} after B released it (B never announced anything)"
    );
}
