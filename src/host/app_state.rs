//! What every invocation of the process shares: the restrictor (with its
//! Defender client) and the invocation-wide settings. Built once at startup
//! by [`crate::startup::prepare`].

use std::{sync::Arc, time::Duration};

use crate::{
    coordination::records::MemoryRecords,
    host::http_mode::HttpMode,
    service::{callbacks::Outbox, jobs::Jobs, reconcile::Reconciler, restrict::Restrictor},
};

/// `STALE_PENDING_HOURS`' default: a day.
const DEFAULT_STALE_PENDING: Duration = Duration::from_secs(24 * 3600);

/// Shared by every invocation of the process.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    restrictor: Restrictor,
    /// Bound on one invocation, below the host's functionTimeout.
    request_timeout: Duration,
    /// `ALLOWED_CALLER_ROLES`; empty means no role check.
    allowed_roles: Vec<String>,
    /// `STALE_PENDING_HOURS`: when an `already_pending` action may be stuck.
    stale_pending: Duration,
    /// Containment jobs.
    jobs: Option<Jobs>,
    /// The reconciler (expiries, the Defender tag) and its records.
    reconciler: Option<Reconciler>,
    /// The Defender portal of the configured cloud (device links).
    portal: &'static str,
    /// Pending completion callbacks.
    callbacks: Outbox,
    /// How the host passes HTTP requests on (which forwarded headers it set).
    http_mode: HttpMode,
}

impl AppState {
    pub fn new(
        restrictor: Restrictor,
        request_timeout: Duration,
        allowed_roles: Vec<String>,
    ) -> Self {
        // In this process's memory, with the default settings, until the
        // composition root sets the real ones.
        let callbacks = Outbox::new(
            Arc::new(MemoryRecords::new()),
            Default::default(),
            restrictor.clone(),
            None,
        );
        Self {
            inner: Arc::new(Inner {
                callbacks,
                restrictor,
                request_timeout,
                allowed_roles,
                stale_pending: DEFAULT_STALE_PENDING,
                jobs: None,
                reconciler: None,
                portal: "https://security.microsoft.com",
                http_mode: HttpMode::default(),
            }),
        }
    }

    /// Sets `STALE_PENDING_HOURS`; called at startup, before the state is shared.
    pub fn with_stale_pending(mut self, after: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.stale_pending = after;
        }
        self
    }

    /// Sets the containment jobs; called at startup, before the state is shared.
    pub fn with_jobs(mut self, jobs: Jobs) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.jobs = Some(jobs);
        }
        self
    }

    /// Sets the reconciler; called at startup, before the state is shared.
    pub fn with_reconciler(mut self, reconciler: Reconciler) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.reconciler = Some(reconciler);
        }
        self
    }

    /// Sets the callback outbox; called at startup, before the state is shared.
    pub fn with_callbacks(mut self, callbacks: Outbox) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.callbacks = callbacks;
        }
        self
    }

    /// Sets the Defender portal the device links point at; called at startup.
    pub fn with_portal(mut self, portal: &'static str) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.portal = portal;
        }
        self
    }

    /// Sets how the host passes HTTP requests on; called at startup.
    pub fn with_http_mode(mut self, mode: HttpMode) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.http_mode = mode;
        }
        self
    }

    /// How the host passes HTTP requests on.
    pub fn http_mode(&self) -> HttpMode {
        self.inner.http_mode
    }

    /// The Defender portal of the configured cloud.
    pub fn portal(&self) -> &'static str {
        self.inner.portal
    }

    /// The reconciler (always set by the composition root).
    pub fn reconciler(&self) -> Option<&Reconciler> {
        self.inner.reconciler.as_ref()
    }

    /// The pending completion callbacks.
    pub fn callbacks(&self) -> &Outbox {
        &self.inner.callbacks
    }

    /// Containment jobs (always set by the composition root).
    pub fn jobs(&self) -> Option<&Jobs> {
        self.inner.jobs.as_ref()
    }

    /// How long an `already_pending` action may be pending before the answer
    /// says it may be stuck.
    pub fn stale_pending(&self) -> Duration {
        self.inner.stale_pending
    }

    pub fn restrictor(&self) -> &Restrictor {
        &self.inner.restrictor
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// `ALLOWED_CALLER_ROLES`; empty means no role check.
    pub fn allowed_roles(&self) -> &[String] {
        &self.inner.allowed_roles
    }
}
