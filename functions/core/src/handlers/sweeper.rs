//! The timeout sweeper, run on a schedule: finds orders still pending after the timeout
//! through the sparse pending-orders index (a query, not a scan) and hands each to the
//! coordinator as an `OrderTimedOut` event. The coordinator cancels with a conditional update,
//! so a sweep racing a late confirmation cannot corrupt the order, and compensates whatever
//! succeeded. If a run dies half way, the next run finds the same orders again.

use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};

use crate::adapters::orders::OrderStore;
use crate::adapters::sqs::Publisher;
use crate::aws::AwsClients;
use crate::config::SweeperConfig;
use crate::messages::SagaEvent;

/// Most orders one run hands over; the rest wait for the next run.
pub const MAX_PER_RUN: usize = 1_000;

pub struct SweeperHandler {
    orders: OrderStore,
    publisher: Publisher,
    config: SweeperConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] crate::adapters::dynamo::StoreError),
    #[error(transparent)]
    Publish(#[from] crate::adapters::sqs::PublishError),
}

impl SweeperHandler {
    pub fn new(clients: &AwsClients, config: SweeperConfig) -> Self {
        Self {
            orders: OrderStore::new(clients.dynamodb.clone(), config.orders_table.clone()),
            publisher: Publisher::new(clients.sqs.clone()),
            config,
        }
    }

    /// Takes the scheduled event (its content is not needed) and returns a summary.
    pub async fn handle(&self, _event: LambdaEvent<Value>) -> Result<Value, lambda_runtime::Error> {
        Ok(self.sweep().await?)
    }

    pub async fn sweep(&self) -> Result<Value, SweepError> {
        let cutoff_ms = crate::time::now_ms() - self.config.order_timeout.as_millis() as i64;
        let ids = self
            .orders
            .pending_before(&self.config.pending_index, cutoff_ms, MAX_PER_RUN)
            .await?;
        let events = ids
            .iter()
            .map(|id| SagaEvent::OrderTimedOut {
                order_id: id.clone(),
                cutoff_ms,
            })
            .collect::<Vec<_>>();
        self.publisher
            .send_all(&self.config.coordinator_queue_url, &events)
            .await?;
        if !ids.is_empty() {
            tracing::info!(
                count = ids.len(),
                cutoff_ms,
                "pending orders past the timeout handed to the coordinator"
            );
        }
        Ok(json!({ "timedOut": ids.len(), "cutoffMs": cutoff_ms }))
    }
}
