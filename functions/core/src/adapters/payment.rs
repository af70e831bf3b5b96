//! The payment provider's requests and outcomes, and the simulator shipped in place of a real
//! provider (the port is [`crate::ports::PaymentProvider`]).
//!
//! Every call carries an idempotency key derived from the order (`{orderId}#charge`,
//! `{orderId}#refund`), as real providers accept: a call repeated after a crash in the middle
//! of the first one returns the first one's result and moves no money twice.

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure;
use serde::{Deserialize, Serialize};

use super::dynamo::{self, StoreError};
use crate::ports::PaymentProvider;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRequest<'a> {
    pub idempotency_key: &'a str,
    pub order_id: &'a str,
    pub customer_id: &'a str,
    pub amount_cents: u64,
    pub payment_method: &'a str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundRequest<'a> {
    pub idempotency_key: &'a str,
    pub order_id: &'a str,
    pub payment_id: &'a str,
    pub amount_cents: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChargeOutcome {
    #[serde(rename_all = "camelCase")]
    Approved { payment_id: String },
    #[serde(rename_all = "camelCase")]
    Declined { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundOutcome {
    pub refund_id: String,
}

/// A provider failure that says nothing about the charge (network, throttling): retry with
/// the same idempotency key.
#[derive(Debug, thiserror::Error)]
#[error("payment provider unavailable: {0}")]
pub struct ProviderError(pub String);

impl From<StoreError> for ProviderError {
    fn from(e: StoreError) -> Self {
        ProviderError(e.to_string())
    }
}

/// Always approved (unless a random decline hits).
pub const TOKEN_VISA: &str = "tok_visa";
/// Always declined.
pub const TOKEN_DECLINED: &str = "tok_chargeDeclined";

/// The simulated provider. It decides like a card network would (`tok_visa` approved,
/// `tok_chargeDeclined` declined, and `failure_rate` of other charges declined at random), and
/// keeps its own ledger in DynamoDB keyed by the caller's idempotency key, so a repeated key
/// gets the first result back. The ledger is also what tests count charges and refunds on.
#[derive(Clone, Debug)]
pub struct SimulatedProvider {
    client: aws_sdk_dynamodb::Client,
    ledger_table: String,
    failure_rate: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LedgerKind {
    Charge,
    Refund,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub idempotency_key: String,
    pub kind: LedgerKind,
    pub order_id: String,
    pub amount_cents: u64,
    pub charge: Option<ChargeOutcome>,
    pub refund: Option<RefundOutcome>,
    pub created_at: String,
}

impl SimulatedProvider {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        ledger_table: impl Into<String>,
        failure_rate: f64,
    ) -> Self {
        Self {
            client,
            ledger_table: ledger_table.into(),
            failure_rate,
        }
    }

    /// Records an entry unless the key is already in the ledger; returns the entry that stands.
    async fn record(&self, entry: LedgerEntry) -> Result<LedgerEntry, ProviderError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.ledger_table)
            .set_item(Some(dynamo::to_item(&entry)?))
            .condition_expression("attribute_not_exists(idempotencyKey)")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(entry),
            Err(err) => match err.into_service_error() {
                PutItemError::ConditionalCheckFailedException(e) => {
                    let item = e
                        .item
                        .ok_or_else(|| ProviderError("ledger entry vanished".into()))?;
                    Ok(dynamo::from_item(item)?)
                }
                other => Err(StoreError::sdk("ledger_put", other).into()),
            },
        }
    }
}

impl PaymentProvider for SimulatedProvider {
    async fn charge(&self, req: ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError> {
        let outcome = if req.payment_method == TOKEN_DECLINED {
            ChargeOutcome::Declined {
                reason: "CARD_DECLINED".into(),
            }
        } else if self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate {
            ChargeOutcome::Declined {
                reason: "RANDOM_DECLINE".into(),
            }
        } else {
            ChargeOutcome::Approved {
                payment_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
            }
        };
        let entry = self
            .record(LedgerEntry {
                idempotency_key: req.idempotency_key.into(),
                kind: LedgerKind::Charge,
                order_id: req.order_id.into(),
                amount_cents: req.amount_cents,
                charge: Some(outcome),
                refund: None,
                created_at: crate::time::rfc3339(crate::time::now_ms()),
            })
            .await?;
        entry.charge.ok_or_else(|| {
            ProviderError(format!("key {} was used for a refund", req.idempotency_key))
        })
    }

    async fn refund(&self, req: RefundRequest<'_>) -> Result<RefundOutcome, ProviderError> {
        let entry = self
            .record(LedgerEntry {
                idempotency_key: req.idempotency_key.into(),
                kind: LedgerKind::Refund,
                order_id: req.order_id.into(),
                amount_cents: req.amount_cents,
                charge: None,
                refund: Some(RefundOutcome {
                    refund_id: format!("re_{}", uuid::Uuid::new_v4().simple()),
                }),
                created_at: crate::time::rfc3339(crate::time::now_ms()),
            })
            .await?;
        entry.refund.ok_or_else(|| {
            ProviderError(format!("key {} was used for a charge", req.idempotency_key))
        })
    }
}
