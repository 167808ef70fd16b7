//! A callback receiver for tests: an HTTP server on loopback that records
//! every request (headers and exact body), fails the first N with 500, or
//! answers every request with a redirect.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, response::IntoResponse};
use parking_lot::Mutex;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    fail_first: Arc<AtomicUsize>,
    redirect_to: Arc<Mutex<Option<String>>>,
}

pub struct Receiver {
    shared: Shared,
    pub addr: SocketAddr,
}

impl Receiver {
    /// Listens on 127.0.0.1 at a free port.
    pub async fn start() -> Self {
        let shared = Shared::default();
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { shared, addr }
    }

    /// The URL of `path` on this receiver (with a secret-looking query).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}?sig=TOPSECRET", self.addr.port())
    }

    /// Answer the next `n` requests 500.
    pub fn fail_next(&self, n: usize) {
        self.shared.fail_first.store(n, Ordering::SeqCst);
    }

    /// Answer every request 302 to `location`.
    pub fn redirect_to(&self, location: &str) {
        *self.shared.redirect_to.lock() = Some(location.to_owned());
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().clone()
    }
}

async fn receive(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    shared.received.lock().push(Received { headers, body });
    if let Some(location) = shared.redirect_to.lock().clone() {
        return (axum::http::StatusCode::FOUND, [("Location", location)]).into_response();
    }
    let failing = shared
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
    } else {
        axum::http::StatusCode::OK.into_response()
    }
}
