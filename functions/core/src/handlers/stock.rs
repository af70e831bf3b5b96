//! The stock function: reserves an order's items, and releases them on compensation.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::LambdaEvent;

use super::batch::{process_batch, RecordError};
use crate::adapters::sqs::Publisher;
use crate::adapters::stock::{ReleaseOutcome, ReserveOutcome, StockStore};
use crate::aws::AwsClients;
use crate::config::StockConfig;
use crate::domain::StockLine;
use crate::faults::{FaultPoint, Faults};
use crate::idempotency::{self, Claim, Existing, IdempotencyRecord, IdempotencyStore};
use crate::messages::{self, SagaEvent, StockCommand, StockRejection};

pub struct StockHandler {
    store: StockStore,
    publisher: Publisher,
    coordinator_queue_url: String,
    faults: Faults,
}

impl StockHandler {
    pub fn new(clients: &AwsClients, config: StockConfig, faults: Faults) -> Self {
        let idempotency = IdempotencyStore::new(clients.dynamodb.clone(), config.idempotency_table);
        Self {
            store: StockStore::new(clients.dynamodb.clone(), config.products_table, idempotency),
            publisher: Publisher::new(clients.sqs.clone()),
            coordinator_queue_url: config.coordinator_queue_url,
            faults,
        }
    }

    pub async fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, lambda_runtime::Error> {
        Ok(process_batch(&event.payload, |record| self.process(record)).await?)
    }

    async fn process(&self, record: &SqsMessage) -> Result<(), RecordError> {
        let command = messages::parse(record.body.as_deref(), "stock", StockCommand::order_id)?;
        let now = crate::time::now_ms();
        let result = match &command {
            StockCommand::ReserveStock { order_id, items } => {
                self.reserve(order_id, items, now).await?
            }
            StockCommand::ReleaseStock { order_id, items } => {
                match self.release(order_id, items, now).await? {
                    Some(result) => result,
                    None => return Ok(()),
                }
            }
        };
        self.faults.hit(FaultPoint::AfterWrite)?;
        self.publisher
            .send(&self.coordinator_queue_url, &result)
            .await?;
        self.faults.hit(FaultPoint::AfterPublish)?;
        Ok(())
    }

    async fn reserve(
        &self,
        order_id: &str,
        items: &[StockLine],
        now: i64,
    ) -> Result<SagaEvent, RecordError> {
        validate_lines(items)?;
        let hash = idempotency::payload_hash(&items);
        let reserved = SagaEvent::StockReserved {
            order_id: order_id.into(),
        };
        let reserved_json = to_json(&reserved);
        match self
            .store
            .reserve(order_id, items, &hash, &reserved_json, now)
            .await?
        {
            ReserveOutcome::Reserved => {
                tracing::info!(order_id, "stock reserved");
                Ok(reserved)
            }
            ReserveOutcome::AlreadyDone(record) => replay(&record, &hash, now),
            ReserveOutcome::Rejected { reason, product_id } => {
                tracing::info!(
                    order_id,
                    product_id,
                    ?reason,
                    "stock rejected; nothing reserved"
                );
                let rejected = SagaEvent::StockRejected {
                    order_id: order_id.into(),
                    reason,
                    product_id,
                };
                // Record the rejection too, so a redelivery replays it rather than trying again
                // against stock that may have changed in the meantime.
                let key = crate::adapters::stock::reserve_key(order_id);
                match self
                    .store
                    .idempotency()
                    .put_completed(
                        &key,
                        &hash,
                        &to_json(&rejected),
                        idempotency::STEP_RECORD_TTL,
                        now,
                    )
                    .await?
                {
                    Claim::Acquired => Ok(rejected),
                    Claim::Existing(record) => replay(&record, &hash, now),
                }
            }
        }
    }

    /// `None` when there was no successful reservation to release.
    async fn release(
        &self,
        order_id: &str,
        items: &[StockLine],
        now: i64,
    ) -> Result<Option<SagaEvent>, RecordError> {
        validate_lines(items)?;
        let hash = idempotency::payload_hash(&items);
        let released = SagaEvent::StockReleased {
            order_id: order_id.into(),
        };
        let reserved_json = to_json(&SagaEvent::StockReserved {
            order_id: order_id.into(),
        });
        match self
            .store
            .release(
                order_id,
                items,
                &hash,
                &to_json(&released),
                &reserved_json,
                now,
            )
            .await?
        {
            ReleaseOutcome::Released => {
                crate::metrics::compensation("release");
                tracing::info!(order_id, "stock released");
                Ok(Some(released))
            }
            ReleaseOutcome::AlreadyDone(record) => replay(&record, &hash, now).map(Some),
            ReleaseOutcome::NothingReserved => {
                tracing::warn!(
                    order_id,
                    "release requested but the order holds no reservation; nothing to do"
                );
                Ok(None)
            }
        }
    }
}

fn validate_lines(items: &[StockLine]) -> Result<(), RecordError> {
    if items.is_empty() || items.len() > crate::domain::MAX_ITEMS_PER_ORDER {
        return Err(RecordError::Permanent(format!(
            "a stock command must have 1 to {} items",
            crate::domain::MAX_ITEMS_PER_ORDER
        )));
    }
    for item in items {
        crate::domain::validate_id("productId", &item.product_id)
            .map_err(|e| RecordError::Permanent(e.to_string()))?;
        if item.quantity == 0 || item.quantity > crate::domain::MAX_QUANTITY_PER_LINE {
            return Err(RecordError::Permanent(format!(
                "invalid quantity {}",
                item.quantity
            )));
        }
    }
    Ok(())
}

/// The result recorded by an earlier attempt, to publish again.
pub(crate) fn replay(
    record: &IdempotencyRecord,
    hash: &str,
    now: i64,
) -> Result<SagaEvent, RecordError> {
    match record.classify(hash, now) {
        Existing::Completed(result) => {
            crate::metrics::step_replayed();
            tracing::info!(key = %record.id, "step already done; publishing its result again");
            serde_json::from_str(&result).map_err(|e| {
                RecordError::Permanent(format!("stored result of {} is unreadable: {e}", record.id))
            })
        }
        Existing::PayloadMismatch => Err(RecordError::Permanent(format!(
            "{} was already done with a different payload",
            record.id
        ))),
        Existing::InProgress | Existing::InProgressExpired => Err(RecordError::Transient(format!(
            "{} is being processed by another invocation",
            record.id
        ))),
    }
}

pub(crate) fn to_json(event: &impl serde::Serialize) -> String {
    serde_json::to_string(event).expect("saga messages always serialize")
}

impl From<StockRejection> for crate::domain::CancelReason {
    fn from(r: StockRejection) -> Self {
        match r {
            StockRejection::InsufficientStock => crate::domain::CancelReason::InsufficientStock,
            StockRejection::UnknownProduct => crate::domain::CancelReason::UnknownProduct,
        }
    }
}
