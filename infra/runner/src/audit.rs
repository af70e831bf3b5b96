//! `saga-local audit`: reads the five stores of the saga (orders, products, stock movements,
//! idempotency records, the payment ledger) and lists every broken invariant with the ids
//! involved.
//!
//! Three parts, kept apart:
//! - [`load`]: one full scan of each table, paged (`LastEvaluatedKey`) and parallel
//!   (`Segment` / `TotalSegments`), asking for the read capacity consumed
//!   (`ReturnConsumedCapacity::Total`) and measuring item sizes to estimate it where the
//!   endpoint reports none (DynamoDB Local); progress on stderr while it runs;
//! - [`check`]: a pure function over the loaded rows, returning typed [`Finding`]s;
//! - [`Report`]: the findings, one a line, a summary per table and per invariant, and the
//!   cost of the run.
//!
//! The invariants (README, "Auditing the stores"):
//! 1. per product, `quantity >= 0` and `reserved >= 0`;
//! 2. per product, `reserved` = the units held by live reservations (a `{orderId}#reserve`
//!    record with outcome `RESERVED` and no `{orderId}#release` record that released);
//! 3. per product, `quantity + reserved` (+ the units of live reservations written by the
//!    previous version, never counted in `reserved`) = the sum of its stock movements;
//! 4. every CONFIRMED order holds its reservation and has exactly one approved charge and no
//!    refund;
//! 5. every CANCELLED order holds no reservation and has no unrefunded charge;
//! 6. no order is PENDING past the timeout (plus a grace for the sweeper to act);
//! 7. the ledger's approved charges minus its refunds = the totals of the CONFIRMED orders.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use saga_core::adapters::payment::{ChargeOutcome, LedgerEntry, LedgerKind};
use saga_core::adapters::stock::legacy_reservation;
use saga_core::domain::{OrderLine, OrderStatus};
use saga_core::idempotency::{IdempotencyRecord, Outcome, Status};
use saga_core::messages::SagaEvent;
use serde::{Deserialize, Serialize};

use crate::template::Template;

/// The five tables an audit reads, by their role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Table {
    Orders,
    Products,
    Movements,
    Idempotency,
    Ledger,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Orders,
        Table::Products,
        Table::Movements,
        Table::Idempotency,
        Table::Ledger,
    ];

    /// The table's logical id in template.yaml.
    pub fn logical_id(self) -> &'static str {
        match self {
            Table::Orders => "OrdersTable",
            Table::Products => "ProductsTable",
            Table::Movements => "StockMovementsTable",
            Table::Idempotency => "IdempotencyTable",
            Table::Ledger => "PaymentLedgerTable",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.logical_id())
    }
}

/// The names of the five tables: a local stack's (template + prefix) or a deployed one's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableNames {
    pub orders: String,
    pub products: String,
    pub movements: String,
    pub idempotency: String,
    pub ledger: String,
}

impl TableNames {
    /// The local names of `make run` (or a test stack): `prefix + logical id`, as the runner
    /// provisions them; fails if the template lacks one of the tables.
    pub fn local(template: &Template, prefix: &str) -> Result<Self, AuditError> {
        let name = |t: Table| {
            template
                .table(t.logical_id())
                .map(|spec| crate::provision::local_table_name(prefix, spec))
                .ok_or(AuditError::NotInTemplate(t.logical_id()))
        };
        Ok(Self {
            orders: name(Table::Orders)?,
            products: name(Table::Products)?,
            movements: name(Table::Movements)?,
            idempotency: name(Table::Idempotency)?,
            ledger: name(Table::Ledger)?,
        })
    }

    /// The names a running stack resolved (by logical id).
    pub fn of(tables: &BTreeMap<String, String>) -> Result<Self, AuditError> {
        let name = |t: Table| {
            tables
                .get(t.logical_id())
                .cloned()
                .ok_or(AuditError::NotInTemplate(t.logical_id()))
        };
        Ok(Self {
            orders: name(Table::Orders)?,
            products: name(Table::Products)?,
            movements: name(Table::Movements)?,
            idempotency: name(Table::Idempotency)?,
            ledger: name(Table::Ledger)?,
        })
    }

    pub fn name(&self, table: Table) -> &str {
        match table {
            Table::Orders => &self.orders,
            Table::Products => &self.products,
            Table::Movements => &self.movements,
            Table::Idempotency => &self.idempotency,
            Table::Ledger => &self.ledger,
        }
    }
}

/// Why an audit could not run (as opposed to what it found).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("template.yaml declares no table {0}")]
    NotInTemplate(&'static str),
    #[error(
        "DynamoDB does not answer ({table} {name}): {message}. Locally, start the stack with \
         `make run` (the audit starts nothing); on AWS, check the region and credentials"
    )]
    Unreachable {
        table: Table,
        name: String,
        message: String,
    },
    #[error("table {name} ({table}) does not exist: wrong --prefix, or wrong table names?")]
    NoSuchTable { table: Table, name: String },
    #[error("describing {name} ({table}): {message}")]
    Describe {
        table: Table,
        name: String,
        message: String,
    },
    #[error("scanning {name} ({table}), segment {segment}: {message}")]
    Scan {
        table: Table,
        name: String,
        segment: i32,
        message: String,
    },
    /// A write of `saga-local opening-balances` ([`crate::opening`]) failed.
    #[error("writing an opening balance: {0}")]
    Write(String),
}

// ---------------------------------------------------------------------------------------------
// The rows the checks read
// ---------------------------------------------------------------------------------------------

/// What the audit reads of an order. Only these fields: an order the API would no longer
/// parse for another reason is still audited.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderRow {
    pub order_id: String,
    pub status: OrderStatus,
    #[serde(default)]
    pub items: Vec<OrderLine>,
    pub total_cents: u64,
    pub created_at_ms: i64,
}

/// What the audit reads of a product: signed, so that a negative quantity is read and
/// reported rather than refused by the parser.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductRow {
    pub product_id: String,
    pub quantity: i64,
    #[serde(default)]
    pub reserved: i64,
}

/// What the audit reads of a stock movement.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MovementRow {
    pub product_id: String,
    pub movement_id: String,
    pub delta: i64,
    #[serde(default)]
    pub reason: String,
}

/// An item a check could not read, by its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unreadable {
    pub table: Table,
    pub key: String,
    pub error: String,
}

