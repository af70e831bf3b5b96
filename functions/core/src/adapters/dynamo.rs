//! Small helpers shared by the DynamoDB repositories, and their error type.

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;

pub type Item = HashMap<String, AttributeValue>;

/// A DynamoDB failure that is not a business outcome. Conditional-check failures and
/// transaction cancellations are matched and turned into outcomes by the callers before
/// anything becomes a `StoreError`; what is left is transient (throttling, network, a
/// transaction conflict that kept recurring) or a malformed stored item.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DynamoDB {op} failed: {code}: {message}")]
    Sdk {
        op: &'static str,
        code: String,
        message: String,
    },
    #[error("stored item is malformed: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn sdk<E: ProvideErrorMetadata + std::fmt::Debug>(op: &'static str, err: E) -> Self {
        StoreError::Sdk {
            op,
            code: err.code().unwrap_or("Unknown").to_string(),
            message: err
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{err:?}")),
        }
    }
}

pub fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub fn un(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// Maps a stored item to a type with serde_dynamo.
pub fn from_item<T: serde::de::DeserializeOwned>(item: Item) -> Result<T, StoreError> {
    serde_dynamo::from_item(item).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A value (an enum, typically) as the attribute serde_dynamo stores it as.
pub fn to_value<T: serde::Serialize>(value: &T) -> AttributeValue {
    serde_dynamo::to_attribute_value(value).expect("plain values always map to an attribute")
}

pub fn to_item<T: serde::Serialize>(value: &T) -> Result<Item, StoreError> {
    serde_dynamo::to_item(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The outcome of a conditional write whose failed condition is an answer, not an error:
/// `Ok(true)` when it was applied, `Ok(false)` when its condition did not hold.
pub fn applied<T, E>(result: Result<T, E>, op: &'static str) -> Result<bool, StoreError>
where
    E: ProvideErrorMetadata + std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
        Err(e) => Err(StoreError::sdk(op, e)),
    }
}

/// Jittered pause before retrying a transaction conflict, growing with the attempt.
pub async fn conflict_backoff(attempt: u32) {
    let base = 10u64 << attempt.min(5);
    let ms = base + fastrand::u64(0..=base);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}
