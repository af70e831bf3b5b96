//! Chaos: 300 orders placed concurrently while every fault point crashes at random, the
//! event source mappings deliver messages twice and the payment provider declines at random.
//!
//! A crash of the order API itself answers 500: the client does not know whether its order
//! exists, so it retries with the same `Idempotency-Key` (and body) until it gets 202; every
//! retry must finish the same order. Afterwards every order the API ever named exists and is
//! final, and the saga's invariants hold against the stores. Messages that used up their
//! receives land in a DLQ; they are redriven, and the sweeper times out whatever is still
//! pending, before the invariants are checked: a dead-lettered step is a delay, never a
//! lost or corrupted order. `saga-local audit` then finds nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use saga_core::faults::{FaultPoint, Faults};
use saga_tests::logs::count_logs;
use saga_tests::{Pacer, TestStack, assert_invariants};
use serde_json::Value;

const ORDERS: usize = 300;
const CONCURRENCY: usize = 30;
/// Per fault point; `CHAOS_CRASH_RATE=0.2` runs a harsher storm (more dead letters to recover).
fn crash_rate() -> f64 {
    std::env::var("CHAOS_CRASH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.07)
}
const DUPLICATE_RATE: f64 = 0.2;
const DECLINE_RATE: &str = "0.2";
/// The sweeper's cut-off while stragglers are resolved.
const ORDER_TIMEOUT_SECONDS: &str = "20";
/// How long the saga gets to settle on its own before DLQs are redriven and the sweeper runs.
const NATURAL_SETTLE: Duration = Duration::from_secs(45);
/// No order settling for this long means something is stuck for good.
const STALL_LIMIT: Duration = Duration::from_secs(240);
/// Placement waits while the work queues hold this many messages: a slow machine makes the
/// test slower, never a backlog the SQS stand-in drowns in.
const BACKLOG_BOUND: i64 = 200;
/// How long one order's key may go without a 202 before the test gives up on it.
const ACCEPT_WITHIN: Duration = Duration::from_secs(300);

/// What placing the orders took.
#[derive(Default, Debug)]
struct Placement {
    attempts: AtomicUsize,
    crashed: AtomicUsize,
    unavailable: AtomicUsize,
    in_progress: AtomicUsize,
    replayed: AtomicUsize,
    /// Orders whose first answer was not 202: the client did not know whether they existed.
    in_doubt: AtomicUsize,
}

/// Places one order with an Idempotency-Key, retrying the same key and body until 202.
/// Returns every order id any answer named (there must be exactly one).
async fn place_until_accepted(
    t: &TestStack,
    pacer: &Pacer<'_>,
    body: &Value,
    p: &Placement,
) -> HashSet<String> {
    pacer.admit().await;
    let key = uuid::Uuid::new_v4().to_string();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + ACCEPT_WITHIN;
    let mut backoff =
        local_runner::pacing::backoff(Duration::from_millis(200), Duration::from_secs(1));
    let mut first = true;
    loop {
        p.attempts.fetch_add(1, Ordering::Relaxed);
        let r = t
            .request("POST", "/orders", Some(body), &[("idempotency-key", &key)])
            .await;
        if let Some(id) = r.body["orderId"].as_str() {
            ids.insert(id.to_string());
        }
        match r.status {
            202 => {
                if r.headers.contains_key("idempotent-replayed") {
                    p.replayed.fetch_add(1, Ordering::Relaxed);
                }
                return ids;
            }
            500 => {
                assert_eq!(
                    r.body["error"]["code"], "INJECTED_CRASH",
                    "an unexpected 500: {}",
                    r.raw
                );
                p.crashed.fetch_add(1, Ordering::Relaxed)
            }
            503 => p.unavailable.fetch_add(1, Ordering::Relaxed),
            409 => p.in_progress.fetch_add(1, Ordering::Relaxed),
            other => panic!("placing an order answered {other}: {}", r.raw),
        };
        if first {
            first = false;
            p.in_doubt.fetch_add(1, Ordering::Relaxed);
        }
        assert!(
            Instant::now() < deadline,
            "key {key} got no 202 within {ACCEPT_WITHIN:?}; last answer {} {}",
            r.status,
            r.raw
        );
        // A crashed request holds its key until its deadline (the function timeout in force).
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_300_orders_meet_random_crashes_duplicates_and_declines_should_lose_none_and_keep_every_invariant()
 {
    let logs = count_logs();
    let rate = crash_rate();
    let t = TestStack::start_with(|o| {
        o.faults = Faults::none()
            .with(FaultPoint::AfterWrite, rate)
            .with(FaultPoint::AfterPublish, rate)
            .with(FaultPoint::InPayment, rate);
        o.duplicate_rate = DUPLICATE_RATE;
        o.env_overrides
            .insert("PAYMENT_FAILURE_RATE".into(), DECLINE_RATE.into());
        o.env_overrides
            .insert("ORDER_TIMEOUT_SECONDS".into(), ORDER_TIMEOUT_SECONDS.into());
    })
    .await;
    let products = saga_tests::catalogue("p-chaos", 5, 40, 15);
    let initial = t.stock_catalogue(&products, |qty| 250 + qty as u64).await;

    let bodies: Vec<Value> = (0..ORDERS)
        .map(|_| saga_tests::order_request(&saga_tests::random_basket(&products)))
        .collect();

    let started = Instant::now();
    let placement = Placement::default();
    let pacer = Pacer::new(&t, BACKLOG_BOUND);
    let answers: Vec<HashSet<String>> = futures::stream::iter(bodies.iter())
        .map(|body| place_until_accepted(&t, &pacer, body, &placement))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let placed_in = started.elapsed();

    // One order per key, whatever the retries went through.
    for ids in &answers {
        assert_eq!(ids.len(), 1, "one key named several orders: {ids:?}");
    }
    let ids: Vec<String> = answers
        .iter()
        .flat_map(|s| s.iter().cloned())
        .collect::<Vec<_>>();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ORDERS,
        "two keys named the same order"
    );

    // Let the saga settle; then redrive dead letters and sweep stragglers until it has, and
    // let every message still around be processed so the invariants see all effects.
    let recovery = t
        .settle_with_recovery(&ids, "chaos", NATURAL_SETTLE, STALL_LIMIT)
        .await;
    let settled_in = started.elapsed();
    let (peak_backlog, paced) = pacer.report().await;

    let table = t.all_orders().await;
    assert_eq!(
        table.len(),
        ORDERS,
        "the table holds orders no answer named (a retry created a second order?)"
    );
    let orders = t.wait_all_settled(&ids, Duration::from_secs(10)).await;
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    let reason = |r: &str| orders.iter().filter(|o| o["cancelReason"] == r).count();
    let refunded = orders
        .iter()
        .filter(|o| o["paymentStatus"] == "REFUNDED")
        .count();
    eprintln!(
        "chaos (crash rate {rate}): {ORDERS} orders placed in {placed_in:?}, settled after {settled_in:?}: \
         {confirmed} confirmed, {} declined, {} short of stock, {} timed out, {refunded} refunded; \
         placement: {placement:?}; crashes injected (after_write, after_publish, in_payment): \
         {:?}; logs: {logs:?}; dead letters redriven: {}; swept: {} in \
         {} recovery rounds; backlog peaked at {peak_backlog} messages, placement waited \
         {paced} times",
        reason("PAYMENT_DECLINED"),
        reason("INSUFFICIENT_STOCK"),
        reason("TIMEOUT"),
        logs.crashes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<_>>(),
        recovery.redriven,
        recovery.swept,
        recovery.rounds,
    );
    assert!(confirmed > 0, "nothing confirmed");
    assert!(
        reason("PAYMENT_DECLINED") > 0 && reason("INSUFFICIENT_STOCK") > 0,
        "the mix should exercise declines and shortages"
    );
    assert!(
        logs.crashes.iter().all(|c| c.load(Ordering::Relaxed) > 0),
        "every fault point should have fired"
    );
    assert_invariants(&t, &orders, &initial).await;
    // And the stores themselves, audited as `saga-local audit` does.
    let report = t.audit().await;
    eprintln!("chaos: audit:\n{}", report.text());
    assert!(report.clean(), "the audit found:\n{}", report.text());
    t.stop().await;
}