/// Everything an audit reads. Idempotency records other than saga steps (`api#...`,
/// `adjust#...`) are left out when loading.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub orders: Vec<OrderRow>,
    pub products: Vec<ProductRow>,
    pub movements: Vec<MovementRow>,
    pub steps: Vec<IdempotencyRecord>,
    pub ledger: Vec<LedgerEntry>,
    pub unreadable: Vec<Unreadable>,
}

/// The settings of the checks.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Now, in epoch milliseconds.
    pub now_ms: i64,
    /// An order PENDING for longer than this is a finding: the sweeper's timeout
    /// (`ORDER_TIMEOUT_SECONDS`) plus a grace for the sweeper's schedule and its work.
    pub pending_limit: Duration,
}

// ---------------------------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------------------------

/// One broken invariant, with the ids involved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Finding {
    /// An item the audit could not read (invariant 0: the stores are readable).
    #[serde(rename_all = "camelCase")]
    Unreadable {
        table: Table,
        key: String,
        error: String,
    },
    /// 1: `quantity` or `reserved` below zero.
    #[serde(rename_all = "camelCase")]
    NegativeStock {
        product_id: String,
        quantity: i64,
        reserved: i64,
    },
    /// 2: `reserved` differs from the units the live reservations hold (`orders`: those
    /// reservations' orders).
    #[serde(rename_all = "camelCase")]
    ReservedMismatch {
        product_id: String,
        reserved: i64,
        held: i64,
        orders: Vec<String>,
    },
    /// 2: a live reservation whose order does not exist (its units cannot be known).
    #[serde(rename_all = "camelCase")]
    ReservationWithoutOrder { order_id: String },
    /// 3: `quantity + reserved` (+ units of live reservations of the previous version)
    /// differs from the sum of the product's movements.
    #[serde(rename_all = "camelCase")]
    MovementsMismatch {
        product_id: String,
        quantity: i64,
        reserved: i64,
        legacy_held: i64,
        movements: usize,
        movements_sum: i64,
    },
    /// 4: a CONFIRMED order without a live reservation.
    #[serde(rename_all = "camelCase")]
    ConfirmedWithoutReservation { order_id: String },
    /// 4: a CONFIRMED order without exactly one approved charge, or with a refund.
    #[serde(rename_all = "camelCase")]
    ConfirmedNotChargedOnce {
        order_id: String,
        charges: usize,
        refunds: usize,
    },
    /// 5: a CANCELLED order whose reservation still holds units.
    #[serde(rename_all = "camelCase")]
    CancelledStillReserved { order_id: String },
    /// 5: a CANCELLED order whose approved charges and refunds differ (or are more than one).
    #[serde(rename_all = "camelCase")]
    CancelledNotRefunded {
        order_id: String,
        charges: usize,
        refunds: usize,
    },
    /// 6: an order PENDING past the timeout and its grace.
    #[serde(rename_all = "camelCase")]
    PendingPastTimeout {
        order_id: String,
        age_seconds: i64,
        limit_seconds: u64,
    },
    /// 7: approved charges minus refunds differ from the totals of the CONFIRMED orders.
    /// `orders`: the orders whose ledger net differs from what their status says it should
    /// be (a CONFIRMED order's total, else zero), including ledger entries of unknown orders.
    #[serde(rename_all = "camelCase")]
    LedgerMismatch {
        charged_cents: u64,
        refunded_cents: u64,
        confirmed_cents: u64,
        orders: Vec<String>,
    },
}

/// What each invariant says, by number (0: the stores are readable).
pub const INVARIANTS: [&str; 8] = [
    "every item readable",
    "no negative stock",
    "reserved = units of live reservations",
    "quantity + reserved = sum of stock movements",
    "CONFIRMED: reservation held and exactly one charge",
    "CANCELLED: no reservation held, no unrefunded charge",
    "no order PENDING past the timeout",
    "ledger charges - refunds = totals of CONFIRMED orders",
];

