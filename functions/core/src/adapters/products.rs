//! The products table (a product's name, price, version and stock) and the stock movements
//! table (every change of a product's stock outside the saga, with who, when and why).
//!
//! No write here reads first to decide: creation is a put conditional on the product being
//! absent, a name and price change an update conditional on its existence (and version), and
//! a stock adjustment a transaction conditional on the quantity its caller read.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    CancellationReason, KeysAndAttributes, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update,
};
use serde::Deserialize;
use std::collections::HashMap;

use super::dynamo::{self, StoreError, s, un};
use crate::domain::{Product, StockMovement};
use crate::idempotency::dynamo::{DynamoIdempotency, existing_from_reason};
use crate::ports::{Adjusted, Adjustment, Created, Expected, Products, Updated};

#[derive(Clone, Debug)]
pub struct DynamoProducts {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// The stock movements table (creation and adjustments write to it).
    movements_table: Option<String>,
    /// Where an adjustment's idempotency record goes, in the same transaction.
    idempotency: Option<DynamoIdempotency>,
}

/// How many times unprocessed keys of a batch read are retried before giving up.
const BATCH_GET_ATTEMPTS: u32 = 5;

/// The projection a price lookup reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Price {
    product_id: String,
    price_cents: u64,
}

fn code_of(reason: Option<&CancellationReason>) -> Option<&str> {
    reason.and_then(|r| r.code.as_deref())
}

impl DynamoProducts {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            movements_table: None,
            idempotency: None,
        }
    }

    /// Where [`Products::create_product`] and [`Products::adjust`] record movements.
    pub fn with_movements(mut self, table: impl Into<String>) -> Self {
        self.movements_table = Some(table.into());
        self
    }

    /// Where [`Products::adjust`] puts the idempotency records of requests with a key.
    pub fn with_idempotency(mut self, idempotency: DynamoIdempotency) -> Self {
        self.idempotency = Some(idempotency);
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The put of a movement (its id is new: never overwrites one).
    fn movement_put(&self, movement: &StockMovement) -> Result<Put, StoreError> {
        let table = self.movements_table.as_ref().ok_or(StoreError::Corrupt(
            "the products adapter has no stock movements table".into(),
        ))?;
        Ok(Put::builder()
            .table_name(table)
            .set_item(Some(dynamo::to_item(movement)?))
            .condition_expression("attribute_not_exists(movementId)")
            .build()
            .expect("table, item and condition are set"))
    }
}

