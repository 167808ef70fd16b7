//! Logging: JSON lines on stdout, which the Functions host collects.
//!
//! Each line carries the fields of the current span, so every line logged
//! during an invocation has its `invocation_id`. `RUST_LOG` filters as usual.

use tracing_subscriber::{EnvFilter, fmt};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Serving: the Functions host collects stdout.
    Stdout,
    /// `handler invoke`: stdout carries only the answer, so it can be piped.
    Stderr,
}

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), which keeps tests simple.
pub fn init(target: LogTarget) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true)
        .with_target(true)
        .with_writer(move || -> Box<dyn std::io::Write> {
            match target {
                LogTarget::Stdout => Box::new(std::io::stdout()),
                LogTarget::Stderr => Box::new(std::io::stderr()),
            }
        })
        .try_init();
}
