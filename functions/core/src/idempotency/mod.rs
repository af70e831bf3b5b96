//! Idempotency: the one home of every rule about doing a step at most once (the semantics of
//! AWS Lambda Powertools' idempotency utility, in Rust).
//!
//! A step is keyed on its business identity ([`StepKey`]: `{orderId}#reserve`, `#release`,
//! `#charge`, `#refund`, `api#{Idempotency-Key}`), never on an SQS message id. Claiming is one
//! conditional put that either takes the key or fails and hands back the existing record
//! (`ReturnValuesOnConditionCheckFailure=ALL_OLD`): there is no read before the write.
//!
//! Records are [`Status::InProgress`] (with an expiry tied to the invocation's deadline, so a
//! record left by a crashed or timed-out invocation can be taken over) or
//! [`Status::Completed`] (with the result to replay). Each carries a hash of the payload,
//! checked on every replay, so a reused key with a different payload is refused
//! ([`IdempotencyRecord::classify`], [`replay`]). A record expires through DynamoDB TTL
//! (`expiresAt`), and expiry is also checked by the condition itself since TTL deletion lags.
//!
//! Steps whose effect is itself a DynamoDB write (stock reservation and release, order
//! creation with an API key) put the record in the same transaction as the effect (the puts
//! are built by [`dynamo`]); steps with an outside effect (the payment provider) claim first,
//! act, then complete, through the [`Idempotency`] port.
//!
//! - this module: keys, the record, how an existing record is read, and the port;
//! - [`dynamo`]: the DynamoDB adapter and the conditional puts that transactions reuse;
//! - `crate::adapters::memory`: an in-memory adapter with the same semantics, for unit tests.

pub mod dynamo;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::adapters::dynamo::StoreError;

/// How long saga step records are kept. Longer than a DLQ keeps a message (14 days) plus a
/// queue's own retention (4 days), so a message redriven from a DLQ late still finds its record.
pub const STEP_RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long an API `Idempotency-Key` is remembered.
pub const API_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The business identity of a step: what a record is keyed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKey<'a> {
    /// Reserving an order's stock.
    Reserve(&'a str),
    /// Releasing an order's stock (compensation).
    Release(&'a str),
    /// Charging an order.
    Charge(&'a str),
    /// Refunding an order (compensation).
    Refund(&'a str),
    /// A client's `Idempotency-Key` on `POST /orders`, scoped to the caller: two customers
    /// who send the same key get two orders.
    Api { customer: &'a str, key: &'a str },
    /// An operator's `Idempotency-Key` on `POST /products/{productId}/stock-adjustments`,
    /// scoped to the caller (the product is part of the payload hash, so the same key on
    /// another product is a reuse).
    Adjust { actor: &'a str, key: &'a str },
}

/// `#` and `%` of a caller's id escaped, so that it cannot run into the key after it.
fn escape_caller(caller: &str) -> String {
    caller.replace('%', "%25").replace('#', "%23")
}

impl fmt::Display for StepKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepKey::Reserve(order) => write!(f, "{order}#reserve"),
            StepKey::Release(order) => write!(f, "{order}#release"),
            StepKey::Charge(order) => write!(f, "{order}#charge"),
            StepKey::Refund(order) => write!(f, "{order}#refund"),
            // The customer id (a token's `sub`) may hold `#`; escaped, it cannot run into the
            // key, so no two (customer, key) pairs share a record.
            StepKey::Api { customer, key } => write!(f, "api#{}#{key}", escape_caller(customer)),
            StepKey::Adjust { actor, key } => write!(f, "adjust#{}#{key}", escape_caller(actor)),
        }
    }
}

/// SHA-256 (hex) of a payload's canonical JSON.
pub fn payload_hash(payload: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(payload).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a record stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    InProgress,
    Completed,
}

