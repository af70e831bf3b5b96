//! In-memory adapters of every port, for the handlers' unit tests.
//!
//! They keep the conditions the DynamoDB adapters write as expressions: an order is created
//! once, a reservation takes every line or none (`quantity >= n`), a key is taken once, a
//! failure cancels only a pending order, a timeout needs the cut-off. Those expressions
//! themselves are proven against DynamoDB Local by the integration tests under `tests/`; these
//! adapters only let the handlers' own logic be tested in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::dynamo::StoreError;
use super::payment::{
    ChargeOutcome, ChargeRequest, ProviderError, RefundOutcome, RefundRequest, TOKEN_DECLINED,
};
use super::sqs::PublishError;
use crate::domain::{CancelReason, Order, OrderStatus, Product, StockLine, StockMovement};
use crate::idempotency::{
    Claim, ClaimRequest, Completed, Idempotency, IdempotencyRecord, Outcome, Status, StepKey,
};
use crate::messages::StockRejection;
use crate::ports::{
    Adjusted, Adjustment, CreateError, Created, Expected, FactUpdate, OrderCursor, OrderPage,
    Orders, PaymentProvider, Products, Publish, ReleaseOutcome, ReserveOutcome, Stock, Update,
    Updated,
};
use crate::saga::Requires;

/// The tables: orders, products and idempotency records, shared by every clone.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<Tables>>,
}

#[derive(Debug, Default)]
struct Tables {
    orders: BTreeMap<String, Order>,
    products: BTreeMap<String, Product>,
    records: HashMap<String, IdempotencyRecord>,
    movements: Vec<StockMovement>,
    /// Adjustments still to be raced: each of the next ones finds one unit taken by an order
    /// between its read and its write.
    raced_adjustments: usize,
}

fn failed(op: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Sdk {
        op,
        code: "ConditionalCheckFailedException".into(),
        message: message.into(),
    }
}

impl MemoryStore {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.state.lock().expect("not poisoned")
    }

    /// A product as the tests set it up.
    pub fn add_product(&self, id: &str, price_cents: u64, quantity: u64) {
        self.tables().products.insert(
            id.into(),
            Product {
                product_id: id.into(),
                name: id.into(),
                price_cents,
                quantity,
                reserved: 0,
                version: 1,
            },
        );
    }

    pub fn reserved(&self, product_id: &str) -> Option<u64> {
        self.tables().products.get(product_id).map(|p| p.reserved)
    }

    pub fn product(&self, product_id: &str) -> Option<Product> {
        self.tables().products.get(product_id).cloned()
    }

    /// The stock movements of a product, oldest first.
    pub fn movements(&self, product_id: &str) -> Vec<StockMovement> {
        let mut movements: Vec<StockMovement> = (self.tables().movements.iter())
            .filter(|m| m.product_id == product_id)
            .cloned()
            .collect();
        movements.sort_by(|a, b| a.movement_id.cmp(&b.movement_id));
        movements
    }

    /// Makes each of the next `n` stock adjustments lose a race: an order takes one unit of
    /// the product between the adjustment's read and its write.
    pub fn race_next_adjustments(&self, n: usize) {
        self.tables().raced_adjustments = n;
    }

    pub fn quantity(&self, product_id: &str) -> Option<u64> {
        self.tables().products.get(product_id).map(|p| p.quantity)
    }

    pub fn order(&self, order_id: &str) -> Option<Order> {
        self.tables().orders.get(order_id).cloned()
    }

    pub fn orders(&self) -> Vec<Order> {
        self.tables().orders.values().cloned().collect()
    }

    pub fn insert_order(&self, order: Order) {
        self.tables().orders.insert(order.order_id.clone(), order);
    }

    pub fn record(&self, key: StepKey<'_>) -> Option<IdempotencyRecord> {
        self.tables().records.get(&key.to_string()).cloned()
    }

    /// Puts a record as it stands, e.g. as an earlier version wrote it.
    pub fn insert_record(&self, record: IdempotencyRecord) {
        self.tables().records.insert(record.id.clone(), record);
    }
}

impl Tables {
    /// The key's record, unless it outlived its TTL (the `KEY_FREE` condition).
    fn live_record(&self, key: &str, now_ms: i64) -> Option<&IdempotencyRecord> {
        self.records.get(key).filter(|r| !r.expired(now_ms))
    }
}

