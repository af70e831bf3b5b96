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
use serde::Deserialize;
use std::collections::HashMap;

use super::dynamo::{self, Item, StoreError, s, to_value};
use crate::domain::{CancelReason, Order, OrderStatus, PaymentStatus, StockStatus};
use crate::idempotency::dynamo::{DynamoIdempotency, existing_from_reason};
use crate::idempotency::{Claim, ClaimRequest};
use crate::ports::{CreateError, FactUpdate, OrderCursor, OrderPage, Orders, Update};
use crate::saga::{Requires, Step};

#[derive(Clone, Debug)]
pub struct DynamoOrders {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// The sparse index of pending orders the sweeper queries.
    pending_index: Option<String>,
    /// The index of each customer's orders by creation time (`GET /orders`).
    customer_index: Option<String>,
    /// Where API idempotency claims go, in the same transaction as the order.
    idempotency: Option<DynamoIdempotency>,
}

/// An update expression under construction.
#[derive(Clone)]
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
        e.value(":now", s(crate::time::rfc3339(now_ms)));
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
        let clause = clause.into();
        if !self.condition.contains(&clause) {
            self.condition.push(clause);
        }
        self
    }

    /// The condition for a state the saga requires ([`Requires`]).
    fn requires(&mut self, r: Requires) -> &mut Self {
        match r {
            Requires::Stock(states) => {
                let names = self.list(":stock", states);
                self.when(format!("stockStatus IN ({names})"))
            }
            Requires::Payment(states) => {
                let names = self.list(":payment", states);
                self.when(format!("paymentStatus IN ({names})"))
            }
            Requires::NotCancelled => self
                .when("#status <> :cancelled")
                .value(":cancelled", to_value(&OrderStatus::Cancelled)),
            Requires::PendingIncomplete | Requires::PendingComplete => {
                self.when("#status = :pending")
                    .value(":pending", to_value(&OrderStatus::Pending))
                    .value(":reserved", to_value(&StockStatus::Reserved))
                    .value(":charged", to_value(&PaymentStatus::Charged));
                let both = "stockStatus = :reserved AND paymentStatus = :charged";
                if r == Requires::PendingComplete {
                    self.when(both)
                } else {
                    self.when(format!("NOT ({both})"))
                }
            }
        }
    }

    /// Values `{prefix}0`, `{prefix}1`, ... for `states`; their names, comma-separated.
    fn list<T: serde::Serialize>(&mut self, prefix: &str, states: &[T]) -> String {
        let names: Vec<String> = (0..states.len()).map(|i| format!("{prefix}{i}")).collect();
        for (name, state) in names.iter().zip(states) {
            self.value(name, to_value(state));
        }
        names.join(", ")
    }

    fn sets(&mut self, step: Step) -> &mut Self {
        match step {
            Step::Stock(to) => self.set("stockStatus = :to").value(":to", to_value(&to)),
            Step::Payment(to) => self.set("paymentStatus = :to").value(":to", to_value(&to)),
        }
    }

    /// Cancels the order if it is still pending (or, for a customer's cancellation, confirmed)
    /// and takes it out of the sweeper's pending partition. A customer's cancellation puts it
    /// in the cancelling partition instead, until the coordinator has sent its compensations.
    fn cancel(&mut self, reason: CancelReason, detail: Option<&str>, product: Option<&str>) {
        if reason == CancelReason::CustomerCancelled {
            self.set("#status = :cancelled")
                .set("cancelReason = :reason")
                .set("pendingSweep = :cancelling")
                .value(":cancelled", to_value(&OrderStatus::Cancelled))
                .value(":reason", to_value(&reason))
                .value(":cancelling", s(crate::domain::CANCELLING_SWEEP));
            if let Some(detail) = detail {
                self.set("cancelDetail = :detail")
                    .value(":detail", s(detail));
            }
            self.when("#status IN (:pending, :confirmed)")
                .value(":pending", to_value(&OrderStatus::Pending))
                .value(":confirmed", to_value(&OrderStatus::Confirmed));
            return;
        }
        self.set("#status = :cancelled")
            .set("cancelReason = :reason")
            .value(":cancelled", to_value(&OrderStatus::Cancelled))
            .value(":reason", to_value(&reason));
        if let Some(detail) = detail {
            self.set("cancelDetail = :detail")
                .value(":detail", s(detail));
        }
        if let Some(product) = product {
            self.set("cancelProductId = :product")
                .value(":product", s(product));
        }
        self.remove.push("pendingSweep");
        self.when("#status = :pending")
            .value(":pending", to_value(&OrderStatus::Pending));
    }
}

