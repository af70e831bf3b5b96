//! `saga-local opening-balances`: the first stock movement of products created before stock
//! movements were recorded.
//!
//! A product created by this version gets its first movement (`initial stock`) in the same
//! transaction as the product. A product created by an earlier version has none, so the
//! audit's invariant 3 (`quantity + reserved` = the sum of its movements) flags it after an
//! upgrade. This writes the missing movement, an **opening balance**, once per product:
//!
//! - **Which products:** those in the products table with no first movement (no
//!   `initial stock` movement, no opening balance) whose stock the movements do not explain.
//! - **How much:** `quantity + reserved + units held by live reservations of the previous
//!   version - the sum of the movements it already has`. The previous version's live
//!   reservations were never counted in `reserved`; see [`crate::audit`]'s invariant 3.
//!   A product with adjustments made since the upgrade keeps them: the opening balance is
//!   what came before them.
//! - **When the stores change while they are read:** the scans are not a snapshot. So the
//!   stores are read twice, and a product is written only if both reads give it the same
//!   figures. The write is then one `TransactWriteItems`: a `ConditionCheck` that the
//!   product's `quantity` and `reserved` are still what was read, and the movement's `Put`
//!   under the fixed id [`OPENING_MOVEMENT_ID`], only if absent. A product that changed is
//!   reported and left for the next run. A second run finds the opening balance and writes
//!   nothing.
//! - **Never written:** a negative opening balance. The movements would then claim more
//!   stock than the product has ever held, which no history explains: it is reported for a
//!   person to look at.
//!
//! Without `--apply` it only reads, and says what it would write.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, TransactWriteItem};
use saga_core::domain::StockMovement;
use serde::Serialize;

use crate::audit::{AuditError, Snapshot, StockView, TableNames, stock_views};

/// The opening balance's movement id: it sorts before every movement of [`movement_id`]
/// (`{15-digit epoch ms}#{uuid}`; `!` sorts before `#`), and being fixed, a product gets at
/// most one.
///
/// [`movement_id`]: saga_core::domain::movement_id
pub const OPENING_MOVEMENT_ID: &str = "000000000000000!opening-balance";
/// The opening balance's `reason`.
pub const OPENING_REASON: &str = "opening balance";
/// The opening balance's `actor`: this command, not a person's `sub`.
pub const OPENING_ACTOR: &str = "saga-local opening-balances";

/// One product that needs an opening balance, with the figures it is computed from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Opening {
    pub product_id: String,
    pub quantity: i64,
    pub reserved: i64,
    pub legacy_held: i64,
    pub movements: usize,
    pub movements_sum: i64,
    /// The opening balance: `quantity + reserved + legacy_held - movements_sum`.
    pub delta: i64,
}

impl Opening {
    fn of(product_id: &str, v: &StockView) -> Self {
        Self {
            product_id: product_id.into(),
            quantity: v.quantity,
            reserved: v.reserved,
            legacy_held: v.legacy_held,
            movements: v.movements,
            movements_sum: v.movements_sum,
            delta: v.unexplained(),
        }
    }
}

/// What became of one [`Opening`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Read only (no `--apply`): this would be written.
    WouldWrite,
    Written,
    /// Another run wrote it first.
    AlreadyWritten,
    /// The product's figures changed between the reads or before the write: run again.
    Changed,
    /// A negative opening balance: never written (see the module's documentation).
    Refused,
}

/// The products of `snapshot` that need an opening balance, by id.
pub fn plan(snapshot: &Snapshot) -> BTreeMap<String, Opening> {
    let (views, _) = stock_views(snapshot);
    views
        .iter()
        .filter(|(_, v)| v.exists && !v.has_first_movement && v.unexplained() != 0)
        .map(|(id, v)| (id.clone(), Opening::of(id, v)))
        .collect()
}

