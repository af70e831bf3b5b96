//! The orders table: placement, lookup, and the coordinator's conditional updates.
//!
//! Each saga fact is one `UpdateItem` whose condition is [`crate::saga::Fact::precondition`]
//! and whose effect is [`crate::saga::apply`]; when the condition fails, DynamoDB hands back
//! the current order (`ALL_OLD`), so a duplicate or late fact costs no extra read.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use std::collections::HashMap;

use super::dynamo::{self, s, Item, StoreError};
use crate::domain::{CancelReason, Order};
use crate::saga::Fact;

#[derive(Clone, Debug)]
pub struct OrderStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

/// Why an order and its companion record were not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The companion record's condition failed: here is the record that stands (ALL_OLD).
    #[error("the companion record already exists")]
    OtherRecordExists(aws_sdk_dynamodb::types::CancellationReason),
    /// Another transaction on the same items was in flight (a concurrent duplicate).
    #[error("a concurrent transaction touched the same items")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The result of a conditional update on an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The update was applied; the order as it is now.
    Applied(Order),
    /// The condition did not hold; the order as it is (unchanged).
    NotApplicable(Order),
    /// There is no such order.
    NotFound,
}

impl Update {
    pub fn order(&self) -> Option<&Order> {
        match self {
            Update::Applied(o) | Update::NotApplicable(o) => Some(o),
            Update::NotFound => None,
        }
    }
}

/// A fact with the data it carries onto the order.
#[derive(Clone, Debug)]
pub struct FactUpdate {
    pub fact: Fact,
    pub payment_id: Option<String>,
    pub cancel_detail: Option<String>,
    pub cancel_product_id: Option<String>,
    /// For [`Fact::TimedOut`]: only orders created before this instant are cancelled.
    pub cutoff_ms: Option<i64>,
}

impl FactUpdate {
    pub fn new(fact: Fact) -> Self {
        Self {
            fact,
            payment_id: None,
            cancel_detail: None,
            cancel_product_id: None,
            cutoff_ms: None,
        }
    }
}

/// An update expression under construction.
struct Expr {
    set: Vec<String>,
    remove: Vec<&'static str>,
    condition: Vec<String>,
    values: HashMap<String, AttributeValue>,
}

impl Expr {
    fn new(now_ms: i64) -> Self {
        let mut e = Self {
            set: vec!["updatedAt = :now".into()],
            remove: vec![],
            condition: vec![],
            values: HashMap::new(),
        };
        e.values
            .insert(":now".into(), s(crate::time::rfc3339(now_ms)));
        e
    }

    fn value(&mut self, name: &str, v: AttributeValue) -> &mut Self {
        self.values.insert(name.into(), v);
        self
    }

    fn set(&mut self, clause: impl Into<String>) -> &mut Self {
        self.set.push(clause.into());
        self
    }

    fn when(&mut self, clause: impl Into<String>) -> &mut Self {
        self.condition.push(clause.into());
        self
    }

    fn cancel(&mut self, reason: CancelReason, detail: Option<&str>, product: Option<&str>) {
        self.set("#status = :cancelled")
            .set("cancelReason = :reason")
            .value(":cancelled", s("CANCELLED"))
            .value(":reason", s(reason.as_str()));
        if let Some(detail) = detail {
            self.set("cancelDetail = :detail")
                .value(":detail", s(detail));
        }
        if let Some(product) = product {
            self.set("cancelProductId = :product")
                .value(":product", s(product));
        }
        self.remove.push("pendingSweep");
        self.when("#status = :pendingStatus")
            .value(":pendingStatus", s("PENDING"));
    }
}