/// What a saga step came to, recorded explicitly beside its result (attribute `outcome`).
/// Releases, refunds and fences match on it, never on the serialized result, so a result
/// that gains a field in a later version still matches; the audit reads it too. Records
/// written before it existed have no outcome: their result is parsed instead (see the stock
/// adapter's release and [`charged_payment_id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    /// `{orderId}#reserve`: every line was taken from stock.
    Reserved,
    /// `{orderId}#reserve`: nothing was taken (a line was short or unknown).
    Rejected,
    /// `{orderId}#release`: the reservation was given back.
    Released,
    /// `{orderId}#charge`: the provider charged the order.
    Charged,
    /// `{orderId}#charge`: the provider declined.
    Declined,
    /// `{orderId}#refund`: the charge was refunded.
    Refunded,
    /// `{orderId}#reserve` or `#charge`: the order was cancelled before the step ran, and this
    /// fence answers every later attempt of the step (whatever its payload) with the step's
    /// `...Voided` result, so that it never takes effect.
    Voided,
}

/// A stored idempotency record (one item of the idempotency table, mapped by serde_dynamo).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    pub id: String,
    pub status: Status,
    pub payload_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress_until_ms: Option<i64>,
    /// Epoch seconds after which the record is gone (DynamoDB TTL).
    #[serde(default = "never")]
    pub expires_at: i64,
    /// The step's result, as JSON, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// The order a record belongs to (API records, whose key is the client's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// What a completed saga step came to (absent on API records, on claims in progress, and
    /// on records written before outcomes were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

fn never() -> i64 {
    i64::MAX
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
    /// A record claiming `req.key` as in progress.
    pub fn claimed(req: &ClaimRequest<'_>, now_ms: i64) -> Self {
        Self {
            id: req.key.to_string(),
            status: Status::InProgress,
            payload_hash: req.payload_hash.into(),
            in_progress_until_ms: Some(req.in_progress_until_ms),
            expires_at: expires_at(now_ms, req.ttl),
            result: None,
            order_id: req.order_id.map(Into::into),
            outcome: None,
        }
    }

    /// A completed record for a step whose effect is written in the same transaction.
    pub fn completed(done: &Completed<'_>, now_ms: i64) -> Self {
        Self {
            id: done.key.to_string(),
            status: Status::Completed,
            payload_hash: done.payload_hash.into(),
            in_progress_until_ms: None,
            expires_at: expires_at(now_ms, done.ttl),
            result: Some(done.result.into()),
            order_id: None,
            outcome: done.outcome,
        }
    }

    /// Classifies the record for a new attempt. The payload is checked first, on every path,
    /// including replay.
    pub fn classify(&self, payload_hash: &str, now_ms: i64) -> Existing {
        // A fence answers every attempt of its step, whatever the payload.
        if let (Some(Outcome::Voided), Some(result)) = (self.outcome, &self.result) {
            return Existing::Completed(result.clone());
        }
        if self.payload_hash != payload_hash {
            return Existing::PayloadMismatch;
        }
        match (self.status, &self.result) {
            (Status::Completed, Some(result)) => Existing::Completed(result.clone()),
            _ if self
                .in_progress_until_ms
                .is_some_and(|until| until < now_ms) =>
            {
                Existing::InProgressExpired
            }
            _ => Existing::InProgress,
        }
    }

    /// Whether the record no longer counts at `now_ms` (TTL deletion lags behind).
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at < now_ms / 1000
    }
}

fn expires_at(now_ms: i64, ttl: Duration) -> i64 {
    now_ms / 1000 + ttl.as_secs() as i64
}

/// Why a recorded result cannot be replayed for this attempt.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    /// The key was used with another payload: a fault that retrying will not fix.
    #[error("{0} was already done with a different payload")]
    PayloadMismatch(String),
    /// Another invocation holds the key: retry later.
    #[error("{0} is being processed by another invocation")]
    InProgress(String),
    /// The stored result does not parse: a fault that retrying will not fix.
    #[error("stored result of {0} is unreadable: {1}")]
    Unreadable(String, String),
}