/// An order id from the pending index (keys only).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderKey {
    order_id: String,
}

impl DynamoOrders {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            pending_index: None,
            customer_index: None,
            idempotency: None,
        }
    }

    /// The index [`Orders::pending_before`] queries.
    pub fn with_pending_index(mut self, index: impl Into<String>) -> Self {
        self.pending_index = Some(index.into());
        self
    }

    /// The index [`Orders::customer_orders`] queries.
    pub fn with_customer_index(mut self, index: impl Into<String>) -> Self {
        self.customer_index = Some(index.into());
        self
    }

    /// Where [`Orders::create_claimed`] puts its claims.
    pub fn with_idempotency(mut self, idempotency: DynamoIdempotency) -> Self {
        self.idempotency = Some(idempotency);
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The conditional put that creates an order (never overwrites one).
    fn create_put(&self, order: &Order) -> Result<Put, StoreError> {
        Ok(Put::builder()
            .table_name(&self.table)
            .set_item(Some(dynamo::to_item(order)?))
            .condition_expression("attribute_not_exists(orderId)")
            .build()
            .expect("table and item are set"))
    }
}

impl Orders for DynamoOrders {
    async fn create(&self, order: &Order) -> Result<(), StoreError> {
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

    async fn create_claimed(
        &self,
        order: &Order,
        claim: &ClaimRequest<'_>,
        now_ms: i64,
    ) -> Result<Claim, CreateError> {
        let idempotency = self.idempotency.as_ref().ok_or(StoreError::Corrupt(
            "the orders adapter has no idempotency table".into(),
        ))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .put(idempotency.claim_put(claim, now_ms)?)
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .put(self.create_put(order)?)
                    .build(),
            )
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(Claim::Acquired),
            Err(err) => err.into_service_error(),
        };
        if let TransactWriteItemsError::TransactionCanceledException(e) = &err {
            let reasons = e.cancellation_reasons.clone().unwrap_or_default();
            if let Some(first) = reasons
                .first()
                .filter(|r| r.code.as_deref() == Some("ConditionalCheckFailed"))
            {
                return Ok(Claim::Existing(existing_from_reason(first)?));
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

    async fn get(&self, order_id: &str) -> Result<Option<Order>, StoreError> {
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

    async fn customer_orders(
        &self,
        customer_id: &str,
        limit: usize,
        after: Option<&OrderCursor>,
    ) -> Result<OrderPage, StoreError> {
        let index = self.customer_index.as_deref().ok_or(StoreError::Corrupt(
            "the orders adapter has no customer-orders index".into(),
        ))?;
        // The index key of the last order seen: its partition and sort key, and the table's key.
        let mut start = after.map(|a| {
            HashMap::from([
                ("customerId".to_string(), s(customer_id)),
                ("createdAtMs".to_string(), dynamo::n(a.created_at_ms)),
                ("orderId".to_string(), s(&a.order_id)),
            ])
        });
        // One more than asked: whether it comes tells if another page follows, so the last
        // page never promises one that turns out empty.
        let want = limit + 1;
        let mut orders = Vec::with_capacity(want);
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .key_condition_expression("customerId = :customer")
                .expression_attribute_values(":customer", s(customer_id))
                .scan_index_forward(false)
                .set_exclusive_start_key(start.take())
                .limit((want - orders.len()) as i32)
                .send()
                .await
                .map_err(|e| StoreError::sdk("query_customer_orders", e.into_service_error()))?;
            for item in out.items.unwrap_or_default() {
                orders.push(dynamo::from_item::<Order>(item)?);
            }
            // A page of a query may stop short of its limit (1 MB); go on from where it stopped.
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() && orders.len() < want => start = Some(key),
                _ => break,
            }
        }
        let more = orders.len() > limit;
        orders.truncate(limit);
        Ok(OrderPage {
            next: more.then(|| orders.last().map(OrderCursor::of)).flatten(),
            orders,
        })
    }

    async fn apply(
        &self,
        order_id: &str,
        update: &FactUpdate,
        now_ms: i64,
    ) -> Result<Update, StoreError> {
        let t = update.fact.transition();
        let mut e = Expr::new(now_ms);
        e.requires(t.requires);
        if let Some(step) = t.sets {
            e.sets(step);
        }
        if let Some(id) = &update.payment_id {
            e.set("paymentId = :paymentId").value(":paymentId", s(id));
        }
        if let Some(cutoff) = update.cutoff_ms {
            e.when("createdAtMs < :cutoff")
                .value(":cutoff", dynamo::n(cutoff));
        }
        if let Some(customer) = &update.customer_id {
            e.when("customerId = :customer")
                .value(":customer", s(customer));
        }
        let Some(reason) = t.cancels else {
            return self.update(order_id, e, "apply_fact").await;
        };
        // A failure cancels the order if it is still pending; if it is not (already cancelled
        // for another reason, or a late failure), only the step's own status is recorded.
        let plain = t.sets.map(|_| e.clone());
        e.cancel(
            reason,
            update.cancel_detail.as_deref(),
            update.cancel_product_id.as_deref(),
        );
        match (self.update(order_id, e, "apply_failure").await?, plain) {
            (Update::NotApplicable(current), Some(plain))
                if update.fact.precondition(&current.saga_state()) =>
            {
                self.update(order_id, plain, "apply_late_failure").await
            }
            (other, _) => Ok(other),
        }
    }

    async fn confirm(&self, order_id: &str, now_ms: i64) -> Result<Update, StoreError> {
        let mut e = Expr::new(now_ms);
        e.set("#status = :confirmed")
            .value(":confirmed", to_value(&OrderStatus::Confirmed));
        e.remove.push("pendingSweep");
        e.requires(Requires::PendingComplete);
        self.update(order_id, e, "confirm_order").await
    }

    async fn compensations_sent(&self, order_id: &str, now_ms: i64) -> Result<Update, StoreError> {
        let mut e = Expr::new(now_ms);
        e.remove.push("pendingSweep");
        e.when("pendingSweep = :cancelling")
            .value(":cancelling", s(crate::domain::CANCELLING_SWEEP));
        self.update(order_id, e, "compensations_sent").await
    }

    async fn pending_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.swept(crate::domain::PENDING_SWEEP, cutoff_ms, limit)
            .await
    }

