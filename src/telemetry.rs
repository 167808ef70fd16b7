//! Logging: JSON lines on stdout, which the Functions host collects.
//!
//! Each line carries the fields of the current span, so every line logged
//! during an invocation has its `invocation_id`. `RUST_LOG` filters as usual.

use tracing_subscriber::{EnvFilter, fmt};

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), which keeps tests simple.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true)
        .with_target(true)
        .with_writer(std::io::stdout)
        .try_init();
}