impl Orders for MemoryStore {
    async fn create(&self, order: &Order) -> Result<(), StoreError> {
        let mut t = self.tables();
        if t.orders.contains_key(&order.order_id) {
            return Err(failed("create_order", "the order exists"));
        }
        t.orders.insert(order.order_id.clone(), order.clone());
        Ok(())
    }

    async fn create_claimed(
        &self,
        order: &Order,
        claim: &ClaimRequest<'_>,
        now_ms: i64,
    ) -> Result<Claim, CreateError> {
        let mut t = self.tables();
        let key = claim.key.to_string();
        if let Some(existing) = t.records.get(&key) {
            if !claim.may_replace(existing, now_ms) {
                return Ok(Claim::Existing(existing.clone()));
            }
        }
        if t.orders.contains_key(&order.order_id) {
            return Err(failed("create_order_with_claim", "the order exists").into());
        }
        t.records
            .insert(key, IdempotencyRecord::claimed(claim, now_ms));
        t.orders.insert(order.order_id.clone(), order.clone());
        Ok(Claim::Acquired)
    }

    async fn get(&self, order_id: &str) -> Result<Option<Order>, StoreError> {
        Ok(self.order(order_id))
    }

    async fn customer_orders(
        &self,
        customer_id: &str,
        limit: usize,
        after: Option<&OrderCursor>,
    ) -> Result<OrderPage, StoreError> {
        // The index's order: creation time, then order id, newest first.
        let position = |o: &Order| (o.created_at_ms, o.order_id.clone());
        let mut mine: Vec<Order> = (self.tables().orders.values())
            .filter(|o| o.customer_id == customer_id)
            .filter(|o| after.is_none_or(|a| position(o) < (a.created_at_ms, a.order_id.clone())))
            .cloned()
            .collect();
        mine.sort_by_key(|o| std::cmp::Reverse(position(o)));
        let more = mine.len() > limit;
        mine.truncate(limit);
        Ok(OrderPage {
            next: more.then(|| mine.last().map(OrderCursor::of)).flatten(),
            orders: mine,
        })
    }

    async fn apply(
        &self,
        order_id: &str,
        update: &FactUpdate,
        now_ms: i64,
    ) -> Result<Update, StoreError> {
        let mut t = self.tables();
        let Some(order) = t.orders.get_mut(order_id) else {
            return Ok(Update::NotFound);
        };
        if update
            .cutoff_ms
            .is_some_and(|cutoff| order.created_at_ms >= cutoff)
            || update
                .customer_id
                .as_ref()
                .is_some_and(|c| *c != order.customer_id)
        {
            return Ok(Update::NotApplicable(order.clone()));
        }
        let before = order.saga_state();
        let Some(next) = crate::saga::apply(&before, &update.fact) else {
            return Ok(Update::NotApplicable(order.clone()));
        };
        order.status = next.status;
        order.stock_status = next.stock;
        order.payment_status = next.payment;
        order.cancel_reason = next.cancel_reason;
        if let Some(id) = &update.payment_id {
            order.payment_id = Some(id.clone());
        }
        if before.status != OrderStatus::Cancelled && next.status == OrderStatus::Cancelled {
            order.cancel_detail = update.cancel_detail.clone();
            order.cancel_product_id = update.cancel_product_id.clone();
            order.pending_sweep = (next.cancel_reason == Some(CancelReason::CustomerCancelled))
                .then(|| crate::domain::CANCELLING_SWEEP.to_string());
        }
        order.updated_at = crate::time::rfc3339(now_ms);
        Ok(Update::Applied(order.clone()))
    }

    async fn confirm(&self, order_id: &str, now_ms: i64) -> Result<Update, StoreError> {
        let mut t = self.tables();
        let Some(order) = t.orders.get_mut(order_id) else {
            return Ok(Update::NotFound);
        };
        if !Requires::PendingComplete.holds(&order.saga_state()) {
            return Ok(Update::NotApplicable(order.clone()));
        }
        order.status = OrderStatus::Confirmed;
        order.pending_sweep = None;
        order.updated_at = crate::time::rfc3339(now_ms);
        Ok(Update::Applied(order.clone()))
    }

    async fn compensations_sent(&self, order_id: &str, now_ms: i64) -> Result<Update, StoreError> {
        let mut t = self.tables();
        let Some(order) = t.orders.get_mut(order_id) else {
            return Ok(Update::NotFound);
        };
        if order.pending_sweep.as_deref() != Some(crate::domain::CANCELLING_SWEEP) {
            return Ok(Update::NotApplicable(order.clone()));
        }
        order.pending_sweep = None;
        order.updated_at = crate::time::rfc3339(now_ms);
        Ok(Update::Applied(order.clone()))
    }