impl Finding {
    /// The invariant it breaks (see [`INVARIANTS`]).
    pub fn invariant(&self) -> usize {
        match self {
            Finding::Unreadable { .. } => 0,
            Finding::NegativeStock { .. } => 1,
            Finding::ReservedMismatch { .. } | Finding::ReservationWithoutOrder { .. } => 2,
            Finding::MovementsMismatch { .. } => 3,
            Finding::ConfirmedWithoutReservation { .. }
            | Finding::ConfirmedNotChargedOnce { .. } => 4,
            Finding::CancelledStillReserved { .. } | Finding::CancelledNotRefunded { .. } => 5,
            Finding::PendingPastTimeout { .. } => 6,
            Finding::LedgerMismatch { .. } => 7,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.invariant();
        write!(f, "invariant {n} ({}): ", INVARIANTS[n])?;
        match self {
            Finding::Unreadable { table, key, error } => {
                write!(f, "{table} item {key} cannot be read: {error}")
            }
            Finding::NegativeStock {
                product_id,
                quantity,
                reserved,
            } => write!(
                f,
                "product {product_id}: quantity {quantity}, reserved {reserved}"
            ),
            Finding::ReservedMismatch {
                product_id,
                reserved,
                held,
                orders,
            } => write!(
                f,
                "product {product_id}: reserved {reserved}, but live reservations hold {held} \
                 (orders: {})",
                list(orders)
            ),
            Finding::ReservationWithoutOrder { order_id } => write!(
                f,
                "order {order_id}: a live reservation ({order_id}#reserve) and no such order"
            ),
            Finding::MovementsMismatch {
                product_id,
                quantity,
                reserved,
                legacy_held,
                movements,
                movements_sum,
            } => write!(
                f,
                "product {product_id}: quantity {quantity} + reserved {reserved} + held by \
                 previous-version reservations {legacy_held} = {}, but its {movements} \
                 movement(s) sum to {movements_sum}",
                quantity + reserved + legacy_held
            ),
            Finding::ConfirmedWithoutReservation { order_id } => {
                write!(f, "order {order_id}: CONFIRMED, and no reservation held")
            }
            Finding::ConfirmedNotChargedOnce {
                order_id,
                charges,
                refunds,
            } => write!(
                f,
                "order {order_id}: CONFIRMED, with {charges} approved charge(s) and \
                 {refunds} refund(s) in the ledger"
            ),
            Finding::CancelledStillReserved { order_id } => write!(
                f,
                "order {order_id}: CANCELLED, and its reservation still holds units"
            ),
            Finding::CancelledNotRefunded {
                order_id,
                charges,
                refunds,
            } => write!(
                f,
                "order {order_id}: CANCELLED, with {charges} approved charge(s) and \
                 {refunds} refund(s) in the ledger"
            ),
            Finding::PendingPastTimeout {
                order_id,
                age_seconds,
                limit_seconds,
            } => write!(
                f,
                "order {order_id}: PENDING for {age_seconds} s (limit {limit_seconds} s)"
            ),
            Finding::LedgerMismatch {
                charged_cents,
                refunded_cents,
                confirmed_cents,
                orders,
            } => write!(
                f,
                "charged {charged_cents} - refunded {refunded_cents} = {} cents, but CONFIRMED \
                 orders total {confirmed_cents} cents (orders: {})",
                *charged_cents as i128 - *refunded_cents as i128,
                list(orders)
            ),
        }
    }
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// What the step records say of one order.
#[derive(Default)]
struct Steps {
    /// A reservation that took units (outcome RESERVED).
    reserved: bool,
    /// A reservation of the previous version (no outcome, result `StockReserved`).
    legacy_reserved: bool,
    /// A release that gave units back.
    released: bool,
}

impl Steps {
    fn live(&self) -> bool {
        (self.reserved || self.legacy_reserved) && !self.released
    }
}

/// Whether a release record released: outcome RELEASED, or (the previous version) no outcome
/// and a `StockReleased` result.
fn released(record: &IdempotencyRecord) -> bool {
    record.status == Status::Completed
        && match record.outcome {
            Some(outcome) => outcome == Outcome::Released,
            None => record
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str::<SagaEvent>(r).ok())
                .is_some_and(|e| matches!(e, SagaEvent::StockReleased { .. })),
        }
}

/// The saga step a record is of (`{orderId}#reserve`, ...), with its order id.
fn step_of(id: &str) -> Option<(&str, &str)> {
    if id.starts_with("api#") || id.starts_with("adjust#") {
        return None;
    }
    let (order, step) = id.rsplit_once('#')?;
    matches!(step, "reserve" | "release" | "charge" | "refund").then_some((order, step))
}

/// The step records of a snapshot, by order id.
fn steps_by_order(snapshot: &Snapshot) -> BTreeMap<&str, Steps> {
    let mut steps: BTreeMap<&str, Steps> = BTreeMap::new();
    for record in &snapshot.steps {
        let Some((order, step)) = step_of(&record.id) else {
            continue;
        };
        let entry = steps.entry(order).or_default();
        match step {
            "reserve" => {
                entry.reserved |=
                    record.status == Status::Completed && record.outcome == Some(Outcome::Reserved);
                entry.legacy_reserved |= legacy_reservation(record);
            }
            "release" => entry.released |= released(record),
            _ => {}
        }
    }
    steps
}

/// What the stores say of one product's stock (invariants 1 to 3 compare these).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StockView {
    /// Whether the product is in the products table (a product only named by reservations or
    /// movements is not).
    pub exists: bool,
    pub quantity: i64,
    pub reserved: i64,
    /// Units held by live reservations of this version (what `reserved` must be).
    pub held: i64,
    /// The orders of those reservations.
    pub held_by: BTreeSet<String>,
    /// Units held by live reservations of the previous version (never counted in `reserved`).
    pub legacy_held: i64,
    pub movements: usize,
    pub movements_sum: i64,
    /// Whether one of its movements is its first: the initial stock of its creation, or an
    /// opening balance ([`crate::opening`]).
    pub has_first_movement: bool,
}

impl StockView {
    /// Invariant 3's difference: `quantity + reserved + legacy_held - movements_sum`.
    pub fn unexplained(&self) -> i64 {
        self.quantity + self.reserved + self.legacy_held - self.movements_sum
    }
}

/// Every product's [`StockView`], by id: each product of the table, and each product id that
/// live reservations or movements name. Also the findings met on the way (a live reservation
/// whose order is missing).
pub fn stock_views(snapshot: &Snapshot) -> (BTreeMap<String, StockView>, Vec<Finding>) {
    let orders: BTreeMap<&str, &OrderRow> = snapshot
        .orders
        .iter()
        .map(|o| (o.order_id.as_str(), o))
        .collect();
    let mut findings = Vec::new();
    let mut views: BTreeMap<String, StockView> = BTreeMap::new();
    for p in &snapshot.products {
        let v = views.entry(p.product_id.clone()).or_default();
        v.exists = true;
        v.quantity = p.quantity;
        v.reserved = p.reserved;
    }
    for (order_id, s) in &steps_by_order(snapshot) {
        if !s.live() {
            continue;
        }
        let Some(order) = orders.get(order_id) else {
            findings.push(Finding::ReservationWithoutOrder {
                order_id: order_id.to_string(),
            });
            continue;
        };
        for line in &order.items {
            let units = line.quantity as i64;
            let v = views.entry(line.product_id.clone()).or_default();
            if s.reserved {
                v.held += units;
                v.held_by.insert(order_id.to_string());
            } else {
                v.legacy_held += units;
            }
        }
    }
    for m in &snapshot.movements {
        let v = views.entry(m.product_id.clone()).or_default();
        v.movements += 1;
        v.movements_sum += m.delta;
        v.has_first_movement |= m.reason == saga_core::domain::INITIAL_STOCK_REASON
            || m.movement_id == crate::opening::OPENING_MOVEMENT_ID;
    }
    (views, findings)
}

