//! Backlog: 5,000 messages wait in the three work queues while every consumer is held back,
//! then the consumers are released at once. The local stack must drain it the way Lambda
//! would: every message processed, no good message dead-lettered (no receive count climbing
//! to maxReceiveCount because invocations outlived their visibility), and the saga's
//! invariants intact.
//!
//! The backlog is what a real outage leaves behind: 1,000 orders placed while the consumers
//! were down (a ReserveStock and a ChargePayment each), every one of those commands delivered
//! twice (at-least-once), and the sweeper having handed all 1,000 orders to the coordinator as
//! timed out. The coordinator therefore races timeouts against results, and compensation runs
//! for whatever was reserved or charged before the timeout won.

use std::time::{Duration, Instant};

use futures::StreamExt;
use saga_core::messages::{PaymentCommand, StockCommand};
use saga_tests::logs::count_logs;
use saga_tests::{TestStack, assert_invariants};
use serde_json::{Value, json};

const ORDERS: usize = 1_000;
const MESSAGES: i64 = 5_000;
/// No work queue changing for this long means the drain stalled.
const STALL_LIMIT: Duration = Duration::from_secs(240);
/// A drain that has not finished after this long is not keeping up with any reasonable
/// machine (it takes about 4 minutes on a quiet 2-core one).
const DRAIN_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The commands the API sent for an order, rebuilt from it (to deliver them a second time).
fn commands(o: &Value) -> [String; 2] {
    let order_id = o["orderId"].as_str().expect("orderId").to_string();
    let items = serde_json::from_value(json!(
        o["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| json!({"productId": i["productId"], "quantity": i["quantity"]}))
            .collect::<Vec<_>>()
    ))
    .expect("stock lines");
    let reserve = StockCommand::ReserveStock {
        order_id: order_id.clone(),
        items,
    };
    let charge = PaymentCommand::ChargePayment {
        order_id,
        customer_id: o["customerId"].as_str().expect("customerId").to_string(),
        amount_cents: o["totalCents"].as_u64().expect("totalCents"),
        payment_method: o["paymentMethod"]
            .as_str()
            .unwrap_or("tok_visa")
            .to_string(),
    };
    [
        serde_json::to_string(&reserve).expect("json"),
        serde_json::to_string(&charge).expect("json"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_5000_messages_wait_for_released_consumers_should_process_all_without_dead_letters_and_keep_every_invariant()
 {
    let logs = count_logs();
    let consumers = ["StockFunction", "PaymentFunction", "CoordinatorFunction"];
    let t = TestStack::start_with(|o| {
        o.paused = consumers.iter().map(|c| c.to_string()).collect();
        o.env_overrides
            .insert("ORDER_TIMEOUT_SECONDS".into(), "1".into());
        o.env_overrides
            .insert("PAYMENT_FAILURE_RATE".into(), "0.1".into());
    })
    .await;
    let products = saga_tests::catalogue("p-backlog", 5, 300, 100);
    let initial = t.stock_catalogue(&products, |_| 199).await;

    // 1,000 orders while the consumers are down: 2,000 commands.
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..ORDERS)
        .map(|_| {
            let t = &t;
            let items = saga_tests::random_basket(&products);
            async move {
                let items: Vec<(&str, u64)> = items.iter().map(|(p, q)| (p.as_str(), *q)).collect();
                t.place_ok(&items, None).await
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let placed_in = started.elapsed();

    // Each command a second time: 2,000 more.
    let orders = t.all_orders().await;
    let duplicates: Vec<(&str, String)> = ids
        .iter()
        .flat_map(|id| {
            let [reserve, charge] = commands(&orders[id]);
            [("StockQueue", reserve), ("PaymentQueue", charge)]
        })
        .collect();
    futures::stream::iter(duplicates.iter())
        .map(|(queue, body)| t.send(queue, body))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;

    // The sweeper finds every order past its (1 s) timeout: 1,000 OrderTimedOut.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let swept = t.stack.sweep_now().await.expect("sweep")["timedOut"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        swept, ORDERS as u64,
        "every held-back order is past its timeout"
    );

    let depths: Vec<(&str, i64)> = {
        let mut d = Vec::new();
        for q in ["StockQueue", "PaymentQueue", "CoordinatorQueue"] {
            d.push((q, t.queue_depth(q).await));
        }
        d
    };
    let queued: i64 = depths.iter().map(|(_, n)| n).sum();
    assert_eq!(queued, MESSAGES, "the backlog before release: {depths:?}");
    assert_eq!(t.dead_letters().await, 0);
    eprintln!(
        "backlog: {ORDERS} orders placed in {placed_in:?}; {queued} messages queued ({depths:?})"
    );

    // Release every consumer at once and watch the backlog drain.
    let released = Instant::now();
    for c in consumers {
        t.stack.set_paused(c, false);
    }
    // Progress is any change in the work queues: the total can grow for minutes while the
    // stock and payment functions turn commands into results faster than the coordinator
    // takes them, so "not below its lowest yet" is no sign of a stall; nothing moving is.
    let mut peak = queued;
    let mut samples = Vec::new();
    let mut last: (Instant, Vec<(i64, i64)>) = (Instant::now(), Vec::new());
    loop {
        let mut queues = Vec::new();
        for q in ["StockQueue", "PaymentQueue", "CoordinatorQueue"] {
            queues.push(t.queue_counts(q).await);
        }
        let backlog: i64 = queues.iter().map(|(v, f)| v + f).sum();
        let dead = t.dead_letters().await;
        assert_eq!(
            dead, 0,
            "a good message was dead-lettered (backlog {backlog})"
        );
        peak = peak.max(backlog);
        samples.push((released.elapsed().as_secs(), backlog));
        if backlog == 0 {
            break;
        }
        if queues != last.1 {
            last = (Instant::now(), queues);
        }
        let stalled = last.0.elapsed() >= STALL_LIMIT;
        if stalled || released.elapsed() >= DRAIN_LIMIT {
            panic!(
                "{}; (visible, in flight) of the stock, payment and coordinator queues: {:?}; \
                 logs: {logs:?}; depth per second: {samples:?}; the stack's log, {}, ends:\n{}",
                if stalled {
                    format!("no work queue has changed for {STALL_LIMIT:?}")
                } else {
                    format!("the backlog is not drained after {DRAIN_LIMIT:?}")
                },
                last.1,
                saga_tests::logs::log_path().display(),
                saga_tests::logs::log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let drained_in = released.elapsed();

    let settled = t.wait_all_settled(&ids, STALL_LIMIT).await;
    assert_eq!(
        t.backlog().await,
        0,
        "settling sent more work: {}",
        t.backlog().await
    );
    assert_eq!(t.dead_letters().await, 0, "dead letters after the drain");
    let count = |f: &dyn Fn(&Value) -> bool| settled.iter().filter(|o| f(o)).count();
    let confirmed = count(&|o| o["status"] == "CONFIRMED");
    let timed_out = count(&|o| o["cancelReason"] == "TIMEOUT");
    eprintln!(
        "backlog: {MESSAGES} messages drained in {drained_in:?} (peak depth {peak}, including the \
         results and compensations they caused): {confirmed} confirmed, {timed_out} timed out, \
         {} otherwise cancelled; logs: {logs:?}; depth per second: {samples:?}",
        settled.len() - confirmed - timed_out
    );
    assert!(timed_out > 0, "the timeouts should win some races");
    assert_invariants(&t, &settled, &initial).await;
    t.stop().await;
}
