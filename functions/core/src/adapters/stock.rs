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

use super::dynamo::{self, StoreError, s};
use crate::domain::StockLine;
use crate::idempotency::Completed;
use crate::idempotency::dynamo::{DynamoIdempotency, existing_from_reason};
use crate::messages::StockRejection;
use crate::ports::{ReleaseOutcome, ReserveOutcome, Stock};

/// How many times a transaction that lost a conflict with another one is retried in place.
const CONFLICT_ATTEMPTS: u32 = 6;

#[derive(Clone, Debug)]
pub struct DynamoStock {
    client: aws_sdk_dynamodb::Client,
    products_table: String,
    idempotency: DynamoIdempotency,
}

enum Attempt {
    Done,
    Cancelled(Vec<CancellationReason>),
}

impl DynamoStock {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        products_table: impl Into<String>,
        idempotency: DynamoIdempotency,
    ) -> Self {
        Self {
            client,
            products_table: products_table.into(),
            idempotency,
        }
    }

    fn line_update(
        &self,
        line: &StockLine,
        expression: &str,
        condition: &str,
    ) -> TransactWriteItem {
        let update = Update::builder()
            .table_name(&self.products_table)
            .key("productId", s(&line.product_id))
            .update_expression(expression)
            .condition_expression(condition)
            .expression_attribute_values(":n", dynamo::un(line.quantity))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table, key and expression are set");
        TransactWriteItem::builder().update(update).build()
    }
}

impl Stock for DynamoStock {
    async fn reserve(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        now_ms: i64,
    ) -> Result<ReserveOutcome, StoreError> {
        let record = self.idempotency.completed_put(done, now_ms)?;
        let mut items = vec![TransactWriteItem::builder().put(record).build()];
        items.extend(
            lines.iter().map(|line| {
                self.line_update(line, "SET quantity = quantity - :n", "quantity >= :n")
            }),
        );
        match self.transact(items, "reserve_stock").await? {
            Attempt::Done => Ok(ReserveOutcome::Reserved),
            Attempt::Cancelled(reasons) => {
                if let Some(existing) = failed(&reasons, 0) {
                    return Ok(ReserveOutcome::AlreadyDone(existing_from_reason(existing)?));
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

    async fn release(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        reservation: &Completed<'_>,
        now_ms: i64,
    ) -> Result<ReleaseOutcome, StoreError> {
        let record = self.idempotency.completed_put(done, now_ms)?;
        let reserved = ConditionCheck::builder()
            .table_name(self.idempotency.table())
            .key("id", s(reservation.key.to_string()))
            .condition_expression("#result = :reserved")
            .expression_attribute_names("#result", "result")
            .expression_attribute_values(":reserved", s(reservation.result))
            .build()
            .expect("table, key and condition are set");
        let mut items = vec![
            TransactWriteItem::builder().put(record).build(),
            TransactWriteItem::builder()
                .condition_check(reserved)
                .build(),
        ];
        items.extend(
            lines.iter().map(|line| {
                self.line_update(line, "ADD quantity :n", "attribute_exists(productId)")
            }),
        );
        match self.transact(items, "release_stock").await? {
            Attempt::Done => Ok(ReleaseOutcome::Released),
            Attempt::Cancelled(reasons) => {
                if let Some(existing) = failed(&reasons, 0) {
                    return Ok(ReleaseOutcome::AlreadyDone(existing_from_reason(existing)?));
                }
                if failed(&reasons, 1).is_some() {
                    return Ok(ReleaseOutcome::NothingReserved);
                }
                Err(unexpected("release_stock", &reasons))
            }
        }
    }
}

impl DynamoStock {
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
