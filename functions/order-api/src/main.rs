//! The order API Lambda function (API Gateway HTTP API): composition root only. The logic is
//! [`saga_core::handlers::api`], which the local runner calls too.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    saga_core::lambda::run_api().await
}
