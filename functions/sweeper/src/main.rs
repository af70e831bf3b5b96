//! The timeout sweeper Lambda function (EventBridge schedule): composition root only. The
//! logic is [`saga_core::handlers::sweeper`], which the local runner calls too.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    saga_core::lambda::run_sweeper().await
}
