//! The ports: what the handlers need from the outside world, one small trait per capability.
//!
//! | port | production adapter | in-memory adapter |
//! |---|---|---|
//! | [`Orders`] | [`crate::adapters::orders::DynamoOrders`] | [`crate::adapters::memory::MemoryStore`] |
//! | [`Products`] | [`crate::adapters::products::DynamoProducts`] | `MemoryStore` |
//! | [`Stock`] | [`crate::adapters::stock::DynamoStock`] | `MemoryStore` |
//! | [`Idempotency`] | [`crate::idempotency::dynamo::DynamoIdempotency`] | `MemoryStore` |
//! | [`Publish`] | [`crate::adapters::sqs::SqsPublisher`] | [`crate::adapters::memory::MemoryQueues`] |
//! | [`PaymentProvider`] | [`crate::adapters::payment::SimulatedProvider`] (a ledger in DynamoDB) | [`crate::adapters::memory::MemoryProvider`] |
//!
//! The handlers are generic over these traits. Lambda and the local runner plug in the
//! DynamoDB and SQS adapters; the handlers' unit tests plug in the in-memory ones, which keep
//! the same conditions (all-or-nothing reservations, keys taken once) so the tests exercise the
//! handlers' logic in milliseconds. The integration tests prove the DynamoDB expressions
//! themselves, over the wire.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;

use crate::adapters::dynamo::StoreError;
use crate::adapters::payment::{
    ChargeOutcome, ChargeRequest, ProviderError, RefundOutcome, RefundRequest,
};
use crate::adapters::sqs::PublishError;
use crate::domain::{Order, Product, StockLine, StockMovement};
use crate::idempotency::{Claim, ClaimRequest, Completed, IdempotencyRecord, StepKey};
use crate::messages::StockRejection;
use crate::saga::Fact;

pub use crate::idempotency::Idempotency;

/// A fact with the data it carries onto the order.
#[derive(Clone, Debug)]
pub struct FactUpdate {
    pub fact: Fact,
    pub payment_id: Option<String>,
    pub cancel_detail: Option<String>,
    pub cancel_product_id: Option<String>,
    /// For [`Fact::TimedOut`]: only orders created before this instant are cancelled.
    pub cutoff_ms: Option<i64>,
    /// Only the order of this customer (a customer's own cancellation through the API).
    pub customer_id: Option<String>,
}

impl FactUpdate {
    pub fn new(fact: Fact) -> Self {
        Self {
            fact,
            payment_id: None,
            cancel_detail: None,
            cancel_product_id: None,
            cutoff_ms: None,
            customer_id: None,
        }
    }
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

/// Why an order and its idempotency claim were not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Another transaction on the same items was in flight (a concurrent duplicate).
    #[error("a concurrent transaction touched the same items")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The orders table.
/// Where a customer's order list resumes: the last order of the previous page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCursor {
    pub created_at_ms: i64,
    pub order_id: String,
}

impl OrderCursor {
    pub fn of(order: &Order) -> Self {
        Self {
            created_at_ms: order.created_at_ms,
            order_id: order.order_id.clone(),
        }
    }
}

/// One page of a customer's orders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderPage {
    pub orders: Vec<Order>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<OrderCursor>,
}

pub trait Orders: Send + Sync {
    /// Creates an order; never overwrites one.
    fn create(&self, order: &Order) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Creates the order and claims the request's idempotency key, both or neither.
    /// `Claim::Existing` when the key was already taken (nothing written).
    fn create_claimed(
        &self,
        order: &Order,
        claim: &ClaimRequest<'_>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Claim, CreateError>> + Send;

    fn get(&self, order_id: &str)
    -> impl Future<Output = Result<Option<Order>, StoreError>> + Send;

    /// A customer's orders, newest first: at most `limit`, after `after` (the last order of
    /// the previous page). `next` is set only when more orders follow. A walk from the first
    /// page sees every order that existed when it started exactly once, whatever is placed
    /// meanwhile (newer orders sort before the walk's position).
    fn customer_orders(
        &self,
        customer_id: &str,
        limit: usize,
        after: Option<&OrderCursor>,
    ) -> impl Future<Output = Result<OrderPage, StoreError>> + Send;

    /// Applies a saga fact as one conditional update (two for a failure that arrives after the
    /// order was already cancelled for another reason).
    fn apply(
        &self,
        order_id: &str,
        update: &FactUpdate,
        now_ms: i64,
    ) -> impl Future<Output = Result<Update, StoreError>> + Send;

    /// Confirms an order whose stock is reserved and payment charged, if it is still pending.
    fn confirm(
        &self,
        order_id: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Update, StoreError>> + Send;

    /// Takes a customer-cancelled order out of the sweeper's cancelling partition once the
    /// coordinator has sent its compensations (`NotApplicable` when it is not in it).
    fn compensations_sent(
        &self,
        order_id: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Update, StoreError>> + Send;

    /// Ids of customer-cancelled orders whose compensations may not have been sent yet (the
    /// API died between the cancellation and its message); at most `limit`.
    fn cancelling(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Ids of orders still pending that were created before `cutoff_ms`, oldest first; at
    /// most `limit`.
    fn pending_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// Which catalogue versions a conditional change accepts (`If-Match`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Any version, as long as the product exists (`If-Match: *`).
    Any,
    /// One of these versions (never empty).
    Versions(Vec<u64>),
}

impl Expected {
    pub fn accepts(&self, version: u64) -> bool {
        match self {
            Expected::Any => true,
            Expected::Versions(v) => v.contains(&version),
        }
    }
}

/// The outcome of creating a product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    /// Created, with its first stock movement.
    Created(Product),
    /// A product with this id exists: nothing written.
    Exists,
    /// A concurrent transaction touched the same item: nothing written; try again.
    Conflict,
}

/// The outcome of changing a product's name and price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Updated {
    /// Changed; the product as it is now (its version bumped).
    Updated(Product),
    /// There is no such product: nothing written.
    NotFound,
    /// The product's version is not one the request accepts: nothing written. The product as
    /// it is.
    VersionMismatch(Product),
}

/// A stock adjustment to write, all of it or none: the product's quantity goes from `seen`
/// to `movement.quantity_after` (only if it is still `seen`), the movement is recorded, and so
/// is the request's idempotency record when it has a key.
#[derive(Clone, Debug)]
pub struct Adjustment<'a> {
    pub movement: &'a StockMovement,
    /// The quantity read before: the condition of the write.
    pub seen: u64,
    pub done: Option<&'a Completed<'a>>,
}

/// The outcome of writing an [`Adjustment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adjusted {
    Applied,
    /// The quantity is no longer the one seen (an order or another adjustment came first), or
    /// the product is gone: nothing written; read again and retry.
    StockMoved,
    /// A concurrent transaction touched the same items: nothing written; retry.
    Conflict,
    /// The idempotency key is taken (a duplicate came first): nothing written; its record.
    KeyTaken(IdempotencyRecord),
}

