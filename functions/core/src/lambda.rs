//! What every Lambda binary's `main` does: install logging and the metrics collector, build
//! the SDK clients and the handler from the environment (once, at cold start), then serve
//! invocations, writing the metrics after each one. The binaries under `functions/*` are one
//! call to one of these.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;

use crate::aws::AwsClients;
use crate::config::process_env;
use crate::faults::Faults;
use crate::handlers::Function;
use crate::handlers::api::ApiHandler;
use crate::handlers::batch::SqsHandler;
use crate::handlers::sweeper::SweeperHandler;
use crate::telemetry;

type Metrics = &'static metrics_cloudwatch_embedded::Collector;

fn start<H: Function>() -> Result<(H, Metrics), Error> {
    telemetry::init();
    let metrics = telemetry::lambda_metrics()?;
    let clients = AwsClients::from_env()?;
    let handler = H::from_env(&clients, &process_env, Faults::none())?;
    Ok((handler, metrics))
}

/// Serves an SQS-triggered function (stock, payment, coordinator).
pub async fn run_sqs<H: Function + SqsHandler>() -> Result<(), Error> {
    let (handler, metrics) = start::<H>()?;
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let request_id = event.context.request_id.clone();
        let response = handler.handle(event).await.map_err(Error::from);
        telemetry::flush_metrics(metrics, &request_id);
        response
    }))
    .await
}

/// Serves the order API (API Gateway HTTP API, payload format 2.0).
pub async fn run_api() -> Result<(), Error> {
    use lambda_http::RequestExt;
    let (handler, metrics) = start::<ApiHandler>()?;
    let handler = &handler;
    lambda_http::run(service_fn(move |req: lambda_http::Request| async move {
        let request_id = req
            .lambda_context_ref()
            .map(|c| c.request_id.clone())
            .unwrap_or_default();
        let response = handler.handle(req).await;
        telemetry::flush_metrics(metrics, &request_id);
        response
    }))
    .await
}

/// Serves the scheduled timeout sweeper.
pub async fn run_sweeper() -> Result<(), Error> {
    let (handler, metrics) = start::<SweeperHandler>()?;
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let request_id = event.context.request_id.clone();
        let response = handler.handle(event).await;
        telemetry::flush_metrics(metrics, &request_id);
        response
    }))
    .await
}
