//! Logging and metrics.
//!
//! Logs are JSON lines on stdout; Lambda's JSON log format keeps them structured. The level is
//! Lambda's own setting when there is one (`AWS_LAMBDA_LOG_LEVEL`, set by the function's
//! `LoggingConfig.ApplicationLogLevel`), else `RUST_LOG` (a level: `error`, `warn`, `info`,
//! `debug`, `trace`), else `info`. A plain level filter rather than per-module directives keeps
//! the regex engine out of the Lambda binaries.

use tracing::level_filters::LevelFilter;

use crate::config::{Lookup, process_env};

/// The log level from the environment (see the module documentation).
pub fn level(lambda_level: Option<&str>, rust_log: Option<&str>) -> LevelFilter {
    let parse = |s: &str| {
        // Accept `info` and also the last level of a directive list like `saga_core=debug`.
        let last = s.rsplit([',', '=']).next().unwrap_or(s).trim();
        last.parse::<LevelFilter>().ok()
    };
    lambda_level
        .and_then(parse)
        .or_else(|| rust_log.and_then(parse))
        .unwrap_or(LevelFilter::INFO)
}

/// The log level `env` asks for (see the module documentation).
pub fn level_from(env: &impl Lookup) -> LevelFilter {
    level(
        env.get("AWS_LAMBDA_LOG_LEVEL").as_deref(),
        env.get("RUST_LOG").as_deref(),
    )
}

/// Installs the global JSON subscriber. Safe to call more than once (later calls are no-ops).
pub fn init() {
    let level = level_from(&process_env);
    let _already_installed = tracing_subscriber::fmt()
        .json()
        .with_max_level(level)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// The CloudWatch embedded-metric-format collector for a Lambda function: the counters the
/// handlers emit (see [`crate::metrics`]) are written to stdout as one EMF document after each
/// invocation ([`flush_metrics`]), in namespace `OrderSaga` with the function's name as a
/// dimension. Without a collector (the local runner, tests) the counters are no-ops.
pub fn lambda_metrics()
-> Result<&'static metrics_cloudwatch_embedded::Collector, lambda_runtime::Error> {
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into());
    metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("OrderSaga")
        .with_dimension("function", function)
        .init()
}

/// Writes the invocation's metrics. A failure to write is logged, not fatal: the invocation's
/// work is done and must still be acknowledged.
pub fn flush_metrics(metrics: &metrics_cloudwatch_embedded::Collector, request_id: &str) {
    if let Err(e) = metrics
        .set_property("RequestId", request_id.to_string())
        .flush(std::io::stdout())
    {
        tracing::warn!(error = %e, "could not write metrics");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_lambda_sets_a_level_should_prefer_it_to_rust_log() {
        assert_eq!(level(Some("DEBUG"), Some("error")), LevelFilter::DEBUG);
        assert_eq!(level(None, Some("warn")), LevelFilter::WARN);
        assert_eq!(
            level(None, Some("hyper=info,saga_core=trace")),
            LevelFilter::TRACE
        );
        assert_eq!(level(None, Some("nonsense")), LevelFilter::INFO);
        assert_eq!(level(None, None), LevelFilter::INFO);
    }
}