/// Every broken invariant in `snapshot`, sorted by invariant and then by id.
pub fn check(snapshot: &Snapshot, rules: &Rules) -> Vec<Finding> {
    let mut findings: Vec<Finding> = snapshot
        .unreadable
        .iter()
        .map(|u| Finding::Unreadable {
            table: u.table,
            key: u.key.clone(),
            error: u.error.clone(),
        })
        .collect();

    let orders: BTreeMap<&str, &OrderRow> = snapshot
        .orders
        .iter()
        .map(|o| (o.order_id.as_str(), o))
        .collect();
    let steps = steps_by_order(snapshot);

    // Invariants 1 to 3, per product.
    let (views, met) = stock_views(snapshot);
    findings.extend(met);
    for (id, v) in views {
        if v.quantity < 0 || v.reserved < 0 {
            findings.push(Finding::NegativeStock {
                product_id: id.clone(),
                quantity: v.quantity,
                reserved: v.reserved,
            });
        }
        if v.reserved != v.held {
            findings.push(Finding::ReservedMismatch {
                product_id: id.clone(),
                reserved: v.reserved,
                held: v.held,
                orders: v.held_by.iter().cloned().collect(),
            });
        }
        if v.unexplained() != 0 {
            findings.push(Finding::MovementsMismatch {
                product_id: id,
                quantity: v.quantity,
                reserved: v.reserved,
                legacy_held: v.legacy_held,
                movements: v.movements,
                movements_sum: v.movements_sum,
            });
        }
    }

    // The ledger, by order: approved charges and refunds, count and cents.
    #[derive(Default, Clone, Copy)]
    struct Money {
        charges: usize,
        charged: u64,
        refunds: usize,
        refunded: u64,
    }
    let mut money: BTreeMap<&str, Money> = BTreeMap::new();
    for entry in &snapshot.ledger {
        let m = money.entry(entry.order_id.as_str()).or_default();
        match entry.kind {
            LedgerKind::Charge => {
                if matches!(entry.charge, Some(ChargeOutcome::Approved { .. })) {
                    m.charges += 1;
                    m.charged += entry.amount_cents;
                }
            }
            LedgerKind::Refund => {
                m.refunds += 1;
                m.refunded += entry.amount_cents;
            }
        }
    }

    // Invariants 4 to 6, per order.
    let limit_ms = i64::try_from(rules.pending_limit.as_millis()).unwrap_or(i64::MAX);
    for (id, order) in &orders {
        let s = steps.get(id);
        let live = s.is_some_and(Steps::live);
        let m = money.get(id).copied().unwrap_or_default();
        match order.status {
            OrderStatus::Confirmed => {
                if !live {
                    findings.push(Finding::ConfirmedWithoutReservation {
                        order_id: id.to_string(),
                    });
                }
                if m.charges != 1 || m.refunds != 0 {
                    findings.push(Finding::ConfirmedNotChargedOnce {
                        order_id: id.to_string(),
                        charges: m.charges,
                        refunds: m.refunds,
                    });
                }
            }
            OrderStatus::Cancelled => {
                if live {
                    findings.push(Finding::CancelledStillReserved {
                        order_id: id.to_string(),
                    });
                }
                if m.charges != m.refunds || m.charges > 1 {
                    findings.push(Finding::CancelledNotRefunded {
                        order_id: id.to_string(),
                        charges: m.charges,
                        refunds: m.refunds,
                    });
                }
            }
            OrderStatus::Pending => {
                let age_ms = rules.now_ms.saturating_sub(order.created_at_ms);
                if age_ms > limit_ms {
                    findings.push(Finding::PendingPastTimeout {
                        order_id: id.to_string(),
                        age_seconds: age_ms / 1000,
                        limit_seconds: rules.pending_limit.as_secs(),
                    });
                }
            }
        }
    }

    // Invariant 7: the money. A PENDING order's charge is in flight (invariant 6 catches one
    // that stays): it is left out of both sides.
    let (mut charged, mut refunded, mut confirmed) = (0u64, 0u64, 0u64);
    let mut off = Vec::new();
    for (id, m) in &money {
        let status = orders.get(id).map(|o| o.status);
        if status == Some(OrderStatus::Pending) {
            continue;
        }
        charged += m.charged;
        refunded += m.refunded;
        let expected = match orders.get(id) {
            Some(o) if o.status == OrderStatus::Confirmed => o.total_cents as i128,
            _ => 0,
        };
        if m.charged as i128 - m.refunded as i128 != expected {
            off.push(id.to_string());
        }
    }
    for (id, o) in &orders {
        if o.status == OrderStatus::Confirmed {
            confirmed += o.total_cents;
            if !money.contains_key(id) {
                off.push(id.to_string());
            }
        }
    }
    if charged as i128 - refunded as i128 != confirmed as i128 || !off.is_empty() {
        off.sort();
        findings.push(Finding::LedgerMismatch {
            charged_cents: charged,
            refunded_cents: refunded,
            confirmed_cents: confirmed,
            orders: off,
        });
    }

    findings.sort_by_key(|f| f.invariant());
    findings
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// How to read the tables.
#[derive(Clone, Debug)]
pub struct ScanOptions {
    /// Parallel scan segments per table (`TotalSegments`), at least 1.
    pub segments: u32,
    /// Strongly consistent reads: twice the read capacity of eventually consistent ones.
    pub consistent: bool,
    /// Report the items read so far on stderr, every [`ScanOptions::progress_every`].
    pub progress: bool,
    pub progress_every: Duration,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            segments: 4,
            consistent: false,
            progress: false,
            progress_every: Duration::from_secs(2),
        }
    }
}

/// What reading one table took.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableStats {
    pub name: String,
    pub items: u64,
    pub pages: u64,
    /// The items' sizes as DynamoDB counts them (attribute names plus values).
    pub bytes: u64,
    /// Read capacity units DynamoDB reported consumed (`None` if it reported none).
    pub consumed_rcu: Option<f64>,
    /// Read capacity units estimated from the pages' sizes: one per 4 KB strongly
    /// consistent, half that eventually consistent.
    pub estimated_rcu: f64,
}

impl TableStats {
    /// The reported figure if there is one, else the estimate; and whether it is estimated.
    pub fn rcu(&self) -> (f64, bool) {
        match self.consumed_rcu {
            Some(c) => (c, false),
            None => (self.estimated_rcu, true),
        }
    }
}

/// The loaded rows and what reading them took.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub stats: BTreeMap<Table, TableStats>,
    pub elapsed: Duration,
}

type Item = HashMap<String, AttributeValue>;

/// The size DynamoDB gives an attribute value (bytes), for the capacity estimate.
fn value_size(v: &AttributeValue) -> u64 {
    match v {
        AttributeValue::S(s) => s.len() as u64,
        // Numbers: about one byte per two significant digits, plus one.
        AttributeValue::N(n) => (n.trim_start_matches('-').len() as u64).div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len() as u64,
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(v) => v.iter().map(|s| s.len() as u64).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| (n.len() as u64).div_ceil(2) + 1).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len() as u64).sum(),
        AttributeValue::L(l) => 3 + l.iter().map(|v| 1 + value_size(v)).sum::<u64>(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, v)| 1 + k.len() as u64 + value_size(v))
                .sum::<u64>()
        }
        _ => 1,
    }
}

/// An item's size as DynamoDB counts it: names plus values.
pub fn item_size(item: &Item) -> u64 {
    item.iter()
        .map(|(k, v)| k.len() as u64 + value_size(v))
        .sum()
}