/// The result an earlier attempt recorded, for a step to publish again.
pub fn replay<T: DeserializeOwned>(
    record: &IdempotencyRecord,
    payload_hash: &str,
    now_ms: i64,
) -> Result<T, ReplayError> {
    match record.classify(payload_hash, now_ms) {
        Existing::Completed(result) => {
            crate::metrics::step_replayed();
            tracing::info!(key = %record.id, "step already done; publishing its result again");
            serde_json::from_str(&result)
                .map_err(|e| ReplayError::Unreadable(record.id.clone(), e.to_string()))
        }
        Existing::PayloadMismatch => Err(ReplayError::PayloadMismatch(record.id.clone())),
        Existing::InProgress | Existing::InProgressExpired => {
            Err(ReplayError::InProgress(record.id.clone()))
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
    pub key: StepKey<'a>,
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

impl ClaimRequest<'_> {
    /// Whether this claim may take the key from `existing` (the claim's condition).
    pub fn may_replace(&self, existing: &IdempotencyRecord, now_ms: i64) -> bool {
        existing.expired(now_ms)
            || (self.take_over_expired
                && existing.status == Status::InProgress
                && existing
                    .in_progress_until_ms
                    .is_some_and(|until| until < now_ms))
    }
}

/// A step done in the same write as its effect: the record to put, completed.
#[derive(Clone, Debug)]
pub struct Completed<'a> {
    pub key: StepKey<'a>,
    pub payload_hash: &'a str,
    /// The step's result (JSON) that a redelivery replays.
    pub result: &'a str,
    /// What the step came to (`None` for records that are not saga steps: API keys).
    pub outcome: Option<Outcome>,
    pub ttl: Duration,
}

impl<'a> Completed<'a> {
    /// The fence of a step that has not run, for an order that was cancelled: a completed
    /// record that answers every later attempt with `result` (the step's `...Voided` event).
    pub fn fence(key: StepKey<'a>, result: &'a str) -> Self {
        Self {
            key,
            payload_hash: "",
            result,
            outcome: Some(Outcome::Voided),
            ttl: STEP_RECORD_TTL,
        }
    }
}

/// The payment id of a charge record that says the order was charged: from its outcome and
/// result, or, for a record written before outcomes were recorded, from its result alone
/// (parsed as the `PaymentCharged` event it holds). `None` for a declined or fenced charge,
/// and for one still in progress.
pub fn charged_payment_id(record: &IdempotencyRecord) -> Option<String> {
    if record.status != Status::Completed
        || !matches!(record.outcome, None | Some(Outcome::Charged))
    {
        return None;
    }
    match serde_json::from_str(record.result.as_deref()?) {
        Ok(crate::messages::SagaEvent::PaymentCharged { payment_id, .. }) => Some(payment_id),
        _ => None,
    }
}

/// The idempotency port: claims and records of steps with an outside effect.
pub trait Idempotency: Send + Sync {
    /// Claims a key: one conditional put, no read.
    fn claim(
        &self,
        req: &ClaimRequest<'_>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Records a completed step on its own (conditional on the key being free).
    fn put_completed(
        &self,
        done: &Completed<'_>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// The key's record, if there is one that has not outlived its TTL (a consistent read).
    fn get(
        &self,
        key: StepKey<'_>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Option<IdempotencyRecord>, StoreError>> + Send;

    /// Marks a claimed key completed with the result to replay, and what the step came to
    /// (`None` for API records).
    fn complete(
        &self,
        key: StepKey<'_>,
        result: &str,
        outcome: Option<Outcome>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes over a key whose holder is past its deadline: succeeds for exactly one of several
    /// racing takers (the condition names the expiry it saw).
    fn take_over(
        &self,
        key: StepKey<'_>,
        seen_until_ms: i64,
        new_until_ms: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives up a claim after a failure so a retry can run. A completed record is never
    /// removed.
    fn release(&self, key: StepKey<'_>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes a claim immediately expired, so the next attempt takes it over (used when the
    /// step's effect was written but what follows failed, and the retry must finish the same
    /// work rather than start new work).
    fn expire_claim(&self, key: StepKey<'_>)
    -> impl Future<Output = Result<(), StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        status: Status,
        hash: &str,
        until: Option<i64>,
        result: Option<&str>,
    ) -> IdempotencyRecord {
        IdempotencyRecord {
            id: "o#charge".into(),
            status,
            payload_hash: hash.into(),
            in_progress_until_ms: until,
            expires_at: i64::MAX,
            result: result.map(Into::into),
            order_id: None,
            outcome: None,
        }
    }

    #[test]
    fn when_a_step_is_fenced_should_answer_every_attempt_with_the_fence() {
        let fence = IdempotencyRecord::completed(
            &Completed::fence(
                StepKey::Charge("o"),
                r#"{"type":"PaymentVoided","orderId":"o"}"#,
            ),
            0,
        );
        assert_eq!(fence.outcome, Some(Outcome::Voided));
        assert_eq!(
            fence.classify("any payload's hash", 0),
            Existing::Completed(r#"{"type":"PaymentVoided","orderId":"o"}"#.into())
        );
        assert_eq!(charged_payment_id(&fence), None);
    }

    #[test]
    fn when_a_charge_record_says_charged_should_give_its_payment_id_whatever_its_version() {
        let charged = r#"{"type":"PaymentCharged","orderId":"o","paymentId":"ch_1"}"#;
        // Written before outcomes were recorded: the result alone says it.
        let legacy = record(Status::Completed, "h", None, Some(charged));
        assert_eq!(charged_payment_id(&legacy).as_deref(), Some("ch_1"));
        let current = IdempotencyRecord {
            outcome: Some(Outcome::Charged),
            ..legacy.clone()
        };
        assert_eq!(charged_payment_id(&current).as_deref(), Some("ch_1"));
        let declined = IdempotencyRecord {
            outcome: Some(Outcome::Declined),
            result: Some(r#"{"type":"PaymentDeclined","orderId":"o","reason":"x"}"#.into()),
            ..legacy.clone()
        };
        assert_eq!(charged_payment_id(&declined), None);
        let in_progress = record(Status::InProgress, "h", Some(1), None);
        assert_eq!(charged_payment_id(&in_progress), None);
    }

    #[test]
    fn when_payload_differs_should_refuse_even_a_completed_record() {
        let r = record(Status::Completed, "h1", None, Some("{}"));
        assert_eq!(r.classify("h2", 0), Existing::PayloadMismatch);
        assert_eq!(r.classify("h1", 0), Existing::Completed("{}".into()));
    }

    #[test]
    fn when_holder_is_past_its_deadline_should_allow_takeover() {
        let r = record(Status::InProgress, "h", Some(1_000), None);
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

    #[test]
    fn step_keys_are_the_business_ids() {
        assert_eq!(StepKey::Reserve("o-1").to_string(), "o-1#reserve");
        assert_eq!(StepKey::Release("o-1").to_string(), "o-1#release");
        assert_eq!(StepKey::Charge("o-1").to_string(), "o-1#charge");
        assert_eq!(StepKey::Refund("o-1").to_string(), "o-1#refund");
        let api = |customer, key| StepKey::Api { customer, key }.to_string();
        assert_eq!(api("c-1", "k"), "api#c-1#k");
        // However the parts are cut, two different pairs never give one record id.
        assert_ne!(api("a#b", "c"), api("a", "b#c"));
        assert_ne!(api("a%23b", "c"), api("a#b", "c"));
        let adjust = |actor, key| StepKey::Adjust { actor, key }.to_string();
        assert_eq!(adjust("op-1", "k"), "adjust#op-1#k");
        assert_ne!(adjust("a#b", "c"), adjust("a", "b#c"));
        assert_ne!(adjust("a%23b", "c"), adjust("a#b", "c"));
        assert_ne!(adjust("c-1", "k"), api("c-1", "k"));
    }

    #[test]
    fn when_stored_the_record_maps_to_the_tables_attributes() {
        let r = record(Status::InProgress, "h", Some(5), None);
        let item: std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue> =
            serde_dynamo::to_item(&r).unwrap();
        assert_eq!(item["status"].as_s().unwrap(), "IN_PROGRESS");
        assert_eq!(item["payloadHash"].as_s().unwrap(), "h");
        assert_eq!(item["inProgressUntilMs"].as_n().unwrap(), "5");
        assert!(!item.contains_key("result"));
        let back: IdempotencyRecord = serde_dynamo::from_item(item).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn when_replaying_should_refuse_another_payload_and_wait_for_a_holder() {
        let done = record(Status::Completed, "h", None, Some(r#"{"a":1}"#));
        assert_eq!(replay::<serde_json::Value>(&done, "h", 0).unwrap()["a"], 1);
        assert!(matches!(
            replay::<serde_json::Value>(&done, "x", 0),
            Err(ReplayError::PayloadMismatch(_))
        ));
        let held = record(Status::InProgress, "h", Some(10), None);
        assert!(matches!(
            replay::<serde_json::Value>(&held, "h", 0),
            Err(ReplayError::InProgress(_))
        ));
    }
}
