//! The idempotency layer every function uses, on DynamoDB (the semantics of AWS Lambda
//! Powertools' idempotency utility, in Rust).
//!
//! A step is keyed on its business identity (`{orderId}#reserve`, `#release`, `#charge`,
//! `#refund`, `api#{Idempotency-Key}`), never on an SQS message id. Claiming is one
//! conditional put that either takes the key or fails and hands back the existing record
//! (`ReturnValuesOnConditionCheckFailure=ALL_OLD`): there is no read before the write.
//!
//! Records are `IN_PROGRESS` (with an expiry tied to the invocation's deadline, so a record
//! left by a crashed or timed-out invocation can be taken over) or `COMPLETED` (with the
//! result to replay). Each carries a hash of the payload, checked on every replay, so a reused
//! key with a different payload is refused. A record expires through DynamoDB TTL
//! (`expiresAt`), and expiry is also checked by the condition itself since TTL deletion lags.
//!
//! Steps whose effect is itself a DynamoDB write (stock reservation and release) put a
//! `COMPLETED` record in the same transaction as the effect ([`IdempotencyStore::completed_put`]);
//! steps with an outside effect (the payment provider) claim first, act, then complete.

use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnValuesOnConditionCheckFailure};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;

use crate::adapters::dynamo::{self, Item, StoreError};

pub const STATUS_IN_PROGRESS: &str = "IN_PROGRESS";
pub const STATUS_COMPLETED: &str = "COMPLETED";

/// How long saga step records are kept. Longer than a DLQ keeps a message (14 days) plus a
/// queue's own retention (4 days), so a message redriven from a DLQ late still finds its record.
pub const STEP_RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long an API `Idempotency-Key` is remembered.
pub const API_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// SHA-256 (hex) of a payload's canonical JSON.
pub fn payload_hash(payload: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(payload).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stored idempotency record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub id: String,
    pub status: String,
    pub payload_hash: String,
    pub in_progress_until_ms: Option<i64>,
    pub expires_at: i64,
    /// The step's result, as JSON, once completed.
    pub result: Option<String>,
    /// The order a record belongs to (API records, whose key is the client's).
    pub order_id: Option<String>,
}

/// What an existing record means for a new attempt with `payload_hash` at `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Done before: replay this result.
    Completed(String),
    /// Another invocation holds the key and may still be running.
    InProgress,
    /// The invocation that held the key is past its deadline: the key may be taken over.
    InProgressExpired,
    /// The key was used with a different payload.
    PayloadMismatch,
}

impl IdempotencyRecord {
    pub fn from_item(item: &Item) -> Result<Self, StoreError> {
        Ok(Self {
            id: dynamo::get_s(item, "id")?,
            status: dynamo::get_s(item, "status")?,
            payload_hash: dynamo::get_s(item, "payloadHash")?,
            in_progress_until_ms: dynamo::get_n_opt(item, "inProgressUntilMs")?,
            expires_at: dynamo::get_n_opt(item, "expiresAt")?.unwrap_or(i64::MAX),
            result: dynamo::get_s_opt(item, "result")?,
            order_id: dynamo::get_s_opt(item, "orderId")?,
        })
    }

    /// Classifies the record for a new attempt. The payload is checked first, on every path,
    /// including replay.
    pub fn classify(&self, payload_hash: &str, now_ms: i64) -> Existing {
        if self.payload_hash != payload_hash {
            return Existing::PayloadMismatch;
        }
        match (&self.status[..], &self.result) {
            (STATUS_COMPLETED, Some(result)) => Existing::Completed(result.clone()),
            _ if self
                .in_progress_until_ms
                .is_some_and(|until| until < now_ms) =>
            {
                Existing::InProgressExpired
            }
            _ => Existing::InProgress,
        }
    }
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours.
    Acquired,
    /// The key was already taken; here is its record.
    Existing(IdempotencyRecord),
}

/// What to claim.
#[derive(Clone, Debug)]
pub struct ClaimRequest<'a> {
    pub key: &'a str,
    pub payload_hash: &'a str,
    /// Until when (epoch ms) this invocation may hold the key: its deadline.
    pub in_progress_until_ms: i64,
    pub ttl: Duration,
    /// Whether a record whose holder is past its deadline may be overwritten by this claim.
    /// Steps that can simply run again (the payment call, made with a provider idempotency
    /// key) say yes; the API says no and takes over explicitly, to finish the same order.
    pub take_over_expired: bool,
    /// The order the key belongs to, stored for takeover and replay.
    pub order_id: Option<&'a str>,
}