    async fn cancelling(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.swept(crate::domain::CANCELLING_SWEEP, i64::MAX, limit)
    }

    async fn pending_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.swept(crate::domain::PENDING_SWEEP, cutoff_ms, limit)
    }
}

impl MemoryStore {
    fn swept(
        &self,
        partition: &str,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let t = self.tables();
        let mut pending = t
            .orders
            .values()
            .filter(|o| {
                o.pending_sweep.as_deref() == Some(partition) && o.created_at_ms < cutoff_ms
            })
            .collect::<Vec<_>>();
        pending.sort_by_key(|o| o.created_at_ms);
        Ok(pending
            .into_iter()
            .take(limit)
            .map(|o| o.order_id.clone())
            .collect())
    }
}

impl Products for MemoryStore {
    async fn create_product(
        &self,
        product: &Product,
        first: &StockMovement,
    ) -> Result<Created, StoreError> {
        let mut t = self.tables();
        if t.products.contains_key(&product.product_id) {
            return Ok(Created::Exists);
        }
        t.products
            .insert(product.product_id.clone(), product.clone());
        t.movements.push(first.clone());
        Ok(Created::Created(product.clone()))
    }

    async fn update(
        &self,
        product_id: &str,
        name: &str,
        price_cents: u64,
        expected: Option<&Expected>,
    ) -> Result<Updated, StoreError> {
        let mut t = self.tables();
        let Some(product) = t.products.get_mut(product_id) else {
            return Ok(Updated::NotFound);
        };
        if expected.is_some_and(|e| !e.accepts(product.version)) {
            return Ok(Updated::VersionMismatch(product.clone()));
        }
        product.name = name.into();
        product.price_cents = price_cents;
        product.version += 1;
        Ok(Updated::Updated(product.clone()))
    }

    async fn adjust(
        &self,
        adjustment: &Adjustment<'_>,
        now_ms: i64,
    ) -> Result<Adjusted, StoreError> {
        let mut t = self.tables();
        let movement = adjustment.movement;
        if t.raced_adjustments > 0 {
            t.raced_adjustments -= 1;
            if let Some(p) = t.products.get_mut(&movement.product_id) {
                p.quantity = p.quantity.saturating_sub(1);
                p.reserved += 1;
            }
        }
        if let Some(done) = adjustment.done {
            if let Some(existing) = t.live_record(&done.key.to_string(), now_ms) {
                return Ok(Adjusted::KeyTaken(existing.clone()));
            }
        }
        let Some(product) = t.products.get_mut(&movement.product_id) else {
            return Ok(Adjusted::StockMoved);
        };
        // `quantity = :seen AND quantity >= :minusDelta`
        if product.quantity != adjustment.seen
            || (movement.delta < 0 && product.quantity < movement.delta.unsigned_abs())
        {
            return Ok(Adjusted::StockMoved);
        }
        product.quantity = movement.quantity_after;
        t.movements.push(movement.clone());
        if let Some(done) = adjustment.done {
            t.records.insert(
                done.key.to_string(),
                IdempotencyRecord::completed(done, now_ms),
            );
        }
        Ok(Adjusted::Applied)
    }

    async fn get(&self, product_id: &str) -> Result<Option<Product>, StoreError> {
        Ok(self.tables().products.get(product_id).cloned())
    }

    async fn prices(&self, product_ids: &[&str]) -> Result<HashMap<String, u64>, StoreError> {
        let t = self.tables();
        Ok(product_ids
            .iter()
            .filter_map(|id| t.products.get(*id))
            .map(|p| (p.product_id.clone(), p.price_cents))
            .collect())
    }
}

impl Stock for MemoryStore {
    async fn reserve(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        now_ms: i64,
    ) -> Result<ReserveOutcome, StoreError> {
        let mut t = self.tables();
        let key = done.key.to_string();
        if let Some(existing) = t.live_record(&key, now_ms) {
            return Ok(ReserveOutcome::AlreadyDone(existing.clone()));
        }
        for line in lines {
            let reason = match t.products.get(&line.product_id) {
                None => StockRejection::UnknownProduct,
                Some(p) if p.quantity < line.quantity => StockRejection::InsufficientStock,
                Some(_) => continue,
            };
            return Ok(ReserveOutcome::Rejected {
                reason,
                product_id: line.product_id.clone(),
            });
        }
        for line in lines {
            let product = t.products.get_mut(&line.product_id).expect("checked above");
            product.quantity -= line.quantity;
            product.reserved += line.quantity;
        }
        t.records
            .insert(key, IdempotencyRecord::completed(done, now_ms));
        Ok(ReserveOutcome::Reserved)
    }

