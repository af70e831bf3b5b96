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

/// Installs the CloudWatch embedded-metric-format recorder for a Lambda function: the
/// counters the handlers emit (see [`crate::metrics`]) are written to stdout as EMF documents
/// after each invocation, in namespace `OrderSaga` with the function's name as a dimension.
/// Without a recorder (the local runner, tests) the counters are no-ops.
pub fn lambda_metrics(
) -> Result<&'static metrics_cloudwatch_embedded::Collector, lambda_runtime::Error> {
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into());
    metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("OrderSaga")
        .with_dimension("function", function)
        .lambda_cold_start_metric("ColdStart")
        .with_lambda_request_id("RequestId")
        .init()
}
