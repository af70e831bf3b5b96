//! Orders, products and the rules for what a valid request is. No AWS here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Most lines one order may have. Stock release is one DynamoDB transaction of two
/// bookkeeping actions plus one update per line, and a transaction holds at most 100 actions;
/// 25 keeps a wide margin and is what the README documents.
pub const MAX_ITEMS_PER_ORDER: usize = 25;
/// Most units of one product in one order line.
pub const MAX_QUANTITY_PER_LINE: u64 = 1_000;
/// Longest id (order, product, customer, payment method, idempotency key) accepted.
pub const MAX_ID_LEN: usize = 64;
/// Largest request body accepted by the API, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest price and stock level a product may have.
pub const MAX_PRICE_CENTS: u64 = 100_000_000;
pub const MAX_STOCK: u64 = 1_000_000_000;
pub const MAX_NAME_LEN: usize = 200;
pub const DEFAULT_PAYMENT_METHOD: &str = "tok_visa";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StockStatus {
    Pending,
    Reserved,
    Rejected,
    Released,
    /// The order was cancelled before its stock was reserved, and the reservation was fenced
    /// off: a `ReserveStock` that arrives later holds nothing.
    Voided,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    Pending,
    Charged,
    Declined,
    Refunded,
    /// The order was cancelled before it was charged, and the charge was fenced off: a
    /// `ChargePayment` that arrives later charges nothing.
    Voided,
}

/// Why an order was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CancelReason {
    InsufficientStock,
    UnknownProduct,
    PaymentDeclined,
    Timeout,
    /// `POST /orders/{orderId}/cancel`, by the order's customer or an operator.
    CustomerCancelled,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::InsufficientStock => "INSUFFICIENT_STOCK",
            CancelReason::UnknownProduct => "UNKNOWN_PRODUCT",
            CancelReason::PaymentDeclined => "PAYMENT_DECLINED",
            CancelReason::Timeout => "TIMEOUT",
            CancelReason::CustomerCancelled => "CUSTOMER_CANCELLED",
        }
    }
}

/// A value that must be a JSON object. serde's derived structs (and internally tagged enums)
/// also accept a JSON array of their fields in order; a request or message must not.
pub struct ObjectOnly<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// `deserialize_with` for a list of objects (see [`ObjectOnly`]).
pub fn objects<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    Ok(Vec::<ObjectOnly<T>>::deserialize(d)?
        .into_iter()
        .map(|o| o.0)
        .collect())
}

/// One line of an order request: which product and how many.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ItemRequest {
    pub product_id: String,
    pub quantity: u64,
}

/// The body of `POST /orders`. Unknown fields are refused, so a misspelt field is an error
/// rather than silently ignored. The customer is the caller (the token's `sub`), never the
/// body: a `customerId` in it is refused like any other unknown field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrderRequest {
    #[serde(deserialize_with = "objects")]
    pub items: Vec<ItemRequest>,
    #[serde(default)]
    pub payment_method: Option<String>,
}

/// The body of `PUT /products/{productId}`. `quantity` (the initial stock) is required to
/// create a product and refused on an existing one: after creation, stock changes only through
/// stock adjustments ([`AdjustStockRequest`]) and the saga.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutProductRequest {
    pub name: String,
    pub price_cents: u64,
    #[serde(default)]
    pub quantity: Option<u64>,
}

/// Longest reason of a stock adjustment.
pub const MAX_REASON_LEN: usize = 200;
/// The reason recorded with a product's first movement (its initial stock).
pub const INITIAL_STOCK_REASON: &str = "initial stock";

/// The body of `POST /products/{productId}/stock-adjustments`: how many units come in
/// (positive) or go out (negative), and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdjustStockRequest {
    pub delta: i64,
    pub reason: String,
}

