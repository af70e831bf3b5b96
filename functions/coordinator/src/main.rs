//! The coordinator Lambda function: composition root only. The logic is
//! [`saga_core::handlers::coordinator`], which the local runner calls too.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use saga_core::aws::AwsClients;
use saga_core::config::{process_env, CoordinatorConfig};
use saga_core::faults::Faults;
use saga_core::handlers::coordinator::CoordinatorHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    saga_core::telemetry::init();
    let config = CoordinatorConfig::load(&process_env)?;
    let clients = AwsClients::from_env().await;
    let handler = CoordinatorHandler::new(&clients, config, Faults::none());
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<_>| {
        handler.handle(event)
    }))
    .await
}
