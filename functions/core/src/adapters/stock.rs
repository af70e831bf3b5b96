//! Stock reservation and release: each one DynamoDB transaction.
//!
//! Reserve: the `{orderId}#reserve` record (put only if absent, outcome `RESERVED`) plus one
//! update per line, `SET quantity = quantity - :n ADD reserved :n` with the condition
//! `quantity >= :n`. All lines or none: if one line is short or its product unknown, the
//! whole transaction is cancelled and the cancellation reason's position says which.
//! `quantity + reserved` is unchanged by it; only stock adjustments change that sum.
//!
//! Release mirrors it: the `{orderId}#release` record (put only if absent), a check that the
//! reservation record's outcome is `RESERVED`, and `SET quantity = quantity + :n ADD reserved
//! :minus_n` per line. The match is on the explicit outcome, never on a serialized result.
//! When the check fails, the reservation record it returns (`ALL_OLD`) says why:
//! - none at all: with a fence asked for (an order cancelled before its reservation was
//!   seen), the fence is put in its place, so a `ReserveStock` still in flight holds nothing;
//!   without one, [`ReleaseOutcome::Missing`], which the stock function sends to the DLQ;
//! - a record from before outcomes were recorded, whose result is a `StockReserved`: released
//!   by a second transaction conditioned on that record being unchanged, giving back
//!   `quantity` only (those reservations were never counted in `reserved`);
//! - a rejection or a fence: nothing is held.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    CancellationReason, ConditionCheck, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
    Update,
};

use super::dynamo::{self, StoreError, s};
use crate::domain::StockLine;
use crate::idempotency::dynamo::{DynamoIdempotency, existing_from_reason};
use crate::idempotency::{Claim, Completed, Idempotency, IdempotencyRecord, Outcome, StepKey};
use crate::messages::{SagaEvent, StockRejection};
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

    /// One line's update. `:n` is the line's quantity; expressions that count `reserved` use
    /// `:minus_n` too.
    fn line_update(
        &self,
        line: &StockLine,
        expression: &str,
        condition: &str,
    ) -> TransactWriteItem {
        let mut update = Update::builder()
            .table_name(&self.products_table)
            .key("productId", s(&line.product_id))
            .update_expression(expression)
            .condition_expression(condition)
            .expression_attribute_values(":n", dynamo::un(line.quantity))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if expression.contains(":minus_n") {
            update =
                update.expression_attribute_values(":minus_n", dynamo::n(-(line.quantity as i64)));
        }
        TransactWriteItem::builder()
            .update(update.build().expect("table, key and expression are set"))
            .build()
    }

    /// A check on the reservation record, handing it back (`ALL_OLD`) when it fails.
    fn reservation_check(
        &self,
        reservation: StepKey<'_>,
        condition: &str,
        values: &[(&str, aws_sdk_dynamodb::types::AttributeValue)],
    ) -> TransactWriteItem {
        let mut check = ConditionCheck::builder()
            .table_name(self.idempotency.table())
            .key("id", s(reservation.to_string()))
            .condition_expression(condition)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if condition.contains("#result") {
            check = check.expression_attribute_names("#result", "result");
        }
        for (name, value) in values {
            check = check.expression_attribute_values(*name, value.clone());
        }
        TransactWriteItem::builder()
            .condition_check(check.build().expect("table, key and condition are set"))
            .build()
    }

    /// One release transaction: the release record, the reservation check, and the lines.
    async fn try_release(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        check: TransactWriteItem,
        line_expression: &str,
        now_ms: i64,
    ) -> Result<Attempt, StoreError> {
        let record = self.idempotency.completed_put(done, now_ms)?;
        let mut items = vec![TransactWriteItem::builder().put(record).build(), check];
        items.extend(
            lines
                .iter()
                .map(|line| self.line_update(line, line_expression, "attribute_exists(productId)")),
        );
        self.transact(items, "release_stock").await
    }
}

/// How many times a release goes round when the reservation record changes under it (a
/// reservation landing between the failed check and the fence).
const RELEASE_ROUNDS: u32 = 3;

impl Stock for DynamoStock {
    async fn reserve(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        now_ms: i64,
    ) -> Result<ReserveOutcome, StoreError> {
        let record = self.idempotency.completed_put(done, now_ms)?;
        let mut items = vec![TransactWriteItem::builder().put(record).build()];
        items.extend(lines.iter().map(|line| {
            self.line_update(
                line,
                "SET quantity = quantity - :n ADD reserved :n",
                "quantity >= :n",
            )
        }));
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
        reservation: StepKey<'_>,
        fence: Option<&Completed<'_>>,
        now_ms: i64,
    ) -> Result<ReleaseOutcome, StoreError> {
        for _ in 0..RELEASE_ROUNDS {
            let check = self.reservation_check(
                reservation,
                "outcome = :reserved",
                &[(":reserved", dynamo::to_value(&Outcome::Reserved))],
            );
            let expression = "SET quantity = quantity + :n ADD reserved :minus_n";
            let reasons = match self
                .try_release(lines, done, check, expression, now_ms)
                .await?
            {
                Attempt::Done => return Ok(ReleaseOutcome::Released),
                Attempt::Cancelled(reasons) => reasons,
            };
            if let Some(existing) = failed(&reasons, 0) {
                return Ok(ReleaseOutcome::AlreadyDone(existing_from_reason(existing)?));
            }
            let Some(check_failed) = failed(&reasons, 1) else {
                return Err(unexpected("release_stock", &reasons));
            };
            let held = match check_failed.item.as_ref().filter(|i| !i.is_empty()) {
                Some(item) => dynamo::from_item::<IdempotencyRecord>(item.clone())?,
                None => match fence {
                    None => return Ok(ReleaseOutcome::Missing),
                    Some(fence) => match self.idempotency.put_completed(fence, now_ms).await? {
                        Claim::Acquired => return Ok(ReleaseOutcome::Fenced),
                        // A reservation (or another fence) landed meanwhile: look again.
                        Claim::Existing(_) => continue,
                    },
                },
            };
            if !legacy_reservation(&held) {
                return Ok(ReleaseOutcome::NothingHeld(held));
            }
            // Reserved before outcomes were recorded: given back on the strength of the
            // record as it was read, and not counted in `reserved`, which it never was.
            let seen = held.result.clone().unwrap_or_default();
            let check = self.reservation_check(
                reservation,
                "attribute_not_exists(outcome) AND #result = :seen",
                &[(":seen", s(seen))],
            );
            match self
                .try_release(lines, done, check, "ADD quantity :n", now_ms)
                .await?
            {
                Attempt::Done => return Ok(ReleaseOutcome::Released),
                Attempt::Cancelled(reasons) => {
                    if let Some(existing) = failed(&reasons, 0) {
                        return Ok(ReleaseOutcome::AlreadyDone(existing_from_reason(existing)?));
                    }
                    if failed(&reasons, 1).is_none() {
                        return Err(unexpected("release_stock", &reasons));
                    }
                }
            }
        }
        Err(StoreError::Sdk {
            op: "release_stock",
            code: "ReservationChanging".into(),
            message: format!("the record of {reservation} kept changing during the release"),
        })
    }
}

/// Whether a reservation record written before outcomes were recorded says every line was
/// reserved: its result, parsed, is a `StockReserved`.
pub fn legacy_reservation(record: &IdempotencyRecord) -> bool {
    record.outcome.is_none()
        && record.status == crate::idempotency::Status::Completed
        && record
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str::<SagaEvent>(r).ok())
            .is_some_and(|e| matches!(e, SagaEvent::StockReserved { .. }))
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