impl OrderStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The conditional put that creates an order (never overwrites one).
    pub fn create_put(&self, order: &Order) -> Result<Put, StoreError> {
        Ok(Put::builder()
            .table_name(&self.table)
            .set_item(Some(dynamo::to_item(order)?))
            .condition_expression("attribute_not_exists(orderId)")
            .build()
            .expect("table and item are set"))
    }

    pub async fn create(&self, order: &Order) -> Result<(), StoreError> {
        let put = self.create_put(order)?;
        self.client
            .put_item()
            .table_name(put.table_name)
            .set_item(Some(put.item))
            .set_condition_expression(put.condition_expression)
            .send()
            .await
            .map_err(|e| StoreError::sdk("create_order", e.into_service_error()))?;
        Ok(())
    }

    /// Creates the order and another record (an idempotency claim) in one transaction.
    pub async fn create_with(&self, order: &Order, other: Put) -> Result<(), CreateError> {
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(other).build())
            .transact_items(
                TransactWriteItem::builder()
                    .put(self.create_put(order)?)
                    .build(),
            )
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(()),
            Err(err) => err.into_service_error(),
        };
        if let TransactWriteItemsError::TransactionCanceledException(e) = &err {
            let reasons = e.cancellation_reasons.clone().unwrap_or_default();
            let code = |i: usize| reasons.get(i).and_then(|r| r.code.as_deref());
            if code(0) == Some("ConditionalCheckFailed") {
                return Err(CreateError::OtherRecordExists(reasons[0].clone()));
            }
            if reasons
                .iter()
                .any(|r| r.code.as_deref() == Some("TransactionConflict"))
            {
                return Err(CreateError::Conflict);
            }
        }
        Err(CreateError::Store(StoreError::sdk(
            "create_order_with_claim",
            err,
        )))
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<Order>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("orderId", s(order_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::sdk("get_order", e.into_service_error()))?;
        out.item.map(dynamo::from_item).transpose()
    }

    /// Applies a saga fact: one conditional update (two for a failure that arrives after the
    /// order was already cancelled for another reason).
    pub async fn apply(
        &self,
        order_id: &str,
        update: &FactUpdate,
        now_ms: i64,
    ) -> Result<Update, StoreError> {
        let mut e = Expr::new(now_ms);
        let cancels = match &update.fact {
            Fact::StockReserved => {
                e.set("stockStatus = :to").value(":to", s("RESERVED"));
                e.when("stockStatus = :from").value(":from", s("PENDING"));
                None
            }
            Fact::StockRejected(reason) => {
                e.set("stockStatus = :to").value(":to", s("REJECTED"));
                e.when("stockStatus = :from").value(":from", s("PENDING"));
                Some(*reason)
            }
            Fact::StockReleased => {
                e.set("stockStatus = :to").value(":to", s("RELEASED"));
                e.when("stockStatus = :from").value(":from", s("RESERVED"));
                None
            }
            Fact::PaymentCharged => {
                e.set("paymentStatus = :to").value(":to", s("CHARGED"));
                e.when("paymentStatus = :from").value(":from", s("PENDING"));
                if let Some(id) = &update.payment_id {
                    e.set("paymentId = :paymentId").value(":paymentId", s(id));
                }
                None
            }
            Fact::PaymentDeclined => {
                e.set("paymentStatus = :to").value(":to", s("DECLINED"));
                e.when("paymentStatus = :from").value(":from", s("PENDING"));
                Some(CancelReason::PaymentDeclined)
            }
            Fact::PaymentRefunded => {
                e.set("paymentStatus = :to").value(":to", s("REFUNDED"));
                e.when("paymentStatus = :from").value(":from", s("CHARGED"));
                None
            }
            Fact::TimedOut => {
                e.cancel(CancelReason::Timeout, update.cancel_detail.as_deref(), None);
                e.when("createdAtMs < :cutoff")
                    .value(":cutoff", dynamo::n(update.cutoff_ms.unwrap_or(i64::MIN)));
                e.when("NOT (stockStatus = :reserved AND paymentStatus = :charged)")
                    .value(":reserved", s("RESERVED"))
                    .value(":charged", s("CHARGED"));
                return self.update(order_id, e, "timeout_order").await;
            }
        };
        let Some(reason) = cancels else {
            return self.update(order_id, e, "apply_fact").await;
        };
        // A failure cancels the order if it is still pending; if it is not (already cancelled
        // for another reason, or a late failure), only the step's own status is recorded.
        let plain = Expr {
            set: e.set.clone(),
            remove: e.remove.clone(),
            condition: e.condition.clone(),
            values: e.values.clone(),
        };
        e.cancel(
            reason,
            update.cancel_detail.as_deref(),
            update.cancel_product_id.as_deref(),
        );
        match self.update(order_id, e, "apply_failure").await? {
            Update::NotApplicable(current) if update.fact.precondition(&current.saga_state()) => {
                self.update(order_id, plain, "apply_late_failure").await
            }
            other => Ok(other),
        }
    }

    /// Confirms an order whose stock is reserved and payment charged, if it is still pending.
    pub async fn confirm(&self, order_id: &str, now_ms: i64) -> Result<Update, StoreError> {
        let mut e = Expr::new(now_ms);
        e.set("#status = :confirmed")
            .value(":confirmed", s("CONFIRMED"));
        e.remove.push("pendingSweep");
        e.when("#status = :pendingStatus")
            .value(":pendingStatus", s("PENDING"));
        e.when("stockStatus = :reserved AND paymentStatus = :charged")
            .value(":reserved", s("RESERVED"))
            .value(":charged", s("CHARGED"));
        self.update(order_id, e, "confirm_order").await
    }

    async fn update(
        &self,
        order_id: &str,
        e: Expr,
        op: &'static str,
    ) -> Result<Update, StoreError> {
        let mut expression = format!("SET {}", e.set.join(", "));
        if !e.remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", e.remove.join(", ")));
        }
        // `attribute_exists` keeps an update from creating an order that does not exist.
        let condition = std::iter::once("attribute_exists(orderId)".to_string())
            .chain(e.condition.iter().map(|c| format!("({c})")))
            .collect::<Vec<_>>()
            .join(" AND ");
        let uses_status = expression.contains("#status") || condition.contains("#status");
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("orderId", s(order_id))
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_values(Some(e.values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if uses_status {
            // `status` is a DynamoDB reserved word.
            request = request.expression_attribute_names("#status", "status");
        }
        match request.send().await {
            Ok(out) => Ok(Update::Applied(dynamo::from_item(out.attributes.ok_or(
                StoreError::Corrupt("update returned no attributes".into()),
            )?)?)),
            Err(err) => match err.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(e) => match e.item {
                    Some(item) if !item.is_empty() => {
                        Ok(Update::NotApplicable(dynamo::from_item(item)?))
                    }
                    _ => Ok(Update::NotFound),
                },
                other => Err(StoreError::sdk(op, other)),
            },
        }
    }

    /// Ids of orders still pending that were created before `cutoff_ms`, oldest first, from the
    /// sparse pending-orders index (a query, never a scan). At most `limit` ids.
    pub async fn pending_before(
        &self,
        index: &str,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .key_condition_expression("pendingSweep = :pending AND createdAtMs < :cutoff")
                .expression_attribute_values(":pending", s(crate::domain::PENDING_SWEEP))
                .expression_attribute_values(":cutoff", dynamo::n(cutoff_ms))
                .set_exclusive_start_key(start.take())
                .limit((limit - ids.len()).min(1000) as i32)
                .send()
                .await
                .map_err(|e| StoreError::sdk("query_pending", e.into_service_error()))?;
            for item in out.items.unwrap_or_default() {
                ids.push(dynamo::get_s(&item, "orderId")?);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() && ids.len() < limit => start = Some(key),
                _ => return Ok(ids),
            }
        }
    }
}

impl Order {
    pub fn saga_state(&self) -> crate::saga::SagaState {
        crate::saga::SagaState {
            status: self.status,
            stock: self.stock_status,
            payment: self.payment_status,
            cancel_reason: self.cancel_reason,
        }
    }
}