    async fn release(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        reservation: StepKey<'_>,
        fence: Option<&Completed<'_>>,
        now_ms: i64,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut t = self.tables();
        let key = done.key.to_string();
        if let Some(existing) = t.live_record(&key, now_ms) {
            return Ok(ReleaseOutcome::AlreadyDone(existing.clone()));
        }
        let counted = match t.live_record(&reservation.to_string(), now_ms) {
            None => {
                let Some(fence) = fence else {
                    return Ok(ReleaseOutcome::Missing);
                };
                t.records.insert(
                    reservation.to_string(),
                    IdempotencyRecord::completed(fence, now_ms),
                );
                return Ok(ReleaseOutcome::Fenced);
            }
            Some(r) if r.outcome == Some(Outcome::Reserved) => true,
            Some(r) if crate::adapters::stock::legacy_reservation(r) => false,
            Some(r) => return Ok(ReleaseOutcome::NothingHeld(r.clone())),
        };
        if let Some(line) = lines
            .iter()
            .find(|l| !t.products.contains_key(&l.product_id))
        {
            return Err(failed(
                "release_stock",
                format!("product {} is gone", line.product_id),
            ));
        }
        for line in lines {
            let product = t.products.get_mut(&line.product_id).expect("checked above");
            product.quantity += line.quantity;
            if counted {
                product.reserved = product.reserved.saturating_sub(line.quantity);
            }
        }
        t.records
            .insert(key, IdempotencyRecord::completed(done, now_ms));
        Ok(ReleaseOutcome::Released)
    }
}

impl Idempotency for MemoryStore {
    async fn claim(&self, req: &ClaimRequest<'_>, now_ms: i64) -> Result<Claim, StoreError> {
        let mut t = self.tables();
        let key = req.key.to_string();
        if let Some(existing) = t.records.get(&key) {
            if !req.may_replace(existing, now_ms) {
                return Ok(Claim::Existing(existing.clone()));
            }
        }
        t.records
            .insert(key, IdempotencyRecord::claimed(req, now_ms));
        Ok(Claim::Acquired)
    }

    async fn put_completed(&self, done: &Completed<'_>, now_ms: i64) -> Result<Claim, StoreError> {
        let mut t = self.tables();
        let key = done.key.to_string();
        if let Some(existing) = t.live_record(&key, now_ms) {
            return Ok(Claim::Existing(existing.clone()));
        }
        t.records
            .insert(key, IdempotencyRecord::completed(done, now_ms));
        Ok(Claim::Acquired)
    }

    async fn get(
        &self,
        key: StepKey<'_>,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self.tables().live_record(&key.to_string(), now_ms).cloned())
    }

    async fn complete(
        &self,
        key: StepKey<'_>,
        result: &str,
        outcome: Option<Outcome>,
    ) -> Result<(), StoreError> {
        let mut t = self.tables();
        let record = t
            .records
            .get_mut(&key.to_string())
            .ok_or_else(|| failed("complete", "no such record"))?;
        record.status = Status::Completed;
        record.result = Some(result.into());
        record.outcome = outcome;
        record.in_progress_until_ms = None;
        Ok(())
    }

