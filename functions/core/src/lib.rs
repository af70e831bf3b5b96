//! Shared core of the order saga.
//!
//! Layers, from the inside out:
//! - [`domain`], [`messages`] and [`saga`]: pure types and rules, no AWS, no Lambda;
//! - [`ports`]: one small trait per capability the handlers need (orders, products, stock,
//!   idempotency, publishing, the payment provider);
//! - [`idempotency`]: every rule about doing a step once, and its DynamoDB adapter;
//! - [`adapters`]: the DynamoDB and SQS adapters of the ports, the simulated payment provider,
//!   and in-memory adapters for unit tests;
//! - [`handlers`]: one per Lambda function, generic over the ports; [`lambda`] runs them in
//!   Lambda, and the local runner under `infra/runner` calls the same handlers.
pub mod adapters;
pub mod aws;
pub mod config;
pub mod domain;
pub mod faults;
pub mod handlers;
pub mod idempotency;
pub mod identity;
pub mod lambda;
pub mod messages;
pub mod metrics;
pub mod ports;
pub mod saga;
pub mod telemetry;
pub mod time;
