//! The idempotency table on DynamoDB: the [`Idempotency`] port, and the conditional puts that
//! the stock and order adapters put in their own transactions.

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, Put, ReturnValuesOnConditionCheckFailure,
};
use std::collections::HashMap;

use super::{
    Claim, ClaimRequest, Completed, Idempotency, IdempotencyRecord, Outcome, Status, StepKey,
};
use crate::adapters::dynamo::{self, StoreError};

/// The condition every put of a record carries: the key is free (or its record outlived its
/// TTL and awaits deletion).
const KEY_FREE: &str = "attribute_not_exists(id) OR expiresAt < :nowSeconds";

#[derive(Clone, Debug)]
pub struct DynamoIdempotency {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn status(s: Status) -> AttributeValue {
    dynamo::to_value(&s)
}

fn key(k: StepKey<'_>) -> AttributeValue {
    AttributeValue::S(k.to_string())
}

impl DynamoIdempotency {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The conditional put that claims a key as in progress, for use on its own
    /// ([`Idempotency::claim`]) or inside a transaction.
    pub fn claim_put(&self, req: &ClaimRequest<'_>, now_ms: i64) -> Result<Put, StoreError> {
        let mut condition = KEY_FREE.to_string();
        let mut values = HashMap::from([(":nowSeconds".to_string(), dynamo::n(now_ms / 1000))]);
        let mut put = Put::builder();
        if req.take_over_expired {
            condition.push_str(" OR (#status = :inProgress AND inProgressUntilMs < :nowMs)");
            values.insert(":inProgress".into(), status(Status::InProgress));
            values.insert(":nowMs".into(), dynamo::n(now_ms));
            put = put.expression_attribute_names("#status", "status");
        }
        Ok(put
            .table_name(&self.table)
            .set_item(Some(dynamo::to_item(&IdempotencyRecord::claimed(
                req, now_ms,
            ))?))
            .condition_expression(condition)
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table, item and condition are set"))
    }

    /// A put of a completed record, conditional on the key being free: for steps whose effect
    /// is written in the same transaction.
    pub fn completed_put(&self, done: &Completed<'_>, now_ms: i64) -> Result<Put, StoreError> {
        Ok(Put::builder()
            .table_name(&self.table)
            .set_item(Some(dynamo::to_item(&IdempotencyRecord::completed(
                done, now_ms,
            ))?))
            .condition_expression(KEY_FREE)
            .expression_attribute_values(":nowSeconds", dynamo::n(now_ms / 1000))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table, item and condition are set"))
    }

    async fn put(&self, put: Put, op: &'static str) -> Result<Claim, StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(put.table_name)
            .set_item(Some(put.item))
            .set_condition_expression(put.condition_expression)
            .set_expression_attribute_names(put.expression_attribute_names)
            .set_expression_attribute_values(put.expression_attribute_values)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(Claim::Acquired),
            Err(err) => match err.into_service_error() {
                PutItemError::ConditionalCheckFailedException(e) => {
                    let item = e.item.ok_or(StoreError::Corrupt(
                        "conditional check failed without the existing record".into(),
                    ))?;
                    Ok(Claim::Existing(dynamo::from_item(item)?))
                }
                other => Err(StoreError::sdk(op, other)),
            },
        }
    }

    /// An update of an in-progress record only.
    async fn update_in_progress(
        &self,
        k: StepKey<'_>,
        set: &str,
        extra_condition: &str,
        values: &[(&str, AttributeValue)],
        op: &'static str,
    ) -> Result<bool, StoreError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", key(k))
            .update_expression(set)
            .condition_expression(format!("#status = :inProgress{extra_condition}"))
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":inProgress", status(Status::InProgress));
        for (name, value) in values {
            request = request.expression_attribute_values(*name, value.clone());
        }
        dynamo::applied(request.send().await.map_err(|e| e.into_service_error()), op)
    }
}

impl Idempotency for DynamoIdempotency {
    async fn claim(&self, req: &ClaimRequest<'_>, now_ms: i64) -> Result<Claim, StoreError> {
        self.put(self.claim_put(req, now_ms)?, "claim").await
    }

    async fn put_completed(&self, done: &Completed<'_>, now_ms: i64) -> Result<Claim, StoreError> {
        self.put(self.completed_put(done, now_ms)?, "put_completed")
            .await
    }

    async fn get(
        &self,
        k: StepKey<'_>,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("id", key(k))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::sdk("get_record", e.into_service_error()))?;
        let record: Option<IdempotencyRecord> = out.item.map(dynamo::from_item).transpose()?;
        Ok(record.filter(|r| !r.expired(now_ms)))
    }

    async fn complete(
        &self,
        k: StepKey<'_>,
        result: &str,
        outcome: Option<Outcome>,
    ) -> Result<(), StoreError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", key(k))
            .condition_expression("attribute_exists(id)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#result", "result")
            .expression_attribute_values(":completed", status(Status::Completed))
            .expression_attribute_values(":result", AttributeValue::S(result.into()));
        request = match outcome {
            Some(outcome) => request
                .update_expression(
                    "SET #status = :completed, #result = :result, outcome = :outcome \
                     REMOVE inProgressUntilMs",
                )
                .expression_attribute_values(":outcome", dynamo::to_value(&outcome)),
            None => request.update_expression(
                "SET #status = :completed, #result = :result REMOVE inProgressUntilMs",
            ),
        };
        request
            .send()
            .await
            .map_err(|e| StoreError::sdk("complete", e.into_service_error()))?;
        Ok(())
    }

    async fn take_over(
        &self,
        k: StepKey<'_>,
        seen_until_ms: i64,
        new_until_ms: i64,
    ) -> Result<bool, StoreError> {
        self.update_in_progress(
            k,
            "SET inProgressUntilMs = :newUntil",
            " AND inProgressUntilMs = :seenUntil",
            &[
                (":seenUntil", dynamo::n(seen_until_ms)),
                (":newUntil", dynamo::n(new_until_ms)),
            ],
            "take_over",
        )
        .await
    }

    async fn release(&self, k: StepKey<'_>) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("id", key(k))
            .condition_expression("#status = :inProgress")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":inProgress", status(Status::InProgress))
            .send()
            .await;
        dynamo::applied(result.map_err(|e| e.into_service_error()), "release").map(|_| ())
    }

    async fn expire_claim(&self, k: StepKey<'_>) -> Result<(), StoreError> {
        self.update_in_progress(
            k,
            "SET inProgressUntilMs = :zero",
            "",
            &[(":zero", dynamo::n(0))],
            "expire_claim",
        )
        .await
        .map(|_| ())
    }
}

/// The existing record out of a transaction cancellation reason (`ALL_OLD` item).
pub fn existing_from_reason(reason: &CancellationReason) -> Result<IdempotencyRecord, StoreError> {
    let item = reason.item.clone().ok_or(StoreError::Corrupt(
        "idempotency condition failed without the existing record".into(),
    ))?;
    dynamo::from_item(item)
}
