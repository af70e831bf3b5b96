//! Logging: JSON lines to stdout, level from `RUST_LOG` (default `info`).
//! Lambda's JSON log format picks these up as structured records.

use tracing_subscriber::EnvFilter;

/// Installs the global JSON subscriber. Safe to call more than once (later calls are no-ops).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _already_installed = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true)
        .without_time()
        .try_init();
}