    async fn cancelling(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.swept(crate::domain::CANCELLING_SWEEP, i64::MAX, limit)
            .await
    }
}

impl DynamoOrders {
    /// Ids of the orders in one partition of the sweeper's sparse index, created before
    /// `cutoff_ms`, oldest first; at most `limit`.
    async fn swept(
        &self,
        partition: &str,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let index = self.pending_index.as_deref().ok_or(StoreError::Corrupt(
            "the orders adapter has no pending-orders index".into(),
        ))?;
        if limit == 0 {
            // A query's Limit must be at least 1.
            return Ok(Vec::new());
        }
        let mut ids = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .key_condition_expression("pendingSweep = :partition AND createdAtMs < :cutoff")
                .expression_attribute_values(":partition", s(partition))
                .expression_attribute_values(":cutoff", dynamo::n(cutoff_ms))
                .set_exclusive_start_key(start.take())
                .limit((limit - ids.len()).min(1000) as i32)
                .send()
                .await
                .map_err(|e| StoreError::sdk("query_swept", e.into_service_error()))?;
            for item in out.items.unwrap_or_default() {
                ids.push(dynamo::from_item::<OrderKey>(item)?.order_id);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() && ids.len() < limit => start = Some(key),
                _ => return Ok(ids),
            }
        }
    }
}

impl DynamoOrders {
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
}