#[derive(Clone, Debug)]
pub struct IdempotencyStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl IdempotencyStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The conditional put that claims a key as `IN_PROGRESS`, for use on its own
    /// ([`Self::claim`]) or inside a transaction.
    pub fn claim_put(&self, req: &ClaimRequest<'_>, now_ms: i64) -> Put {
        let mut item: Item = HashMap::from([
            ("id".into(), AttributeValue::S(req.key.into())),
            (
                "status".into(),
                AttributeValue::S(STATUS_IN_PROGRESS.into()),
            ),
            (
                "payloadHash".into(),
                AttributeValue::S(req.payload_hash.into()),
            ),
            (
                "inProgressUntilMs".into(),
                dynamo::n(req.in_progress_until_ms),
            ),
            ("expiresAt".into(), dynamo::n(expires_at(now_ms, req.ttl))),
        ]);
        if let Some(order_id) = req.order_id {
            item.insert("orderId".into(), AttributeValue::S(order_id.into()));
        }
        let mut condition = "attribute_not_exists(id) OR expiresAt < :nowSeconds".to_string();
        let mut values = HashMap::from([(":nowSeconds".to_string(), dynamo::n(now_ms / 1000))]);
        if req.take_over_expired {
            condition.push_str(" OR (#status = :inProgress AND inProgressUntilMs < :nowMs)");
            values.insert(
                ":inProgress".into(),
                AttributeValue::S(STATUS_IN_PROGRESS.into()),
            );
            values.insert(":nowMs".into(), dynamo::n(now_ms));
        }
        let mut put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if req.take_over_expired {
            put = put.expression_attribute_names("#status", "status");
        }
        put.build().expect("table, item and condition are set")
    }

    /// A put of a `COMPLETED` record, conditional on the key being free: for steps whose effect
    /// is written in the same transaction.
    pub fn completed_put(
        &self,
        key: &str,
        payload_hash: &str,
        result: &str,
        ttl: Duration,
        now_ms: i64,
    ) -> Put {
        Put::builder()
            .table_name(&self.table)
            .set_item(Some(completed_item(key, payload_hash, result, ttl, now_ms)))
            .condition_expression("attribute_not_exists(id) OR expiresAt < :nowSeconds")
            .expression_attribute_values(":nowSeconds", dynamo::n(now_ms / 1000))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table, item and condition are set")
    }

    /// Claims a key: one conditional put, no read.
    pub async fn claim(&self, req: &ClaimRequest<'_>, now_ms: i64) -> Result<Claim, StoreError> {
        self.put(self.claim_put(req, now_ms), "claim").await
    }

    /// Records a completed step on its own (conditional on the key being free).
    pub async fn put_completed(
        &self,
        key: &str,
        payload_hash: &str,
        result: &str,
        ttl: Duration,
        now_ms: i64,
    ) -> Result<Claim, StoreError> {
        self.put(
            self.completed_put(key, payload_hash, result, ttl, now_ms),
            "put_completed",
        )
        .await
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
                aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(e) => {
                    let item = e.item.ok_or(StoreError::Corrupt(
                        "conditional check failed without the existing record".into(),
                    ))?;
                    Ok(Claim::Existing(IdempotencyRecord::from_item(&item)?))
                }
                other => Err(StoreError::sdk(op, other)),
            },
        }
    }

    /// Marks a claimed key `COMPLETED` with the result to replay.
    pub async fn complete(&self, key: &str, result: &str) -> Result<(), StoreError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("id", AttributeValue::S(key.into()))
            .update_expression(
                "SET #status = :completed, #result = :result REMOVE inProgressUntilMs",
            )
            .condition_expression("attribute_exists(id)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#result", "result")
            .expression_attribute_values(":completed", AttributeValue::S(STATUS_COMPLETED.into()))
            .expression_attribute_values(":result", AttributeValue::S(result.into()))
            .send()
            .await
            .map_err(|e| StoreError::sdk("complete", e.into_service_error()))?;
        Ok(())
    }

    /// Takes over a key whose holder is past its deadline: succeeds for exactly one of several
    /// racing takers (the condition names the expiry it saw).
    pub async fn take_over(
        &self,
        key: &str,
        seen_until_ms: i64,
        new_until_ms: i64,
    ) -> Result<bool, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", AttributeValue::S(key.into()))
            .update_expression("SET inProgressUntilMs = :newUntil")
            .condition_expression("#status = :inProgress AND inProgressUntilMs = :seenUntil")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(
                ":inProgress",
                AttributeValue::S(STATUS_IN_PROGRESS.into()),
            )
            .expression_attribute_values(":seenUntil", dynamo::n(seen_until_ms))
            .expression_attribute_values(":newUntil", dynamo::n(new_until_ms))
            .send()
            .await;
        dynamo::applied(result.map_err(|e| e.into_service_error()), "take_over")
    }

    /// Gives up a claim after a failure so a retry can run. A completed record is never
    /// removed.
    pub async fn release(&self, key: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("id", AttributeValue::S(key.into()))
            .condition_expression("#status = :inProgress")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(
                ":inProgress",
                AttributeValue::S(STATUS_IN_PROGRESS.into()),
            )
            .send()
            .await;
        dynamo::applied(result.map_err(|e| e.into_service_error()), "release").map(|_| ())
    }

    /// Makes a claim immediately expired, so the next attempt takes it over (used when the
    /// step's effect was written but what follows failed, and the retry must finish the same
    /// work rather than start new work).
    pub async fn expire_claim(&self, key: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", AttributeValue::S(key.into()))
            .update_expression("SET inProgressUntilMs = :zero")
            .condition_expression("#status = :inProgress")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(
                ":inProgress",
                AttributeValue::S(STATUS_IN_PROGRESS.into()),
            )
            .expression_attribute_values(":zero", dynamo::n(0))
            .send()
            .await;
        dynamo::applied(result.map_err(|e| e.into_service_error()), "expire_claim").map(|_| ())
    }
}

