//! The timeout sweeper, run on a schedule: finds orders still pending after the timeout
//! through the sparse pending-orders index (a query, not a scan) and hands each to the
//! coordinator as an `OrderTimedOut` event. The coordinator cancels with a conditional update,
//! so a sweep racing a late confirmation cannot corrupt the order, and compensates whatever
//! succeeded. If a run dies half way, the next run finds the same orders again.
//!
//! It also hands over, as `OrderCancelled`, the orders a customer cancelled whose
//! compensations may not have been sent (the API died between its write and its messages):
//! the coordinator sends them and clears the mark.

use lambda_runtime::LambdaEvent;
use serde_json::{Value, json};
use std::time::Duration;

use super::Function;
use crate::adapters::orders::DynamoOrders;
use crate::adapters::sqs::SqsPublisher;
use crate::aws::AwsClients;
use crate::config::{ConfigError, Lookup, SweeperConfig};
use crate::faults::Faults;
use crate::messages::SagaEvent;
use crate::ports::{Orders, Publish};

/// Most orders one run hands over; the rest wait for the next run.
pub const MAX_PER_RUN: usize = 1_000;

pub struct SweeperHandler<O = DynamoOrders, P = SqsPublisher> {
    orders: O,
    publisher: P,
    coordinator_queue_url: String,
    order_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] crate::adapters::dynamo::StoreError),
    #[error(transparent)]
    Publish(#[from] crate::adapters::sqs::PublishError),
}

impl SweeperHandler {
    /// The handler on DynamoDB and SQS.
    pub fn new(clients: &AwsClients, config: SweeperConfig) -> Self {
        Self::with_ports(
            DynamoOrders::new(clients.dynamodb.clone(), config.orders_table)
                .with_pending_index(config.pending_index),
            SqsPublisher::new(clients.sqs.clone()),
            config.coordinator_queue_url,
            config.order_timeout,
        )
    }
}

impl Function for SweeperHandler {
    /// The sweeper has no fault points: `faults` is not used.
    fn from_env(
        clients: &AwsClients,
        env: &impl Lookup,
        _faults: Faults,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(clients, SweeperConfig::load(env)?))
    }
}

impl<O: Orders, P: Publish> SweeperHandler<O, P> {
    pub fn with_ports(
        orders: O,
        publisher: P,
        coordinator_queue_url: String,
        order_timeout: Duration,
    ) -> Self {
        Self {
            orders,
            publisher,
            coordinator_queue_url,
            order_timeout,
        }
    }

    /// Takes the scheduled event (its content is not needed) and returns a summary.
    pub async fn handle(&self, _event: LambdaEvent<Value>) -> Result<Value, lambda_runtime::Error> {
        Ok(self.sweep().await?)
    }

    pub async fn sweep(&self) -> Result<Value, SweepError> {
        let cutoff_ms = crate::time::now_ms() - self.order_timeout.as_millis() as i64;
        let ids = self.orders.pending_before(cutoff_ms, MAX_PER_RUN).await?;
        let cancelling = self
            .orders
            .cancelling(MAX_PER_RUN.saturating_sub(ids.len()))
            .await?;
        let events = ids
            .iter()
            .map(|id| SagaEvent::OrderTimedOut {
                order_id: id.clone(),
                cutoff_ms,
            })
            .chain(cancelling.iter().map(|id| SagaEvent::OrderCancelled {
                order_id: id.clone(),
            }))
            .collect::<Vec<_>>();
        self.publisher
            .send_all(&self.coordinator_queue_url, &events)
            .await?;
        if !ids.is_empty() {
            tracing::info!(
                count = ids.len(),
                cutoff_ms,
                "pending orders past the timeout handed to the coordinator"
            );
        }
        if !cancelling.is_empty() {
            tracing::warn!(
                count = cancelling.len(),
                "cancelled orders whose compensations may not have been sent handed to the coordinator"
            );
        }
        Ok(json!({
            "timedOut": ids.len(),
            "cancelling": cancelling.len(),
            "cutoffMs": cutoff_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryQueues, MemoryStore};
    use crate::handlers::testing::order;

    #[tokio::test]
    async fn when_orders_are_pending_past_the_timeout_should_hand_them_to_the_coordinator() {
        let store = MemoryStore::default();
        let queues = MemoryQueues::default();
        let now = crate::time::now_ms();
        for (id, created) in [("old", now - 600_000), ("new", now)] {
            store.insert_order(order(id, 1, created));
        }
        let h = SweeperHandler::with_ports(
            store.clone(),
            queues.clone(),
            "coordinator".into(),
            Duration::from_secs(300),
        );
        let summary = h.sweep().await.unwrap();
        assert_eq!(summary["timedOut"], 1);
        let sent = queues.sent("coordinator");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["type"], "OrderTimedOut");
        assert_eq!(sent[0]["orderId"], "old");
    }
}