impl Products for DynamoProducts {
    /// One transaction: the product, put only if absent, and its first movement.
    async fn create_product(
        &self,
        product: &Product,
        first: &StockMovement,
    ) -> Result<Created, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(dynamo::to_item(product)?))
            .condition_expression("attribute_not_exists(productId)")
            .build()
            .expect("table, item and condition are set");
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(
                TransactWriteItem::builder()
                    .put(self.movement_put(first)?)
                    .build(),
            )
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(Created::Created(product.clone())),
            Err(err) => err.into_service_error(),
        };
        if let TransactWriteItemsError::TransactionCanceledException(e) = &err {
            let reasons = e.cancellation_reasons();
            if code_of(reasons.first()) == Some("ConditionalCheckFailed") {
                return Ok(Created::Exists);
            }
            if reasons
                .iter()
                .any(|r| r.code.as_deref() == Some("TransactionConflict"))
            {
                return Ok(Created::Conflict);
            }
        }
        Err(StoreError::sdk("create_product", err))
    }

    /// One `UpdateItem`: `SET name, priceCents, version = version + 1`, conditional on the
    /// product existing (and on its version, for `If-Match`). The new item comes back
    /// (`ALL_NEW`); on a failed condition, the old one (`ALL_OLD`) tells absent from stale.
    async fn update(
        &self,
        product_id: &str,
        name: &str,
        price_cents: u64,
        expected: Option<&Expected>,
    ) -> Result<Updated, StoreError> {
        let mut condition = "attribute_exists(productId)".to_string();
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("productId", s(product_id))
            // A product written before versions existed has none: it counts as version 0.
            .update_expression(
                "SET #name = :name, priceCents = :price, #version = if_not_exists(#version, :zero) + :one",
            )
            .expression_attribute_names("#name", "name")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":name", s(name))
            .expression_attribute_values(":price", un(price_cents))
            .expression_attribute_values(":zero", un(0))
            .expression_attribute_values(":one", un(1));
        if let Some(Expected::Versions(versions)) = expected {
            let names: Vec<String> = (0..versions.len()).map(|i| format!(":v{i}")).collect();
            let mut accepted = format!("#version IN ({})", names.join(", "));
            if versions.contains(&0) {
                accepted.push_str(" OR attribute_not_exists(#version)");
            }
            condition.push_str(&format!(" AND ({accepted})"));
            for (name, version) in names.into_iter().zip(versions) {
                request = request.expression_attribute_values(name, un(*version));
            }
        }
        let result = request
            .condition_expression(condition)
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out.attributes.ok_or(StoreError::Corrupt(
                    "an applied update returned no item".into(),
                ))?;
                Ok(Updated::Updated(dynamo::from_item(item)?))
            }
            Err(err) => match err.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(e) => match e.item {
                    Some(item) => Ok(Updated::VersionMismatch(dynamo::from_item(item)?)),
                    None => Ok(Updated::NotFound),
                },
                other => Err(StoreError::sdk("update_product", other)),
            },
        }
    }

    /// One transaction: the quantity set from the one seen (`quantity = :seen`, and never
    /// below zero), the movement put, and the idempotency record put (if the request has a
    /// key). `TransactWriteItems` returns no values, so the quantity after is the caller's
    /// `seen + delta`, exact because of the condition.
    async fn adjust(
        &self,
        adjustment: &Adjustment<'_>,
        now_ms: i64,
    ) -> Result<Adjusted, StoreError> {
        let movement = adjustment.movement;
        let mut condition = "quantity = :seen".to_string();
        let mut update = Update::builder()
            .table_name(&self.table)
            .key("productId", s(&movement.product_id))
            .update_expression("SET quantity = :after")
            .expression_attribute_values(":seen", un(adjustment.seen))
            .expression_attribute_values(":after", un(movement.quantity_after));
        if movement.delta < 0 {
            condition.push_str(" AND quantity >= :minusDelta");
            update = update
                .expression_attribute_values(":minusDelta", un(movement.delta.unsigned_abs()));
        }
        let update = update
            .condition_expression(condition)
            .build()
            .expect("table, key and expressions are set");
        let mut request = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(update).build())
            .transact_items(
                TransactWriteItem::builder()
                    .put(self.movement_put(movement)?)
                    .build(),
            );
        if let Some(done) = adjustment.done {
            let idempotency = self.idempotency.as_ref().ok_or(StoreError::Corrupt(
                "the products adapter has no idempotency table".into(),
            ))?;
            request = request.transact_items(
                TransactWriteItem::builder()
                    .put(idempotency.completed_put(done, now_ms)?)
                    .build(),
            );
        }
        let err = match request.send().await {
            Ok(_) => return Ok(Adjusted::Applied),
            Err(err) => err.into_service_error(),
        };
        if let TransactWriteItemsError::TransactionCanceledException(e) = &err {
            let reasons = e.cancellation_reasons();
            // A duplicate first: whatever else failed, the key's record answers the request.
            if let Some(key) = reasons
                .get(2)
                .filter(|r| r.code.as_deref() == Some("ConditionalCheckFailed"))
            {
                return Ok(Adjusted::KeyTaken(existing_from_reason(key)?));
            }
            if code_of(reasons.first()) == Some("ConditionalCheckFailed") {
                return Ok(Adjusted::StockMoved);
            }
            if reasons
                .iter()
                .any(|r| r.code.as_deref() == Some("TransactionConflict"))
            {
                return Ok(Adjusted::Conflict);
            }
        }
        Err(StoreError::sdk("adjust_stock", err))
    }

    async fn get(&self, product_id: &str) -> Result<Option<Product>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("productId", s(product_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::sdk("get_product", e.into_service_error()))?;
        out.item.map(dynamo::from_item).transpose()
    }

    /// Current prices of the given products, in one `BatchGetItem` (plus retries of any
    /// unprocessed keys). Unknown products are absent from the map.
    async fn prices(&self, product_ids: &[&str]) -> Result<HashMap<String, u64>, StoreError> {
        let keys = product_ids
            .iter()
            .map(|id| HashMap::from([("productId".to_string(), s(*id))]))
            .collect::<Vec<_>>();
        let mut request = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .projection_expression("productId, priceCents")
                .consistent_read(true)
                .build()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
        let mut prices = HashMap::new();
        for attempt in 0..BATCH_GET_ATTEMPTS {
            let Some(keys) = request.take() else { break };
            if attempt > 0 {
                dynamo::conflict_backoff(attempt).await;
            }
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, keys)
                .send()
                .await
                .map_err(|e| StoreError::sdk("batch_get_prices", e.into_service_error()))?;
            for item in out
                .responses
                .and_then(|mut r| r.remove(&self.table))
                .unwrap_or_default()
            {
                let price: Price = dynamo::from_item(item)?;
                prices.insert(price.product_id, price.price_cents);
            }
            request = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .filter(|k| !k.keys.is_empty());
        }
        if request.is_some() {
            return Err(StoreError::Sdk {
                op: "batch_get_prices",
                code: "UnprocessedKeys".into(),
                message: "DynamoDB left keys unprocessed after retries".into(),
            });
        }
        Ok(prices)
    }
}
