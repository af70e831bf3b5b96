//! The stock Lambda function: composition root only. The logic is
//! [`saga_core::handlers::stock`], which the local runner calls too.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    saga_core::lambda::run_sqs::<saga_core::handlers::stock::StockHandler>().await
}
