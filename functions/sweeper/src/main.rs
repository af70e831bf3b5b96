//! The timeout sweeper Lambda function (EventBridge schedule): composition root only. The
//! logic is [`saga_core::handlers::sweeper`], which the local runner calls too.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, SweeperConfig};
use saga_core::handlers::sweeper::SweeperHandler;
use saga_core::telemetry;

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let metrics = telemetry::lambda_metrics()?;
    let config = SweeperConfig::load(&process_env)?;
    let clients = AwsClients::from_env()?;
    let handler = SweeperHandler::new(&clients, config);
    let handler = &handler;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            let request_id = event.context.request_id.clone();
            let response = handler.handle(event).await;
            telemetry::flush_metrics(metrics, &request_id);
            response
        },
    ))
    .await
}
