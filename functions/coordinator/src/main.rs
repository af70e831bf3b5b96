//! The coordinator Lambda function: composition root only. The logic is
//! [`saga_core::handlers::coordinator`], which the local runner calls too.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, CoordinatorConfig};
use saga_core::faults::Faults;
use saga_core::handlers::coordinator::CoordinatorHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    saga_core::telemetry::init();
    let metrics = saga_core::telemetry::lambda_metrics()?;
    let config = CoordinatorConfig::load(&process_env)?;
    let clients = AwsClients::from_env().await;
    let handler = CoordinatorHandler::new(&clients, config, Faults::none());
    let handler = &handler;
    metrics_cloudwatch_embedded::lambda::handler::run(
        metrics,
        move |event: LambdaEvent<SqsEvent>| handler.handle(event),
    )
    .await
}
