//! Adapters: DynamoDB repositories, the SQS publisher, and the payment provider.
pub mod dynamo;
pub mod orders;
pub mod payment;
pub mod products;
pub mod sqs;
pub mod stock;