impl AdjustStockRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        let max = MAX_STOCK as i64;
        if self.delta == 0 || !(-max..=max).contains(&self.delta) {
            return Err(invalid(
                "delta",
                format!("must be a non-zero whole number from -{MAX_STOCK} to {MAX_STOCK}"),
            ));
        }
        if self.reason.trim().is_empty() {
            return Err(invalid("reason", "must not be empty"));
        }
        if self.reason.chars().count() > MAX_REASON_LEN {
            return Err(invalid(
                "reason",
                format!("must be at most {MAX_REASON_LEN} characters"),
            ));
        }
        if self.reason.chars().any(char::is_control) {
            return Err(invalid("reason", "must not contain control characters"));
        }
        Ok(())
    }
}

/// One change of a product's stock: its creation (the initial stock) or an adjustment. Stored
/// in the stock movements table (key `productId`, `movementId`) and returned by
/// `POST /products/{productId}/stock-adjustments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockMovement {
    pub product_id: String,
    /// Sorts by time: the zero-padded epoch milliseconds, `#`, a UUID ([`movement_id`]).
    pub movement_id: String,
    pub delta: i64,
    pub reason: String,
    /// Who made it: the caller's `sub`.
    pub actor: String,
    pub at_ms: i64,
    /// The units available right after this movement.
    pub quantity_after: u64,
}

/// A movement id that sorts by time: `{atMs, 15 digits}#{uuid}`.
pub fn movement_id(at_ms: i64) -> String {
    format!("{:015}#{}", at_ms.max(0), uuid::Uuid::new_v4())
}

/// A validation failure: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks an id (order, product, customer, payment method, idempotency key): 1 to
/// [`MAX_ID_LEN`] characters from `A-Z a-z 0-9 - _ . :`. `#` is excluded because it separates
/// the parts of idempotency keys; control characters and spaces are excluded everywhere.
pub fn validate_id(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(invalid(
            field,
            format!("contains {c:?}; allowed are letters, digits and - _ . :"),
        ));
    }
    Ok(())
}

impl PlaceOrderRequest {
    /// Checks every rule a request must meet before anything is read or written.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(method) = &self.payment_method {
            validate_id("paymentMethod", method)?;
        }
        if self.items.is_empty() {
            return Err(invalid("items", "must contain at least one item"));
        }
        if self.items.len() > MAX_ITEMS_PER_ORDER {
            return Err(invalid(
                "items",
                format!("must contain at most {MAX_ITEMS_PER_ORDER} items"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, item) in self.items.iter().enumerate() {
            validate_id(&format!("items[{i}].productId"), &item.product_id)?;
            if item.quantity == 0 || item.quantity > MAX_QUANTITY_PER_LINE {
                return Err(invalid(
                    format!("items[{i}].quantity"),
                    format!("must be a whole number from 1 to {MAX_QUANTITY_PER_LINE}"),
                ));
            }
            if !seen.insert(item.product_id.as_str()) {
                return Err(invalid(
                    format!("items[{i}].productId"),
                    format!(
                        "product {} appears more than once; put its total quantity on one line",
                        item.product_id
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn payment_method(&self) -> &str {
        self.payment_method
            .as_deref()
            .unwrap_or(DEFAULT_PAYMENT_METHOD)
    }
}

impl PutProductRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.name.chars().count() > MAX_NAME_LEN {
            return Err(invalid(
                "name",
                format!("must be at most {MAX_NAME_LEN} characters"),
            ));
        }
        if self.name.chars().any(char::is_control) {
            return Err(invalid("name", "must not contain control characters"));
        }
        if self.price_cents > MAX_PRICE_CENTS {
            return Err(invalid(
                "priceCents",
                format!("must be a whole number from 0 to {MAX_PRICE_CENTS}"),
            ));
        }
        if self.quantity.is_some_and(|q| q > MAX_STOCK) {
            return Err(invalid(
                "quantity",
                format!("must be a whole number from 0 to {MAX_STOCK}"),
            ));
        }
        Ok(())
    }
}

/// A product as stored and as returned by `GET /products/{productId}`; `quantity` is the
/// stock available now (reservations are already taken off), `reserved` the units held by
/// orders that are not cancelled (maintained by the stock function; absent means 0).
/// `version` counts the changes of the catalogue fields (name, price): only
/// `PUT /products/{productId}` bumps it, never a stock change, and the `ETag` is made of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub product_id: String,
    pub name: String,
    pub price_cents: u64,
    pub quantity: u64,
    /// Units held by orders that are not cancelled (reserved, or sold). The reservation and
    /// release transactions move units between `quantity` and `reserved`, so their sum changes
    /// only through stock adjustments. Absent on a product no order has reserved yet.
    #[serde(default)]
    pub reserved: u64,
    #[serde(default)]
    pub version: u64,
}

impl Product {
    /// The strong entity tag of the product's catalogue fields: `"v{version}"`.
    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.version)
    }
}

/// One line of an order, priced from the product when the order was placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub product_id: String,
    pub quantity: u64,
    pub unit_price_cents: u64,
}

/// A product id and a number of units: what stock reservation and release work on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StockLine {
    pub product_id: String,
    pub quantity: u64,
}

