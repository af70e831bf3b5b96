//! One handler per Lambda function. Each takes the raw Lambda event, so the binaries under
//! `functions/*` ([`crate::lambda`]) and the local runner call exactly the same code.
//!
//! Every handler is generic over the ports it uses ([`crate::ports`]); its defaults are the
//! DynamoDB and SQS adapters, which [`Function::from_env`] builds from the function's
//! environment.
pub mod api;
pub mod batch;
pub mod coordinator;
pub mod payment;
pub mod stock;
pub mod sweeper;

use crate::aws::AwsClients;
use crate::config::{ConfigError, Lookup};
use crate::faults::Faults;

/// A function's handler, built the same way in Lambda and in the local runner.
pub trait Function: Sized + Send + Sync + 'static {
    /// The handler with the production adapters, configured from the function's environment
    /// (`env`: the process environment in Lambda, the template's in the local runner).
    fn from_env(
        clients: &AwsClients,
        env: &impl Lookup,
        faults: Faults,
    ) -> Result<Self, ConfigError>;
}

/// What the handlers' unit tests share: events as Lambda hands them over.
#[cfg(test)]
pub(crate) mod testing {
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    use lambda_runtime::{Context, LambdaEvent};

    /// An SQS event with one record per body, message ids `m0`, `m1`, ...
    pub fn sqs_event(bodies: &[serde_json::Value]) -> LambdaEvent<SqsEvent> {
        let records = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let mut m = SqsMessage::default();
                m.message_id = Some(format!("m{i}"));
                m.body = Some(match body {
                    serde_json::Value::String(raw) => raw.clone(),
                    other => other.to_string(),
                });
                m
            })
            .collect();
        let mut event = SqsEvent::default();
        event.records = records;
        LambdaEvent::new(event, Context::default())
    }

    /// A pending order of `quantity` units of `p-1` at 300 cents, created at `created_ms`.
    pub fn order(order_id: &str, quantity: u64, created_ms: i64) -> crate::domain::Order {
        let request = crate::domain::PlaceOrderRequest {
            items: vec![crate::domain::ItemRequest {
                product_id: "p-1".into(),
                quantity,
            }],
            payment_method: None,
        };
        crate::domain::price_order(order_id.into(), "c-1", &request, |_| Some(300), created_ms)
            .expect("p-1 has a price")
    }

    /// The message ids a batch response reports as failed.
    pub fn failed(response: &aws_lambda_events::event::sqs::SqsBatchResponse) -> Vec<String> {
        response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect()
    }
}
