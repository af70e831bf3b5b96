//! Shared core of the order saga.
//!
//! Layers, from the inside out:
//! - [`domain`], [`messages`] and [`saga`]: pure types and rules, no AWS, no Lambda;
//! - [`idempotency`]: the one idempotency module every function uses (DynamoDB conditional puts);
//! - [`adapters`]: DynamoDB repositories, the SQS publisher and the payment provider;
//! - [`handlers`]: one per Lambda function; the thin binaries under `functions/*` and the
//!   local runner under `infra/runner` both call these, so the same code runs in both.
pub mod adapters;
pub mod aws;
pub mod config;
pub mod domain;
pub mod faults;
pub mod handlers;
pub mod idempotency;
pub mod messages;
pub mod metrics;
pub mod saga;
pub mod telemetry;
pub mod time;
