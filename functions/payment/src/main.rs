//! The payment Lambda function: composition root only. The logic is
//! [`saga_core::handlers::payment`], which the local runner calls too.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Error, LambdaEvent};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, PaymentConfig};
use saga_core::faults::Faults;
use saga_core::handlers::payment::PaymentHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    saga_core::telemetry::init();
    let metrics = saga_core::telemetry::lambda_metrics()?;
    let config = PaymentConfig::load(&process_env)?;
    let clients = AwsClients::from_env().await;
    let handler = PaymentHandler::new(&clients, config, Faults::none());
    let handler = &handler;
    metrics_cloudwatch_embedded::lambda::handler::run(
        metrics,
        move |event: LambdaEvent<SqsEvent>| handler.handle(event),
    )
    .await
}