    async fn take_over(
        &self,
        key: StepKey<'_>,
        seen_until_ms: i64,
        new_until_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut t = self.tables();
        match t.records.get_mut(&key.to_string()) {
            Some(r)
                if r.status == Status::InProgress
                    && r.in_progress_until_ms == Some(seen_until_ms) =>
            {
                r.in_progress_until_ms = Some(new_until_ms);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: StepKey<'_>) -> Result<(), StoreError> {
        let mut t = self.tables();
        let key = key.to_string();
        if t.records
            .get(&key)
            .is_some_and(|r| r.status == Status::InProgress)
        {
            t.records.remove(&key);
        }
        Ok(())
    }

    async fn expire_claim(&self, key: StepKey<'_>) -> Result<(), StoreError> {
        let mut t = self.tables();
        if let Some(r) = t.records.get_mut(&key.to_string()) {
            if r.status == Status::InProgress {
                r.in_progress_until_ms = Some(0);
            }
        }
        Ok(())
    }
}

/// Queues: every message sent, by queue URL, in order. Can be told to refuse sends.
#[derive(Clone, Debug, Default)]
pub struct MemoryQueues {
    state: Arc<Mutex<QueueState>>,
}

#[derive(Debug, Default)]
struct QueueState {
    sent: Vec<(String, String)>,
    refuse: usize,
}

impl MemoryQueues {
    /// The bodies sent to `queue_url`, parsed as JSON.
    pub fn sent(&self, queue_url: &str) -> Vec<serde_json::Value> {
        let s = self.state.lock().expect("not poisoned");
        s.sent
            .iter()
            .filter(|(q, _)| q == queue_url)
            .map(|(_, body)| serde_json::from_str(body).expect("messages are JSON"))
            .collect()
    }

    /// Makes the next `n` sends fail, as SQS does when it is unavailable.
    pub fn refuse_next(&self, n: usize) {
        self.state.lock().expect("not poisoned").refuse = n;
    }
}

impl Publish for MemoryQueues {
    async fn send_body(&self, queue_url: &str, body: String) -> Result<(), PublishError> {
        self.send_bodies(queue_url, vec![body]).await
    }

    async fn send_bodies(&self, queue_url: &str, bodies: Vec<String>) -> Result<(), PublishError> {
        let mut s = self.state.lock().expect("not poisoned");
        if s.refuse > 0 {
            s.refuse -= 1;
            return Err(PublishError {
                op: "SendMessage",
                queue_url: queue_url.into(),
                code: "ServiceUnavailable".into(),
                message: "refused by the test".into(),
            });
        }
        s.sent
            .extend(bodies.into_iter().map(|b| (queue_url.to_string(), b)));
        Ok(())
    }
}

/// A payment provider that approves every card but `tok_chargeDeclined`, answers a repeated
/// idempotency key with its first result, and can be made unavailable.
#[derive(Clone, Debug, Default)]
pub struct MemoryProvider {
    state: Arc<Mutex<ProviderState>>,
}

#[derive(Debug, Default)]
struct ProviderState {
    charges: BTreeMap<String, (u64, ChargeOutcome)>,
    refunds: BTreeMap<String, (u64, RefundOutcome)>,
    unavailable: usize,
}

impl MemoryProvider {
    /// Charges that moved money: (idempotency key, amount).
    pub fn charged(&self) -> Vec<(String, u64)> {
        let s = self.state.lock().expect("not poisoned");
        s.charges
            .iter()
            .filter(|(_, (_, o))| matches!(o, ChargeOutcome::Approved { .. }))
            .map(|(k, (amount, _))| (k.clone(), *amount))
            .collect()
    }

    pub fn refunded(&self) -> Vec<(String, u64)> {
        let s = self.state.lock().expect("not poisoned");
        s.refunds
            .iter()
            .map(|(k, (amount, _))| (k.clone(), *amount))
            .collect()
    }

    /// Makes the next `n` calls fail without acting.
    pub fn unavailable_for(&self, n: usize) {
        self.state.lock().expect("not poisoned").unavailable = n;
    }

    fn available(s: &mut ProviderState) -> Result<(), ProviderError> {
        if s.unavailable > 0 {
            s.unavailable -= 1;
            return Err(ProviderError("unavailable (test)".into()));
        }
        Ok(())
    }
}

impl PaymentProvider for MemoryProvider {
    async fn charge(&self, req: ChargeRequest<'_>) -> Result<ChargeOutcome, ProviderError> {
        let mut s = self.state.lock().expect("not poisoned");
        Self::available(&mut s)?;
        let n = s.charges.len();
        let (_, outcome) = s
            .charges
            .entry(req.idempotency_key.into())
            .or_insert_with(|| {
                let outcome = if req.payment_method == TOKEN_DECLINED {
                    ChargeOutcome::Declined {
                        reason: "CARD_DECLINED".into(),
                    }
                } else {
                    ChargeOutcome::Approved {
                        payment_id: format!("ch_{n}"),
                    }
                };
                (req.amount_cents, outcome)
            });
        Ok(outcome.clone())
    }

    async fn refund(&self, req: RefundRequest<'_>) -> Result<RefundOutcome, ProviderError> {
        let mut s = self.state.lock().expect("not poisoned");
        Self::available(&mut s)?;
        let n = s.refunds.len();
        let (_, outcome) = s
            .refunds
            .entry(req.idempotency_key.into())
            .or_insert_with(|| {
                (
                    req.amount_cents,
                    RefundOutcome {
                        refund_id: format!("re_{n}"),
                    },
                )
            });
        Ok(outcome.clone())
    }
}
