//! The timeout sweeper Lambda function (EventBridge schedule): composition root only. The
//! logic is [`saga_core::handlers::sweeper`], which the local runner calls too.

use lambda_runtime::{Error, LambdaEvent};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, SweeperConfig};
use saga_core::handlers::sweeper::SweeperHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    saga_core::telemetry::init();
    let metrics = saga_core::telemetry::lambda_metrics()?;
    let config = SweeperConfig::load(&process_env)?;
    let clients = AwsClients::from_env().await;
    let handler = SweeperHandler::new(&clients, config);
    let handler = &handler;
    metrics_cloudwatch_embedded::lambda::handler::run(
        metrics,
        move |event: LambdaEvent<serde_json::Value>| handler.handle(event),
    )
    .await
}