fn expires_at(now_ms: i64, ttl: Duration) -> i64 {
    now_ms / 1000 + ttl.as_secs() as i64
}

fn completed_item(key: &str, payload_hash: &str, result: &str, ttl: Duration, now_ms: i64) -> Item {
    HashMap::from([
        ("id".into(), AttributeValue::S(key.into())),
        ("status".into(), AttributeValue::S(STATUS_COMPLETED.into())),
        ("payloadHash".into(), AttributeValue::S(payload_hash.into())),
        ("expiresAt".into(), dynamo::n(expires_at(now_ms, ttl))),
        ("result".into(), AttributeValue::S(result.into())),
    ])
}

/// Parses the existing record out of a transaction cancellation reason (ALL_OLD item).
pub fn existing_from_reason(
    reason: &aws_sdk_dynamodb::types::CancellationReason,
) -> Result<IdempotencyRecord, StoreError> {
    let item = reason.item.as_ref().ok_or(StoreError::Corrupt(
        "idempotency condition failed without the existing record".into(),
    ))?;
    IdempotencyRecord::from_item(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        status: &str,
        hash: &str,
        until: Option<i64>,
        result: Option<&str>,
    ) -> IdempotencyRecord {
        IdempotencyRecord {
            id: "o#charge".into(),
            status: status.into(),
            payload_hash: hash.into(),
            in_progress_until_ms: until,
            expires_at: i64::MAX,
            result: result.map(Into::into),
            order_id: None,
        }
    }

    #[test]
    fn when_payload_differs_should_refuse_even_a_completed_record() {
        let r = record(STATUS_COMPLETED, "h1", None, Some("{}"));
        assert_eq!(r.classify("h2", 0), Existing::PayloadMismatch);
        assert_eq!(r.classify("h1", 0), Existing::Completed("{}".into()));
    }

    #[test]
    fn when_holder_is_past_its_deadline_should_allow_takeover() {
        let r = record(STATUS_IN_PROGRESS, "h", Some(1_000), None);
        assert_eq!(r.classify("h", 999), Existing::InProgress);
        assert_eq!(r.classify("h", 1_001), Existing::InProgressExpired);
    }

    #[test]
    fn payload_hash_is_stable_and_sensitive() {
        let a = payload_hash(&serde_json::json!({"a": 1}));
        assert_eq!(a, payload_hash(&serde_json::json!({"a": 1})));
        assert_ne!(a, payload_hash(&serde_json::json!({"a": 2})));
        assert_eq!(a.len(), 64);
    }
}
