//! Adapters of the ports ([`crate::ports`]): DynamoDB repositories, the SQS publisher, the
//! simulated payment provider, and in-memory versions of all of them for unit tests.
pub mod dynamo;
pub mod memory;
pub mod orders;
pub mod payment;
pub mod products;
pub mod sqs;
pub mod stock;
