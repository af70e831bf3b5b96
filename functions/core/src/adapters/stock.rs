//! Stock reservation and release: each one DynamoDB transaction.
//!
//! Reserve: the `{orderId}#reserve` record (put only if absent) plus one update per line with
//! the condition `quantity >= :n`. All lines or none: if one line is short or its product
//! unknown, the whole transaction is cancelled and the cancellation reason's position says
//! which. Release mirrors it: the `{orderId}#release` record (put only if absent), a check that
//! the reservation exists and succeeded, and one `ADD quantity :n` per line.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    CancellationReason, ConditionCheck, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
    Update,
};

use super::dynamo::{self, s, StoreError};
use crate::domain::StockLine;
use crate::idempotency::{self, IdempotencyRecord, IdempotencyStore};
use crate::messages::StockRejection;

/// How many times a transaction that lost a conflict with another one is retried in place.
const CONFLICT_ATTEMPTS: u32 = 6;

#[derive(Clone, Debug)]
pub struct StockStore {
    client: aws_sdk_dynamodb::Client,
    products_table: String,
    idempotency: IdempotencyStore,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved,
    /// Already done for this order: the record of that attempt.
    AlreadyDone(IdempotencyRecord),
    /// Nothing reserved: this line was short or unknown.
    Rejected {
        reason: StockRejection,
        product_id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released,
    AlreadyDone(IdempotencyRecord),
    /// There is no successful reservation for this order: nothing to give back.
    NothingReserved,
}

pub fn reserve_key(order_id: &str) -> String {
    format!("{order_id}#reserve")
}

pub fn release_key(order_id: &str) -> String {
    format!("{order_id}#release")
}

enum Attempt {
    Done,
    Cancelled(Vec<CancellationReason>),
}

impl StockStore {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        products_table: impl Into<String>,
        idempotency: IdempotencyStore,
    ) -> Self {
        Self {
            client,
            products_table: products_table.into(),
            idempotency,
        }
    }

    pub fn idempotency(&self) -> &IdempotencyStore {
        &self.idempotency
    }

    /// Reserves every line of an order, or none. `result` is what the reservation record
    /// stores to replay (the StockReserved message).
    pub async fn reserve(
        &self,
        order_id: &str,
        lines: &[StockLine],
        payload_hash: &str,
        result: &str,
        now_ms: i64,
    ) -> Result<ReserveOutcome, StoreError> {
        let record = self.idempotency.completed_put(
            &reserve_key(order_id),
            payload_hash,
            result,
            idempotency::STEP_RECORD_TTL,
            now_ms,
        );
        let mut items = vec![TransactWriteItem::builder().put(record).build()];
        for line in lines {
            let update = Update::builder()
                .table_name(&self.products_table)
                .key("productId", s(&line.product_id))
                .update_expression("SET quantity = quantity - :n")
                .condition_expression("quantity >= :n")
                .expression_attribute_values(":n", dynamo::un(line.quantity))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .expect("table, key and expression are set");
            items.push(TransactWriteItem::builder().update(update).build());
        }
        match self.transact(items, "reserve_stock").await? {
            Attempt::Done => Ok(ReserveOutcome::Reserved),
            Attempt::Cancelled(reasons) => {
                if let Some(existing) = failed(&reasons, 0) {
                    return Ok(ReserveOutcome::AlreadyDone(
                        idempotency::existing_from_reason(existing)?,
                    ));
                }
                for (i, line) in lines.iter().enumerate() {
                    if let Some(reason) = failed(&reasons, i + 1) {
                        // With ALL_OLD, a missing item means the product does not exist.
                        let known = reason.item.as_ref().is_some_and(|item| !item.is_empty());
                        return Ok(ReserveOutcome::Rejected {
                            reason: if known {
                                StockRejection::InsufficientStock
                            } else {
                                StockRejection::UnknownProduct
                            },
                            product_id: line.product_id.clone(),
                        });
                    }
                }
                Err(unexpected("reserve_stock", &reasons))
            }
        }
    }

    /// Gives back every line of a successful reservation, once.
    pub async fn release(
        &self,
        order_id: &str,
        lines: &[StockLine],
        payload_hash: &str,
        result: &str,
        reserved_result: &str,
        now_ms: i64,
    ) -> Result<ReleaseOutcome, StoreError> {
        let record = self.idempotency.completed_put(
            &release_key(order_id),
            payload_hash,
            result,
            idempotency::STEP_RECORD_TTL,
            now_ms,
        );
        let reservation = ConditionCheck::builder()
            .table_name(self.idempotency.table())
            .key("id", s(reserve_key(order_id)))
            .condition_expression("#result = :reserved")
            .expression_attribute_names("#result", "result")
            .expression_attribute_values(":reserved", s(reserved_result))
            .build()
            .expect("table, key and condition are set");
        let mut items = vec![
            TransactWriteItem::builder().put(record).build(),
            TransactWriteItem::builder()
                .condition_check(reservation)
                .build(),
        ];
        for line in lines {
            let update = Update::builder()
                .table_name(&self.products_table)
                .key("productId", s(&line.product_id))
                .update_expression("ADD quantity :n")
                .condition_expression("attribute_exists(productId)")
                .expression_attribute_values(":n", dynamo::un(line.quantity))
                .build()
                .expect("table, key and expression are set");
            items.push(TransactWriteItem::builder().update(update).build());
        }
        match self.transact(items, "release_stock").await? {
            Attempt::Done => Ok(ReleaseOutcome::Released),
            Attempt::Cancelled(reasons) => {
                if let Some(existing) = failed(&reasons, 0) {
                    return Ok(ReleaseOutcome::AlreadyDone(
                        idempotency::existing_from_reason(existing)?,
                    ));
                }
                if failed(&reasons, 1).is_some() {
                    return Ok(ReleaseOutcome::NothingReserved);
                }
                Err(unexpected("release_stock", &reasons))
            }
        }
    }

    /// Runs a transaction, retrying in place when it lost a conflict with a concurrent one
    /// (orders for the same product race for its item).
    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        op: &'static str,
    ) -> Result<Attempt, StoreError> {
        let mut attempt = 0;
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(Attempt::Done),
                Err(err) => err.into_service_error(),
            };
            let conflict = match &err {
                TransactWriteItemsError::TransactionCanceledException(e) => {
                    let reasons = e.cancellation_reasons.clone().unwrap_or_default();
                    if reasons
                        .iter()
                        .any(|r| r.code.as_deref() == Some("ConditionalCheckFailed"))
                    {
                        return Ok(Attempt::Cancelled(reasons));
                    }
                    reasons
                        .iter()
                        .any(|r| r.code.as_deref() == Some("TransactionConflict"))
                }
                TransactWriteItemsError::TransactionInProgressException(_) => true,
                _ => false,
            };
            attempt += 1;
            if !conflict || attempt >= CONFLICT_ATTEMPTS {
                return Err(StoreError::sdk(op, err));
            }
            dynamo::conflict_backoff(attempt).await;
        }
    }
}

fn failed(reasons: &[CancellationReason], index: usize) -> Option<&CancellationReason> {
    reasons
        .get(index)
        .filter(|r| r.code.as_deref() == Some("ConditionalCheckFailed"))
}

fn unexpected(op: &'static str, reasons: &[CancellationReason]) -> StoreError {
    StoreError::Sdk {
        op,
        code: "TransactionCanceled".into(),
        message: format!(
            "cancelled for reasons {:?}",
            reasons.iter().map(|r| r.code.clone()).collect::<Vec<_>>()
        ),
    }
}