/// What to do with each of `first`'s openings, given a second read's plan: write those that
/// both reads agree on, and nothing else.
pub fn decide(
    first: &BTreeMap<String, Opening>,
    second: &BTreeMap<String, Opening>,
) -> Vec<(Opening, Option<Outcome>)> {
    first
        .values()
        .map(|o| {
            let outcome = if o.delta < 0 {
                Some(Outcome::Refused)
            } else if second.get(&o.product_id) != Some(o) {
                Some(Outcome::Changed)
            } else {
                None // to write
            };
            (o.clone(), outcome)
        })
        .collect()
}

/// Writes one opening balance: the movement, only if the product still holds what was read
/// and it has no opening balance yet.
pub async fn write(
    client: &aws_sdk_dynamodb::Client,
    tables: &TableNames,
    opening: &Opening,
    now_ms: i64,
) -> Result<Outcome, AuditError> {
    let n = |v: i64| AttributeValue::N(v.to_string());
    let (reserved_condition, reserved_value) = if opening.reserved == 0 {
        ("(reserved = :r OR attribute_not_exists(reserved))", n(0))
    } else {
        ("reserved = :r", n(opening.reserved))
    };
    let check = ConditionCheck::builder()
        .table_name(&tables.products)
        .key("productId", AttributeValue::S(opening.product_id.clone()))
        .condition_expression(format!("quantity = :q AND {reserved_condition}"))
        .expression_attribute_values(":q", n(opening.quantity))
        .expression_attribute_values(":r", reserved_value)
        .build()
        .map_err(|e| AuditError::Write(e.to_string()))?;
    let movement = StockMovement {
        product_id: opening.product_id.clone(),
        movement_id: OPENING_MOVEMENT_ID.into(),
        delta: opening.delta,
        reason: OPENING_REASON.into(),
        actor: OPENING_ACTOR.into(),
        at_ms: now_ms,
        // The product's quantity when this is written (`at_ms`), as for an adjustment: what
        // it was right after the opening itself, before the movements since, is not known.
        quantity_after: u64::try_from(opening.quantity).unwrap_or(0),
    };
    let put = Put::builder()
        .table_name(&tables.movements)
        .set_item(Some(
            serde_dynamo::to_item(&movement).map_err(|e| AuditError::Write(e.to_string()))?,
        ))
        .condition_expression("attribute_not_exists(movementId)")
        .build()
        .map_err(|e| AuditError::Write(e.to_string()))?;
    let sent = client
        .transact_write_items()
        .transact_items(TransactWriteItem::builder().condition_check(check).build())
        .transact_items(TransactWriteItem::builder().put(put).build())
        .send()
        .await;
    match sent {
        Ok(_) => Ok(Outcome::Written),
        Err(e) => match e.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                let failed = |i: usize| {
                    c.cancellation_reasons()
                        .get(i)
                        .and_then(|r| r.code())
                        .is_some_and(|code| code == "ConditionalCheckFailed")
                };
                if failed(1) {
                    Ok(Outcome::AlreadyWritten)
                } else if failed(0) {
                    Ok(Outcome::Changed)
                } else {
                    Err(AuditError::Write(format!(
                        "{}: {}",
                        opening.product_id,
                        DisplayErrorContext(&e)
                    )))
                }
            }
            _ => Err(AuditError::Write(format!(
                "{}: {}",
                opening.product_id,
                DisplayErrorContext(&e)
            ))),
        },
    }
}

