//! The messages on each queue. Each queue has its own enum, tagged by `type`, so a message
//! meant for another queue does not parse here: it is refused (and reaches the DLQ) instead of
//! being misapplied. Unknown fields are refused too.

use crate::domain::StockLine;
use serde::{Deserialize, Serialize};

/// Commands for the stock function (`StockQueue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum StockCommand {
    #[serde(rename_all = "camelCase")]
    ReserveStock {
        order_id: String,
        #[serde(deserialize_with = "crate::domain::objects")]
        items: Vec<StockLine>,
    },
    /// Gives back an order's reservation. With `fence` (the order was cancelled before its
    /// reservation was seen), a reservation that has not happened yet is fenced off instead,
    /// so that a `ReserveStock` still in flight holds nothing. Without it (the coordinator saw
    /// `StockReserved`), a missing reservation is an error for the DLQ and its alarm.
    #[serde(rename_all = "camelCase")]
    ReleaseStock {
        order_id: String,
        #[serde(deserialize_with = "crate::domain::objects")]
        items: Vec<StockLine>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fence: bool,
    },
}

/// Commands for the payment function (`PaymentQueue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum PaymentCommand {
    #[serde(rename_all = "camelCase")]
    ChargePayment {
        order_id: String,
        customer_id: String,
        amount_cents: u64,
        payment_method: String,
    },
    /// Refunds an order's charge. Without `paymentId` (the order was cancelled before its
    /// charge was seen), the charge is looked up by the order's business key: refunded if it
    /// happened, fenced off if it has not, so that a `ChargePayment` still in flight charges
    /// nothing.
    #[serde(rename_all = "camelCase")]
    RefundPayment {
        order_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payment_id: Option<String>,
        amount_cents: u64,
    },
}

/// Why stock could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StockRejection {
    InsufficientStock,
    UnknownProduct,
}

/// Results and timeouts for the saga coordinator (`CoordinatorQueue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum SagaEvent {
    #[serde(rename_all = "camelCase")]
    StockReserved { order_id: String },
    #[serde(rename_all = "camelCase")]
    StockRejected {
        order_id: String,
        reason: StockRejection,
        product_id: String,
    },
    #[serde(rename_all = "camelCase")]
    StockReleased { order_id: String },
    /// The order was cancelled before its stock was reserved; the reservation is fenced off.
    #[serde(rename_all = "camelCase")]
    StockVoided { order_id: String },
    #[serde(rename_all = "camelCase")]
    PaymentCharged {
        order_id: String,
        payment_id: String,
    },
    #[serde(rename_all = "camelCase")]
    PaymentDeclined { order_id: String, reason: String },
    #[serde(rename_all = "camelCase")]
    PaymentRefunded {
        order_id: String,
        payment_id: String,
    },
    /// The order was cancelled before it was charged; the charge is fenced off.
    #[serde(rename_all = "camelCase")]
    PaymentVoided { order_id: String },
    /// The order was cancelled through the API (sent by the API, and again by the sweeper
    /// while the order is still marked as cancelling): the coordinator compensates.
    #[serde(rename_all = "camelCase")]
    OrderCancelled { order_id: String },
    /// Sent by the timeout sweeper for an order created before `cutoff_ms` and still pending.
    #[serde(rename_all = "camelCase")]
    OrderTimedOut { order_id: String, cutoff_ms: i64 },
}

impl StockCommand {
    pub fn order_id(&self) -> &str {
        match self {
            StockCommand::ReserveStock { order_id, .. }
            | StockCommand::ReleaseStock { order_id, .. } => order_id,
        }
    }
}

impl PaymentCommand {
    pub fn order_id(&self) -> &str {
        match self {
            PaymentCommand::ChargePayment { order_id, .. }
            | PaymentCommand::RefundPayment { order_id, .. } => order_id,
        }
    }
}

impl SagaEvent {
    pub fn order_id(&self) -> &str {
        match self {
            SagaEvent::StockReserved { order_id }
            | SagaEvent::StockRejected { order_id, .. }
            | SagaEvent::StockReleased { order_id }
            | SagaEvent::StockVoided { order_id }
            | SagaEvent::PaymentCharged { order_id, .. }
            | SagaEvent::PaymentDeclined { order_id, .. }
            | SagaEvent::PaymentRefunded { order_id, .. }
            | SagaEvent::PaymentVoided { order_id }
            | SagaEvent::OrderCancelled { order_id }
            | SagaEvent::OrderTimedOut { order_id, .. } => order_id,
        }
    }
}

/// Why a message body was refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("message has no body")]
    NoBody,
    #[error("message body is not a valid {expected} message: {source}")]
    Invalid {
        expected: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("message names an invalid order id: {0}")]
    BadOrderId(crate::domain::Invalid),
}

/// Parses a message body as one of this queue's messages and checks its order id.
pub fn parse<T: for<'de> Deserialize<'de>>(
    body: Option<&str>,
    expected: &'static str,
    order_id: impl Fn(&T) -> &str,
) -> Result<T, ParseError> {
    let body = body.ok_or(ParseError::NoBody)?;
    let msg: T = serde_json::from_str::<crate::domain::ObjectOnly<T>>(body)
        .map(|o| o.0)
        .map_err(|source| ParseError::Invalid { expected, source })?;
    crate::domain::validate_id("orderId", order_id(&msg)).map_err(ParseError::BadOrderId)?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_a_stock_message_arrives_on_the_coordinator_queue_should_refuse_it() {
        let body =
            r#"{"type":"ReserveStock","orderId":"o-1","items":[{"productId":"p","quantity":1}]}"#;
        assert!(parse::<StockCommand>(Some(body), "stock", StockCommand::order_id).is_ok());
        assert!(parse::<SagaEvent>(Some(body), "coordinator", SagaEvent::order_id).is_err());
        assert!(parse::<PaymentCommand>(Some(body), "payment", PaymentCommand::order_id).is_err());
    }

    #[test]
    fn when_a_message_has_extra_fields_or_a_bad_order_id_should_refuse_it() {
        let extra = r#"{"type":"StockReserved","orderId":"o-1","price":3}"#;
        assert!(parse::<SagaEvent>(Some(extra), "c", SagaEvent::order_id).is_err());
        let bad_id = r#"{"type":"StockReserved","orderId":""}"#;
        assert!(matches!(
            parse::<SagaEvent>(Some(bad_id), "c", SagaEvent::order_id),
            Err(ParseError::BadOrderId(_))
        ));
        assert!(matches!(
            parse::<SagaEvent>(None, "c", SagaEvent::order_id),
            Err(ParseError::NoBody)
        ));
    }

    #[test]
    fn when_serialized_should_use_camel_case_and_a_type_tag() {
        let msg = SagaEvent::PaymentCharged {
            order_id: "o".into(),
            payment_id: "ch_1".into(),
        };
        let json = serde_json::to_value(&msg).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "PaymentCharged", "orderId": "o", "paymentId": "ch_1"})
        );
    }
}
