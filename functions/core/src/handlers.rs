//! One handler per Lambda function. Each takes the raw Lambda event, so the binaries under
//! `functions/*` and the local runner call exactly the same code.
pub mod api;
pub mod batch;
pub mod coordinator;
pub mod payment;
pub mod stock;
pub mod sweeper;