/// The products table (the catalogue) and the stock movements table.
///
/// Stock changes outside the saga only through [`Products::adjust`], and every change is
/// recorded as a movement in the same transaction. Name and price change through
/// [`Products::update`], which never touches stock.
pub trait Products: Send + Sync {
    /// Creates a product (never overwrites one) and records its initial stock as its first
    /// movement, both or neither.
    fn create_product(
        &self,
        product: &Product,
        first: &StockMovement,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send;

    /// Sets an existing product's name and price and bumps its version, if its version is one
    /// `expected` accepts (any without `expected`). Stock is left alone.
    fn update(
        &self,
        product_id: &str,
        name: &str,
        price_cents: u64,
        expected: Option<&Expected>,
    ) -> impl Future<Output = Result<Updated, StoreError>> + Send;

    /// Writes a stock adjustment (see [`Adjustment`]).
    fn adjust(
        &self,
        adjustment: &Adjustment<'_>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Adjusted, StoreError>> + Send;

    fn get(
        &self,
        product_id: &str,
    ) -> impl Future<Output = Result<Option<Product>, StoreError>> + Send;

    /// Current prices of the given products; unknown products are absent.
    fn prices(
        &self,
        product_ids: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, u64>, StoreError>> + Send;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved,
    /// Already done for this order: the record of that attempt.
    AlreadyDone(IdempotencyRecord),
    /// Nothing reserved: this line was short or unknown.
    Rejected {
        reason: StockRejection,
        product_id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The reservation's units are back in stock (and out of `reserved`).
    Released,
    /// Released before: the release record.
    AlreadyDone(IdempotencyRecord),
    /// There was no reservation, and the fence asked for now stands in its place: a
    /// `ReserveStock` that arrives later replays the fence and holds nothing.
    Fenced,
    /// The reservation step holds nothing (rejected, or fenced earlier): its record.
    NothingHeld(IdempotencyRecord),
    /// There is no reservation record at all, and no fence was asked for.
    Missing,
}

/// Stock levels: reservation and release, each all lines or none, each recorded once.
pub trait Stock: Send + Sync {
    /// Takes every line of an order from stock (`quantity >= n` for each), and records `done`
    /// (the reservation step), in one write.
    fn reserve(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        now_ms: i64,
    ) -> impl Future<Output = Result<ReserveOutcome, StoreError>> + Send;

    /// Gives back every line of the reservation recorded under `reservation` if its record's
    /// outcome is `RESERVED` (or, for a record written before outcomes were recorded, if its
    /// result is a `StockReserved`), and records `done` (the release step), in one write. When
    /// there is no reservation record and `fence` is given, puts the fence in its place.
    fn release(
        &self,
        lines: &[StockLine],
        done: &Completed<'_>,
        reservation: StepKey<'_>,
        fence: Option<&Completed<'_>>,
        now_ms: i64,
    ) -> impl Future<Output = Result<ReleaseOutcome, StoreError>> + Send;
}

/// Sending messages to a queue. An error is returned, never swallowed: the caller's record
/// then fails and SQS retries it, and the step's idempotency record makes the retry
/// re-publish.
pub trait Publish: Send + Sync {
    fn send_body(
        &self,
        queue_url: &str,
        body: String,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Sends many bodies (in batches where the queue allows). Fails if any failed.
    fn send_bodies(
        &self,
        queue_url: &str,
        bodies: Vec<String>,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    fn send(
        &self,
        queue_url: &str,
        message: &(impl Serialize + Sync),
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        self.send_body(queue_url, to_json(message))
    }

    fn send_all<M: Serialize + Sync>(
        &self,
        queue_url: &str,
        messages: &[M],
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        self.send_bodies(queue_url, messages.iter().map(to_json).collect())
    }
}

/// A message as JSON.
pub fn to_json(message: &impl Serialize) -> String {
    serde_json::to_string(message).expect("saga messages always serialize")
}

/// A payment provider. Implement this for a real one (Stripe, Adyen, ...). Every call carries
/// an idempotency key, as real providers accept: a call repeated after a crash in the middle
/// of the first one returns the first one's result and moves no money twice.
pub trait PaymentProvider: Send + Sync {
    fn charge(
        &self,
        req: ChargeRequest<'_>,
    ) -> impl Future<Output = Result<ChargeOutcome, ProviderError>> + Send;
    fn refund(
        &self,
        req: RefundRequest<'_>,
    ) -> impl Future<Output = Result<RefundOutcome, ProviderError>> + Send;
}
