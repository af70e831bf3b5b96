//! The stock Lambda function: composition root only. The logic is
//! [`saga_core::handlers::stock`], which the local runner calls too.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, StockConfig};
use saga_core::faults::Faults;
use saga_core::handlers::stock::StockHandler;
use saga_core::telemetry;

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let metrics = telemetry::lambda_metrics()?;
    let config = StockConfig::load(&process_env)?;
    let clients = AwsClients::from_env()?;
    let handler = StockHandler::new(&clients, config, Faults::none());
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let request_id = event.context.request_id.clone();
        let response = handler.handle(event).await;
        telemetry::flush_metrics(metrics, &request_id);
        response
    }))
    .await
}