/// The order record. Field names are the DynamoDB attribute names and the JSON names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub status: OrderStatus,
    pub stock_status: StockStatus,
    pub payment_status: PaymentStatus,
    pub items: Vec<OrderLine>,
    pub total_cents: u64,
    pub payment_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<CancelReason>,
    /// Human-readable detail of the cancellation, naming the product where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_product_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Creation time in epoch milliseconds: the sort key of the pending-orders index.
    pub created_at_ms: i64,
    /// The sparse partition key of the index the timeout sweeper queries: `"PENDING"` while
    /// the order is pending, `"CANCELLING"` from a cancellation through the API until the
    /// coordinator has sent its compensations; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_sweep: Option<String>,
}

/// Value of [`Order::pending_sweep`] while an order is pending.
pub const PENDING_SWEEP: &str = "PENDING";
/// Value of [`Order::pending_sweep`] from an API cancellation until the coordinator has sent
/// the order's compensations: what the sweeper hands the coordinator again, should the API
/// have died between the two.
pub const CANCELLING_SWEEP: &str = "CANCELLING";

/// Prices an order from its request and the products' current prices.
/// `price_of` returns `None` for an unknown product, which makes the whole order invalid.
pub fn price_order(
    order_id: String,
    customer_id: &str,
    request: &PlaceOrderRequest,
    price_of: impl Fn(&str) -> Option<u64>,
    now_ms: i64,
) -> Result<Order, Invalid> {
    let mut items = Vec::with_capacity(request.items.len());
    let mut total: u64 = 0;
    for (i, item) in request.items.iter().enumerate() {
        let unit = price_of(&item.product_id).ok_or_else(|| {
            invalid(
                format!("items[{i}].productId"),
                format!("product {} does not exist", item.product_id),
            )
        })?;
        total = unit
            .checked_mul(item.quantity)
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| invalid("items", "order total is too large"))?;
        items.push(OrderLine {
            product_id: item.product_id.clone(),
            quantity: item.quantity,
            unit_price_cents: unit,
        });
    }
    let now = crate::time::rfc3339(now_ms);
    Ok(Order {
        order_id,
        customer_id: customer_id.to_string(),
        status: OrderStatus::Pending,
        stock_status: StockStatus::Pending,
        payment_status: PaymentStatus::Pending,
        items,
        total_cents: total,
        payment_method: request.payment_method().to_string(),
        payment_id: None,
        cancel_reason: None,
        cancel_detail: None,
        cancel_product_id: None,
        created_at: now.clone(),
        updated_at: now,
        created_at_ms: now_ms,
        pending_sweep: Some(PENDING_SWEEP.to_string()),
    })
}

impl Order {
    /// The part of the order the saga moves.
    pub fn saga_state(&self) -> crate::saga::SagaState {
        crate::saga::SagaState {
            status: self.status,
            stock: self.stock_status,
            payment: self.payment_status,
            cancel_reason: self.cancel_reason,
        }
    }