/// One line per product, and a summary.
pub fn text(results: &[(Opening, Outcome)]) -> String {
    let mut out = String::new();
    for (o, outcome) in results {
        let verdict = match outcome {
            Outcome::WouldWrite => "would be written (read only: --apply writes it)",
            Outcome::Written => "written",
            Outcome::AlreadyWritten => "already written by another run",
            Outcome::Changed => "not written: the product changed while it was read; run again",
            Outcome::Refused => {
                "not written: negative, the movements claim more stock than the product holds; look into it"
            }
        };
        out.push_str(&format!(
            "{}: quantity {} + reserved {} + previous-version reservations {} - movements {} (sum of {}) = opening balance {:+}: {verdict}\n",
            o.product_id,
            o.quantity,
            o.reserved,
            o.legacy_held,
            o.movements_sum,
            o.movements,
            o.delta
        ));
    }
    out.push_str(&if results.is_empty() {
        "no product needs an opening balance\n".to_string()
    } else {
        format!("{} product(s) without a first movement\n", results.len())
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{MovementRow, OrderRow, ProductRow};
    use saga_core::domain::{OrderLine, OrderStatus};
    use saga_core::idempotency::{IdempotencyRecord, Status};

    fn product(id: &str, quantity: i64, reserved: i64) -> ProductRow {
        ProductRow {
            product_id: id.into(),
            quantity,
            reserved,
        }
    }

    fn movement(product: &str, id: &str, delta: i64, reason: &str) -> MovementRow {
        MovementRow {
            product_id: product.into(),
            movement_id: id.into(),
            delta,
            reason: reason.into(),
        }
    }

    /// A live reservation of the previous version: no outcome, a `StockReserved` result.
    fn legacy_reservation(order: &str, product: &str, units: u64) -> (OrderRow, IdempotencyRecord) {
        let record: IdempotencyRecord = serde_json::from_value(serde_json::json!({
            "id": format!("{order}#reserve"),
            "status": "COMPLETED",
            "payloadHash": "h",
            "expiresAt": 0,
            "result": serde_json::json!({"type": "StockReserved", "orderId": order}).to_string(),
        }))
        .expect("a record of the previous version");
        assert_eq!(record.status, Status::Completed);
        let order = OrderRow {
            order_id: order.into(),
            status: OrderStatus::Confirmed,
            items: vec![OrderLine {
                product_id: product.into(),
                quantity: units,
                unit_price_cents: 100,
            }],
            total_cents: 100 * units,
            created_at_ms: 0,
        };
        (order, record)
    }

    #[test]
    fn an_old_product_gets_its_stock_reservations_and_old_holds_less_its_adjustments() {
        let (order, record) = legacy_reservation("o-1", "old", 2);
        let snapshot = Snapshot {
            products: vec![product("old", 5, 1), product("new", 9, 0)],
            movements: vec![
                movement("old", "001#a", 3, "restock"),
                movement("new", "001#b", 10, saga_core::domain::INITIAL_STOCK_REASON),
            ],
            orders: vec![order],
            steps: vec![record],
            ..Snapshot::default()
        };
        let plan = plan(&snapshot);
        assert_eq!(plan.keys().collect::<Vec<_>>(), ["old"], "{plan:?}");
        let o = &plan["old"];
        assert_eq!((o.legacy_held, o.movements_sum), (2, 3));
        assert_eq!(o.delta, 5 + 1 + 2 - 3);
    }

    #[test]
    fn a_product_with_an_opening_balance_or_nothing_to_explain_gets_none() {
        let snapshot = Snapshot {
            products: vec![product("done", 4, 0), product("empty", 0, 0)],
            movements: vec![movement("done", OPENING_MOVEMENT_ID, 1, OPENING_REASON)],
            ..Snapshot::default()
        };
        assert!(plan(&snapshot).is_empty());
    }

    #[test]
    fn only_openings_both_reads_agree_on_and_never_negative_ones_are_written() {
        let snapshot = |q: i64| Snapshot {
            products: vec![
                product("same", 5, 0),
                product("moved", q, 0),
                product("odd", 1, 0),
            ],
            movements: vec![movement("odd", "001#a", 4, "restock")],
            ..Snapshot::default()
        };
        let decided = decide(&plan(&snapshot(7)), &plan(&snapshot(6)));
        let by: BTreeMap<_, _> = decided
            .iter()
            .map(|(o, outcome)| (o.product_id.as_str(), *outcome))
            .collect();
        assert_eq!(by["same"], None);
        assert_eq!(by["moved"], Some(Outcome::Changed));
        assert_eq!(by["odd"], Some(Outcome::Refused));
    }

    #[test]
    fn the_opening_id_sorts_before_every_movement() {
        let first = saga_core::domain::movement_id(0);
        assert!(OPENING_MOVEMENT_ID < first.as_str(), "{first}");
    }
}
