//! The order API Lambda function (API Gateway HTTP API): composition root only. The logic is
//! [`saga_core::handlers::api`], which the local runner calls too.

use lambda_http::{service_fn, Error, Request, RequestExt};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, OrderApiConfig};
use saga_core::faults::Faults;
use saga_core::handlers::api::ApiHandler;
use saga_core::telemetry;

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let metrics = telemetry::lambda_metrics()?;
    let config = OrderApiConfig::load(&process_env)?;
    let clients = AwsClients::from_env()?;
    let handler = ApiHandler::new(&clients, config, Faults::none());
    let handler = &handler;
    lambda_http::run(service_fn(move |req: Request| async move {
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