    pub fn stock_lines(&self) -> Vec<StockLine> {
        self.items
            .iter()
            .map(|l| StockLine {
                product_id: l.product_id.clone(),
                quantity: l.quantity,
            })
            .collect()
    }

    /// The JSON the API returns for an order.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "orderId": self.order_id,
            "customerId": self.customer_id,
            "status": self.status,
            "stockStatus": self.stock_status,
            "paymentStatus": self.payment_status,
            "items": self.items,
            "totalCents": self.total_cents,
            "paymentMethod": self.payment_method,
            "paymentId": self.payment_id,
            "cancelReason": self.cancel_reason,
            "cancelDetail": self.cancel_detail,
            "cancelProductId": self.cancel_product_id,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        })
        .as_object()
        .map(|o| {
            // Absent rather than null: `cancelReason` is absent unless the order is cancelled.
            serde_json::Value::Object(
                o.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(items: Vec<(&str, u64)>) -> PlaceOrderRequest {
        PlaceOrderRequest {
            items: items
                .into_iter()
                .map(|(p, q)| ItemRequest {
                    product_id: p.into(),
                    quantity: q,
                })
                .collect(),
            payment_method: None,
        }
    }

    #[test]
    fn when_request_is_well_formed_should_validate() {
        assert_eq!(request(vec![("p-1", 2), ("p-2", 1)]).validate(), Ok(()));
    }

    #[test]
    fn when_request_breaks_a_rule_should_name_the_field() {
        let cases: Vec<(PlaceOrderRequest, &str)> = vec![
            (request(vec![]), "items"),
            (request(vec![("p-1", 0)]), "items[0].quantity"),
            (
                request(vec![("p-1", MAX_QUANTITY_PER_LINE + 1)]),
                "items[0].quantity",
            ),
            (request(vec![("p-1", 1), ("p-1", 2)]), "items[1].productId"),
            (request(vec![("", 1)]), "items[0].productId"),
            (request(vec![("p\u{7}", 1)]), "items[0].productId"),
            (request(vec![("p#1", 1)]), "items[0].productId"),
            (
                request((0..=MAX_ITEMS_PER_ORDER).map(|_| ("p", 1)).collect()),
                "items",
            ),
        ];
        for (req, field) in cases {
            assert_eq!(req.validate().unwrap_err().field, field, "{req:?}");
        }
        // The customer is the caller, never the body.
        let with_customer =
            r#"{"customerId": "c-2", "items": [{"productId": "p-1", "quantity": 1}]}"#;
        let err = serde_json::from_str::<PlaceOrderRequest>(with_customer).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `customerId`"),
            "{err}"
        );
    }

    #[test]
    fn when_pricing_should_store_unit_prices_and_total_in_cents() {
        let req = request(vec![("p-1", 2), ("p-2", 3)]);
        let order = price_order(
            "o-1".into(),
            "c-1",
            &req,
            |p| match p {
                "p-1" => Some(1250),
                "p-2" => Some(99),
                _ => None,
            },
            1_700_000_000_000,
        )
        .unwrap();
        assert_eq!(order.total_cents, 2 * 1250 + 3 * 99);
        assert_eq!(order.items[1].unit_price_cents, 99);
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.pending_sweep.as_deref(), Some(PENDING_SWEEP));
        assert_eq!(order.payment_method, DEFAULT_PAYMENT_METHOD);
    }

    #[test]
    fn when_a_product_is_unknown_should_refuse_the_order() {
        let err =
            price_order("o".into(), "c-1", &request(vec![("nope", 1)]), |_| None, 0).unwrap_err();
        assert_eq!(err.field, "items[0].productId");
    }

    #[test]
    fn when_viewing_a_pending_order_should_omit_cancel_reason() {
        let order =
            price_order("o".into(), "c-1", &request(vec![("p", 1)]), |_| Some(5), 0).unwrap();
        let view = order.view();
        assert!(view.get("cancelReason").is_none());
        assert_eq!(view["status"], "PENDING");
        assert_eq!(view["items"][0]["unitPriceCents"], 5);
    }
}