/// Read capacity of one scan page of `bytes`: rounded up to 4 KB, halved when eventually
/// consistent.
pub fn page_rcu(bytes: u64, consistent: bool) -> f64 {
    let units = bytes.div_ceil(4096).max(1) as f64;
    if consistent { units } else { units / 2.0 }
}

struct Progress {
    items: [AtomicU64; 5],
}

impl Progress {
    fn line(&self) -> String {
        let parts: Vec<String> = Table::ALL
            .iter()
            .zip(&self.items)
            .map(|(t, n)| format!("{t} {}", n.load(Ordering::Relaxed)))
            .collect();
        format!("audit: items read: {}", parts.join(", "))
    }
}

/// One segment of one table, page by page.
async fn scan_segment(
    client: &aws_sdk_dynamodb::Client,
    table: Table,
    name: &str,
    segment: i32,
    opts: &ScanOptions,
    progress: &Progress,
) -> Result<(Vec<Item>, TableStats), AuditError> {
    let mut items = Vec::new();
    let mut stats = TableStats::default();
    let mut start = None;
    loop {
        let out = client
            .scan()
            .table_name(name)
            .segment(segment)
            .total_segments(opts.segments as i32)
            .consistent_read(opts.consistent)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| AuditError::Scan {
                table,
                name: name.into(),
                segment,
                message: DisplayErrorContext(e).to_string(),
            })?;
        let page = out.items.unwrap_or_default();
        let bytes: u64 = page.iter().map(item_size).sum();
        stats.pages += 1;
        stats.items += page.len() as u64;
        stats.bytes += bytes;
        stats.estimated_rcu += page_rcu(bytes, opts.consistent);
        if let Some(units) = out.consumed_capacity.and_then(|c| c.capacity_units) {
            *stats.consumed_rcu.get_or_insert(0.0) += units;
        }
        progress.items[Table::ALL.iter().position(|t| *t == table).unwrap_or(0)]
            .fetch_add(page.len() as u64, Ordering::Relaxed);
        items.extend(page);
        match out.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return Ok((items, stats)),
        }
    }
}

/// Fails clearly if DynamoDB does not answer or a table is missing.
async fn describe(
    client: &aws_sdk_dynamodb::Client,
    table: Table,
    name: &str,
) -> Result<(), AuditError> {
    match client.describe_table().table_name(name).send().await {
        Ok(_) => Ok(()),
        Err(SdkError::ServiceError(e))
            if matches!(e.err(), DescribeTableError::ResourceNotFoundException(_)) =>
        {
            Err(AuditError::NoSuchTable {
                table,
                name: name.into(),
            })
        }
        Err(e @ (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_))) => {
            Err(AuditError::Unreachable {
                table,
                name: name.into(),
                message: DisplayErrorContext(e).to_string(),
            })
        }
        Err(e) => Err(AuditError::Describe {
            table,
            name: name.into(),
            message: DisplayErrorContext(e).to_string(),
        }),
    }
}

