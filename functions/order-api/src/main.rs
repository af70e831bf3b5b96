//! The order API Lambda function (API Gateway HTTP API): composition root only. The logic is
//! [`saga_core::handlers::api`], which the local runner calls too.

use lambda_http::{Error, Request};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, OrderApiConfig};
use saga_core::faults::Faults;
use saga_core::handlers::api::ApiHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    saga_core::telemetry::init();
    let metrics = saga_core::telemetry::lambda_metrics()?;
    let config = OrderApiConfig::load(&process_env)?;
    let clients = AwsClients::from_env().await;
    let handler = ApiHandler::new(&clients, config, Faults::none());
    let handler = &handler;
    metrics_cloudwatch_embedded::lambda::handler::run_http(metrics, move |req: Request| {
        handler.handle(req)
    })
    .await
}