/// An item's key, for a finding about it.
fn key_of(table: Table, item: &Item) -> String {
    let attrs: &[&str] = match table {
        Table::Orders => &["orderId"],
        Table::Products => &["productId"],
        Table::Movements => &["productId", "movementId"],
        Table::Idempotency => &["id"],
        Table::Ledger => &["idempotencyKey"],
    };
    attrs
        .iter()
        .map(|a| match item.get(*a) {
            Some(AttributeValue::S(s)) => s.clone(),
            Some(other) => format!("{other:?}"),
            None => "?".into(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn parse_all<T: serde::de::DeserializeOwned>(
    table: Table,
    items: Vec<Item>,
    unreadable: &mut Vec<Unreadable>,
) -> Vec<T> {
    items
        .into_iter()
        .filter_map(|item| {
            let key = key_of(table, &item);
            match saga_core::adapters::dynamo::from_item::<T>(item) {
                Ok(row) => Some(row),
                Err(e) => {
                    unreadable.push(Unreadable {
                        table,
                        key,
                        error: e.to_string(),
                    });
                    None
                }
            }
        })
        .collect()
}

/// Reads the five tables: each with `opts.segments` parallel segments, all tables at once.
pub async fn load(
    client: &aws_sdk_dynamodb::Client,
    tables: &TableNames,
    opts: &ScanOptions,
) -> Result<Loaded, AuditError> {
    let started = Instant::now();
    for table in Table::ALL {
        describe(client, table, tables.name(table)).await?;
    }
    let opts = ScanOptions {
        segments: opts.segments.max(1),
        ..opts.clone()
    };
    let progress = Arc::new(Progress {
        items: Default::default(),
    });
    let ticker = opts.progress.then(|| {
        let progress = progress.clone();
        let every = opts.progress_every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("{}", progress.line());
            }
        })
    });
    let scans = Table::ALL.iter().flat_map(|&table| {
        let (opts, progress) = (&opts, &progress);
        (0..opts.segments as i32).map(move |segment| async move {
            let (items, stats) =
                scan_segment(client, table, tables.name(table), segment, opts, progress).await?;
            Ok::<_, AuditError>((table, items, stats))
        })
    });
    let results = futures::future::try_join_all(scans).await;
    if let Some(t) = ticker {
        t.abort();
    }
    let results = results?;
    if opts.progress {
        eprintln!("{}", progress.line());
    }

    let mut raw: BTreeMap<Table, Vec<Item>> = BTreeMap::new();
    let mut stats: BTreeMap<Table, TableStats> = Table::ALL
        .iter()
        .map(|&t| {
            (
                t,
                TableStats {
                    name: tables.name(t).into(),
                    ..Default::default()
                },
            )
        })
        .collect();
    for (table, items, s) in results {
        raw.entry(table).or_default().extend(items);
        let total = stats.get_mut(&table).expect("every table");
        total.items += s.items;
        total.pages += s.pages;
        total.bytes += s.bytes;
        total.estimated_rcu += s.estimated_rcu;
        if let Some(c) = s.consumed_rcu {
            *total.consumed_rcu.get_or_insert(0.0) += c;
        }
    }
    let mut take = |t: Table| raw.remove(&t).unwrap_or_default();
    let mut unreadable = Vec::new();
    let steps: Vec<Item> = take(Table::Idempotency)
        .into_iter()
        .filter(
            |item| matches!(item.get("id"), Some(AttributeValue::S(id)) if step_of(id).is_some()),
        )
        .collect();
    let snapshot = Snapshot {
        orders: parse_all(Table::Orders, take(Table::Orders), &mut unreadable),
        products: parse_all(Table::Products, take(Table::Products), &mut unreadable),
        movements: parse_all(Table::Movements, take(Table::Movements), &mut unreadable),
        steps: parse_all(Table::Idempotency, steps, &mut unreadable),
        ledger: parse_all(Table::Ledger, take(Table::Ledger), &mut unreadable),
        unreadable,
    };
    Ok(Loaded {
        snapshot,
        stats,
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// An audit's result: what it read, what it cost, what it found.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub tables: BTreeMap<Table, TableStats>,
    pub segments: u32,
    pub consistent: bool,
    pub elapsed_ms: u128,
    /// Read capacity units: reported by DynamoDB where it reported them, else estimated.
    pub read_capacity_units: f64,
    /// Whether [`Report::read_capacity_units`] is (in part) an estimate.
    pub estimated: bool,
    pub findings: Vec<Finding>,
    /// Findings per invariant (0 to 7).
    pub per_invariant: [usize; 8],
}

impl Report {
    pub fn new(loaded: &Loaded, opts: &ScanOptions, findings: Vec<Finding>) -> Self {
        let mut per_invariant = [0; 8];
        for f in &findings {
            per_invariant[f.invariant()] += 1;
        }
        let (rcu, estimated) = loaded
            .stats
            .values()
            .map(TableStats::rcu)
            .fold((0.0, false), |(sum, est), (r, e)| (sum + r, est || e));
        Self {
            tables: loaded.stats.clone(),
            segments: opts.segments.max(1),
            consistent: opts.consistent,
            elapsed_ms: loaded.elapsed.as_millis(),
            read_capacity_units: rcu,
            estimated,
            findings,
            per_invariant,
        }
    }

    /// The exit code: 0 when nothing was found, 1 otherwise.
    pub fn clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// The human-readable report: one finding a line, then the summary and the cost.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!("FINDING {f}\n"));
        }
        out.push_str(&format!(
            "\naudit: one full scan of the five tables, {} segment(s) each, {} reads, in {:.1} s\n",
            self.segments,
            if self.consistent {
                "strongly consistent"
            } else {
                "eventually consistent"
            },
            self.elapsed_ms as f64 / 1000.0
        ));
        for (table, s) in &self.tables {
            let (rcu, estimated) = s.rcu();
            out.push_str(&format!(
                "  {:<20} {:<40} {:>8} items {:>6} pages {:>10} bytes {:>9.1} RCU{}\n",
                table.to_string(),
                s.name,
                s.items,
                s.pages,
                s.bytes,
                rcu,
                if estimated { " (estimated)" } else { "" }
            ));
        }
        out.push_str(&format!(
            "  read capacity: {:.1} RCU{}\n",
            self.read_capacity_units,
            if self.estimated {
                " (estimated from item sizes where DynamoDB reported no consumed capacity: \
                 one RCU per 4 KB read strongly consistent, half that eventually consistent)"
            } else {
                " consumed, as DynamoDB reported it"
            }
        ));
        out.push_str("findings per invariant:\n");
        for (n, what) in INVARIANTS.iter().enumerate() {
            out.push_str(&format!("  {n}. {what}: {}\n", self.per_invariant[n]));
        }
        out.push_str(&if self.clean() {
            "no findings: every invariant holds\n".to_string()
        } else {
            format!("{} finding(s)\n", self.findings.len())
        });
        out
    }
}

/// Loads, checks and reports: the whole audit, as `saga-local audit` runs it and tests call it.
pub async fn audit(
    client: &aws_sdk_dynamodb::Client,
    tables: &TableNames,
    opts: &ScanOptions,
    rules: &Rules,
) -> Result<Report, AuditError> {
    let loaded = load(client, tables, opts).await?;
    let findings = check(&loaded.snapshot, rules);
    Ok(Report::new(&loaded, opts, findings))
}

/// The template's `OrderTimeoutSeconds` default (what the sweeper runs with unless deployed
/// with another value).
pub fn template_order_timeout(template: &Template) -> Option<u64> {
    template
        .parameter_value("OrderTimeoutSeconds")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 10_000_000;
    const LIMIT: Duration = Duration::from_secs(420);

    fn rules() -> Rules {
        Rules {
            now_ms: NOW,
            pending_limit: LIMIT,
        }
    }

    fn order(id: &str, status: OrderStatus, lines: &[(&str, u64)], total: u64) -> OrderRow {
        OrderRow {
            order_id: id.into(),
            status,
            items: lines
                .iter()
                .map(|(p, q)| OrderLine {
                    product_id: (*p).into(),
                    quantity: *q,
                    unit_price_cents: 0,
                })
                .collect(),
            total_cents: total,
            created_at_ms: NOW - 1_000,
        }
    }

    fn product(id: &str, quantity: i64, reserved: i64) -> ProductRow {
        ProductRow {
            product_id: id.into(),
            quantity,
            reserved,
        }
    }

    fn movement(product: &str, delta: i64) -> MovementRow {
        MovementRow {
            product_id: product.into(),
            movement_id: format!("{}", fastrand::u64(..)),
            delta,
            reason: "restock".into(),
        }
    }

    fn step(id: &str, outcome: Option<Outcome>, result: &str) -> IdempotencyRecord {
        IdempotencyRecord {
            id: id.into(),
            status: Status::Completed,
            payload_hash: "h".into(),
            in_progress_until_ms: None,
            expires_at: i64::MAX,
            result: Some(result.into()),
            order_id: None,
            outcome,
        }
    }

    fn reserve(order: &str) -> IdempotencyRecord {
        step(
            &format!("{order}#reserve"),
            Some(Outcome::Reserved),
            &format!(r#"{{"type":"StockReserved","orderId":"{order}"}}"#),
        )
    }

    fn release(order: &str) -> IdempotencyRecord {
        step(
            &format!("{order}#release"),
            Some(Outcome::Released),
            &format!(r#"{{"type":"StockReleased","orderId":"{order}"}}"#),
        )
    }

    fn ledger(order: &str, kind: LedgerKind, amount: u64, approved: bool) -> LedgerEntry {
        let suffix = if kind == LedgerKind::Charge {
            "charge"
        } else {
            "refund"
        };
        LedgerEntry {
            idempotency_key: format!("{order}#{suffix}#{}", fastrand::u32(..)),
            kind,
            order_id: order.into(),
            amount_cents: amount,
            charge: (kind == LedgerKind::Charge).then(|| {
                if approved {
                    ChargeOutcome::Approved {
                        payment_id: "ch_1".into(),
                    }
                } else {
                    ChargeOutcome::Declined {
                        reason: "CARD_DECLINED".into(),
                    }
                }
            }),
            refund: None,
            created_at: "2024-01-01T00:00:00Z".into(),
        }
    }

    /// A consistent store: p-a created with 10 and restocked by 5, p-b created with 4.
    /// o-1 confirmed (2 p-a, 1 p-b, 700 cents); o-2 cancelled after it was reserved and
    /// charged (released, refunded); o-3 cancelled, declined, stock rejected; o-4 pending,
    /// reserved and charged, young.
    fn clean() -> Snapshot {
        Snapshot {
            orders: vec![
                order(
                    "o-1",
                    OrderStatus::Confirmed,
                    &[("p-a", 2), ("p-b", 1)],
                    700,
                ),
                order("o-2", OrderStatus::Cancelled, &[("p-a", 3)], 900),
                order("o-3", OrderStatus::Cancelled, &[("p-b", 9)], 100),
                order("o-4", OrderStatus::Pending, &[("p-a", 1)], 300),
            ],
            products: vec![product("p-a", 15 - 2 - 1, 3), product("p-b", 3, 1)],
            movements: vec![movement("p-a", 10), movement("p-a", 5), movement("p-b", 4)],
            steps: vec![
                reserve("o-1"),
                reserve("o-2"),
                release("o-2"),
                step(
                    "o-3#reserve",
                    Some(Outcome::Rejected),
                    r#"{"type":"StockRejected"}"#,
                ),
                reserve("o-4"),
                step("api#c-1#key", None, r#"{"status":202}"#),
                step("o-1#charge", Some(Outcome::Charged), "{}"),
            ],
            ledger: vec![
                ledger("o-1", LedgerKind::Charge, 700, true),
                ledger("o-2", LedgerKind::Charge, 900, true),
                ledger("o-2", LedgerKind::Refund, 900, false),
                ledger("o-3", LedgerKind::Charge, 100, false),
                ledger("o-4", LedgerKind::Charge, 300, true),
            ],
            unreadable: vec![],
        }
    }

    fn findings(s: &Snapshot) -> Vec<Finding> {
        check(s, &rules())
    }

    #[test]
    fn when_every_invariant_holds_should_find_nothing() {
        assert_eq!(findings(&clean()), vec![]);
        assert_eq!(findings(&Snapshot::default()), vec![]);
    }

    #[test]
    fn when_stock_is_negative_should_report_invariant_1() {
        let mut s = clean();
        // An adjustment that bypassed the check: recorded, and below zero.
        s.products[1].quantity = -1;
        s.movements.push(movement("p-b", -4));
        let f = findings(&s);
        assert_eq!(
            f,
            vec![Finding::NegativeStock {
                product_id: "p-b".into(),
                quantity: -1,
                reserved: 1
            }]
        );
        assert_eq!(f[0].invariant(), 1);
        assert!(f[0].to_string().starts_with("invariant 1 "), "{}", f[0]);
    }

    #[test]
    fn when_reserved_drifts_from_the_reservations_should_report_invariant_2() {
        let mut s = clean();
        s.products[0].reserved += 1;
        s.products[0].quantity -= 1;
        assert_eq!(
            findings(&s),
            vec![Finding::ReservedMismatch {
                product_id: "p-a".into(),
                reserved: 4,
                held: 3,
                orders: vec!["o-1".into(), "o-4".into()],
            }]
        );
    }

    #[test]
    fn when_a_live_reservation_has_no_order_should_report_invariant_2() {
        let mut s = clean();
        s.steps.push(reserve("o-ghost"));
        assert_eq!(
            findings(&s),
            vec![Finding::ReservationWithoutOrder {
                order_id: "o-ghost".into()
            }]
        );
    }

    #[test]
    fn when_a_movement_is_missing_should_report_invariant_3() {
        let mut s = clean();
        s.movements.remove(1);
        assert_eq!(
            findings(&s),
            vec![Finding::MovementsMismatch {
                product_id: "p-a".into(),
                quantity: 12,
                reserved: 3,
                legacy_held: 0,
                movements: 1,
                movements_sum: 10,
            }]
        );
    }

    #[test]
    fn when_a_reservation_is_of_the_previous_version_should_count_it_beside_reserved() {
        let mut s = clean();
        // o-5, confirmed by the previous version: 2 units of p-b taken from quantity only.
        s.orders
            .push(order("o-5", OrderStatus::Confirmed, &[("p-b", 2)], 50));
        s.products[1].quantity -= 2;
        s.steps.push(step(
            "o-5#reserve",
            None,
            r#"{"type":"StockReserved","orderId":"o-5"}"#,
        ));
        s.ledger.push(ledger("o-5", LedgerKind::Charge, 50, true));
        assert_eq!(findings(&s), vec![]);
        // Released (by a release of the previous version, too): back in quantity.
        s.orders[4].status = OrderStatus::Cancelled;
        s.products[1].quantity += 2;
        s.steps.push(step(
            "o-5#release",
            None,
            r#"{"type":"StockReleased","orderId":"o-5"}"#,
        ));
        s.ledger.push(ledger("o-5", LedgerKind::Refund, 50, false));
        assert_eq!(findings(&s), vec![]);
        // Its release record gone, the units still held: a cancelled order holding stock (and
        // only that: invariants 2 and 3 count the units where the previous version kept them).
        s.steps.pop();
        s.products[1].quantity -= 2;
        let f = findings(&s);
        assert_eq!(
            f,
            vec![Finding::CancelledStillReserved {
                order_id: "o-5".into()
            }]
        );
    }

    #[test]
    fn when_a_confirmed_order_lost_its_reservation_should_report_invariant_4() {
        let mut s = clean();
        // A stray release of o-1: units back in quantity, reserved consistent.
        s.steps.push(release("o-1"));
        s.products[0].reserved -= 2;
        s.products[0].quantity += 2;
        s.products[1].reserved -= 1;
        s.products[1].quantity += 1;
        assert_eq!(
            findings(&s),
            vec![Finding::ConfirmedWithoutReservation {
                order_id: "o-1".into()
            }]
        );
    }

    #[test]
    fn when_a_confirmed_order_is_charged_twice_or_refunded_should_report_invariants_4_and_7() {
        let mut s = clean();
        s.ledger.push(ledger("o-1", LedgerKind::Charge, 700, true));
        assert_eq!(
            findings(&s),
            vec![
                Finding::ConfirmedNotChargedOnce {
                    order_id: "o-1".into(),
                    charges: 2,
                    refunds: 0
                },
                Finding::LedgerMismatch {
                    charged_cents: 2300,
                    refunded_cents: 900,
                    confirmed_cents: 700,
                    orders: vec!["o-1".into()],
                },
            ]
        );
        let mut s = clean();
        s.ledger.push(ledger("o-1", LedgerKind::Refund, 700, false));
        let f = findings(&s);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            f[0],
            Finding::ConfirmedNotChargedOnce {
                order_id: "o-1".into(),
                charges: 1,
                refunds: 1
            }
        );
    }

    #[test]
    fn when_a_cancelled_order_still_holds_stock_or_money_should_report_invariant_5() {
        let mut s = clean();
        // o-2's release record gone: its reservation is live again.
        s.steps.retain(|r| r.id != "o-2#release");
        assert_eq!(
            findings(&s),
            vec![
                Finding::ReservedMismatch {
                    product_id: "p-a".into(),
                    reserved: 3,
                    held: 6,
                    orders: vec!["o-1".into(), "o-2".into(), "o-4".into()],
                },
                Finding::CancelledStillReserved {
                    order_id: "o-2".into()
                },
            ]
        );
        let mut s = clean();
        s.ledger.retain(|e| e.kind != LedgerKind::Refund);
        assert_eq!(
            findings(&s),
            vec![
                Finding::CancelledNotRefunded {
                    order_id: "o-2".into(),
                    charges: 1,
                    refunds: 0
                },
                Finding::LedgerMismatch {
                    charged_cents: 1600,
                    refunded_cents: 0,
                    confirmed_cents: 700,
                    orders: vec!["o-2".into()],
                },
            ]
        );
    }

    #[test]
    fn when_an_order_is_pending_past_the_timeout_and_grace_should_report_invariant_6() {
        let mut s = clean();
        let limit = LIMIT.as_millis() as i64;
        s.orders[3].created_at_ms = NOW - limit;
        assert_eq!(findings(&s), vec![], "at the limit: not yet");
        s.orders[3].created_at_ms = NOW - limit - 1_000;
        assert_eq!(
            findings(&s),
            vec![Finding::PendingPastTimeout {
                order_id: "o-4".into(),
                age_seconds: 421,
                limit_seconds: 420
            }]
        );
    }

    #[test]
    fn when_the_ledger_disagrees_with_the_confirmed_totals_should_report_invariant_7() {
        let mut s = clean();
        s.orders[0].total_cents = 701;
        assert_eq!(
            findings(&s),
            vec![Finding::LedgerMismatch {
                charged_cents: 1600,
                refunded_cents: 900,
                confirmed_cents: 701,
                orders: vec!["o-1".into()],
            }]
        );
        // A charge of an order that does not exist counts, and is named.
        let mut s = clean();
        s.ledger.push(ledger("o-lost", LedgerKind::Charge, 5, true));
        assert_eq!(
            findings(&s),
            vec![Finding::LedgerMismatch {
                charged_cents: 1605,
                refunded_cents: 900,
                confirmed_cents: 700,
                orders: vec!["o-lost".into()],
            }]
        );
    }

    #[test]
    fn when_an_item_cannot_be_read_should_report_it() {
        let mut s = clean();
        s.unreadable.push(Unreadable {
            table: Table::Orders,
            key: "o-9".into(),
            error: "missing field `status`".into(),
        });
        let f = findings(&s);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].invariant(), 0);
        assert!(
            f[0].to_string().contains("OrdersTable item o-9"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn every_finding_names_its_invariant_and_ids_on_one_line() {
        let mut s = clean();
        s.products[0].quantity = -20;
        s.steps.push(reserve("o-ghost"));
        s.orders[3].created_at_ms = 0;
        for f in findings(&s) {
            let line = f.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(line.starts_with(&format!("invariant {} (", f.invariant())));
            assert!(
                line.contains("p-a") || line.contains("o-ghost") || line.contains("o-4"),
                "{line}"
            );
        }
    }

    #[test]
    fn the_capacity_estimate_rounds_pages_up_to_4_kb_and_halves_eventual_reads() {
        assert_eq!(page_rcu(0, true), 1.0);
        assert_eq!(page_rcu(4096, true), 1.0);
        assert_eq!(page_rcu(4097, true), 2.0);
        assert_eq!(page_rcu(4097, false), 1.0);
        let item: Item = [
            ("id".to_string(), AttributeValue::S("abc".into())),
            ("n".to_string(), AttributeValue::N("12345".into())),
            (
                "m".to_string(),
                AttributeValue::M([("k".to_string(), AttributeValue::Bool(true))].into()),
            ),
        ]
        .into();
        // "id"+3, "n"+4, "m"+(3+1+1+1)
        assert_eq!(item_size(&item), 2 + 3 + 1 + 4 + 1 + 6);
    }

    #[test]
    fn the_report_states_the_cost_and_counts_findings_per_invariant() {
        let mut stats = BTreeMap::new();
        for t in Table::ALL {
            stats.insert(
                t,
                TableStats {
                    name: format!("x-{t}"),
                    items: 3,
                    pages: 1,
                    bytes: 300,
                    consumed_rcu: (t == Table::Orders).then_some(0.5),
                    estimated_rcu: 0.5,
                },
            );
        }
        let loaded = Loaded {
            snapshot: Snapshot::default(),
            stats,
            elapsed: Duration::from_millis(1500),
        };
        let mut s = clean();
        s.orders[0].total_cents = 1;
        let report = Report::new(&loaded, &ScanOptions::default(), findings(&s));
        assert!(!report.clean());
        assert_eq!(report.per_invariant, [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(report.read_capacity_units, 2.5);
        assert!(report.estimated);
        let text = report.text();
        assert!(text.starts_with("FINDING invariant 7 "), "{text}");
        assert!(text.contains("read capacity: 2.5 RCU (estimated"), "{text}");
        assert!(text.contains("x-OrdersTable"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["findings"][0]["kind"], "ledgerMismatch");
        assert_eq!(json["findings"][0]["orders"][0], "o-1");
    }
}
