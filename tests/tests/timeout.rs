//! The timeout sweeper: an order still PENDING after ORDER_TIMEOUT_SECONDS is cancelled with
//! cancelReason TIMEOUT, found through the sparse PendingOrdersIndex (a query, not a scan) and
//! cancelled with a conditional update, so a sweep racing a late confirmation cannot corrupt
//! the order; results that arrive after the timeout are compensated. Tested with a short
//! timeout and a consumer held back.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use saga_core::adapters::orders::DynamoOrders;
use saga_core::messages::SagaEvent;
use saga_core::ports::{FactUpdate, Orders, Update};
use saga_core::saga::Fact;
use saga_tests::{TestStack, assert_invariants};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(120);

fn short_timeout(o: &mut local_runner::stack::StackOptions, seconds: u64) {
    o.env_overrides
        .insert("ORDER_TIMEOUT_SECONDS".into(), seconds.to_string());
}

/// Polls the order until `pred` holds.
async fn wait_for(t: &TestStack, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let o = t.order(id).await;
        if pred(&o) {
            return o;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "order {id}: never {what}: {o}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a queue holds at least `n` messages.
async fn wait_depth(t: &TestStack, queue: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while t.queue_depth(queue).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} never held {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn timed_out(sweep: Option<Value>) -> u64 {
    sweep.expect("the sweep ran")["timedOut"]
        .as_u64()
        .expect("a count")
}

/// Order ids in the sweeper's index (the sparse PendingOrdersIndex), straight from DynamoDB.
async fn pending_index(t: &TestStack) -> Vec<String> {
    let index = t.stack.environments["SweeperFunction"]["ORDERS_PENDING_INDEX"].clone();
    let out = t
        .stack
        .clients
        .dynamodb
        .query()
        .table_name(t.stack.table("OrdersTable"))
        .index_name(index)
        .key_condition_expression("pendingSweep = :pending")
        .expression_attribute_values(
            ":pending",
            AttributeValue::S(saga_core::domain::PENDING_SWEEP.into()),
        )
        .send()
        .await
        .expect("query the pending-orders index");
    out.items
        .unwrap_or_default()
        .iter()
        .map(|i| i["orderId"].as_s().expect("orderId").clone())
        .collect()
}

fn ledger_count(ledger: &[(String, String, Option<String>)], kind: &str, id: &str) -> usize {
    ledger
        .iter()
        .filter(|(k, o, _)| k == kind && o == id)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_payment_is_held_back_past_the_timeout_should_cancel_with_timeout_and_refund_the_late_charge()
 {
    let t = TestStack::start_with(|o| {
        o.paused = vec!["PaymentFunction".into()];
        short_timeout(o, 2);
    })
    .await;
    t.put_product("p-late", 400, 5).await;
    let placed = std::time::Instant::now();
    let id = t.place_ok(&[("p-late", 2)], None).await;
    wait_for(&t, &id, "reserved", |o| o["stockStatus"] == "RESERVED").await;
    assert_eq!(t.product_quantity("p-late").await, 3);

    // Not yet past the timeout: the sweep leaves it alone. (Only checkable if the sweep
    // finished within the timeout of the placement: on a slow machine it may not have.)
    let early = timed_out(t.stack.sweep_now().await);
    if placed.elapsed() < Duration::from_millis(1_900) {
        assert_eq!(early, 0);
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(timed_out(t.stack.sweep_now().await), 1);

    let o = wait_for(&t, &id, "cancelled", |o| o["status"] == "CANCELLED").await;
    assert_eq!(o["cancelReason"], "TIMEOUT", "{o}");
    assert_eq!(o["paymentStatus"], "PENDING", "{o}");
    // The step that had succeeded is compensated at once.
    wait_for(&t, &id, "released", |o| o["stockStatus"] == "RELEASED").await;
    assert_eq!(t.product_quantity("p-late").await, 5);
    assert!(
        pending_index(&t).await.is_empty(),
        "a cancelled order left in the index"
    );

    // The payment arrives after the timeout: charged, then refunded exactly once.
    t.stack.set_paused("PaymentFunction", false);
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["cancelReason"], "TIMEOUT");
    assert_eq!(o["paymentStatus"], "REFUNDED", "{o}");
    let ledger = t.ledger().await;
    assert_eq!(ledger_count(&ledger, "CHARGE", &id), 1, "{ledger:?}");
    assert_eq!(ledger_count(&ledger, "REFUND", &id), 1, "{ledger:?}");
    assert_eq!(t.product_quantity("p-late").await, 5);
    assert_invariants(&t, &[o], &HashMap::from([("p-late".to_string(), 5)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_both_steps_succeeded_but_confirmation_is_not_applied_a_sweep_should_confirm_not_cancel()
 {
    let t = TestStack::start_with(|o| {
        o.paused = vec!["CoordinatorFunction".into()];
        short_timeout(o, 2);
    })
    .await;
    t.put_product("p-race", 600, 4).await;
    let id = t.place_ok(&[("p-race", 1)], None).await;

    // Both results reach the coordinator queue. A coordinator takes them, applies both with its
    // conditional updates, and dies before confirming: the messages stay in the queue.
    wait_depth(&t, "CoordinatorQueue", 2).await;
    let results = t.drain("CoordinatorQueue").await;
    assert_eq!(results.len(), 2, "{results:?}");
    let store = DynamoOrders::new(
        t.stack.clients.dynamodb.clone(),
        t.stack.table("OrdersTable"),
    );
    for body in &results {
        let update = match serde_json::from_str::<SagaEvent>(body).expect("a saga event") {
            SagaEvent::StockReserved { .. } => FactUpdate::new(Fact::StockReserved),
            SagaEvent::PaymentCharged { payment_id, .. } => FactUpdate {
                payment_id: Some(payment_id),
                ..FactUpdate::new(Fact::PaymentCharged)
            },
            other => panic!("unexpected result {other:?}"),
        };
        let applied = store
            .apply(&id, &update, saga_core::time::now_ms())
            .await
            .expect("apply");
        assert!(matches!(applied, Update::Applied(_)), "{applied:?}");
    }
    let o = t.order(&id).await;
    assert_eq!(
        (&o["status"], &o["stockStatus"], &o["paymentStatus"]),
        (
            &Value::from("PENDING"),
            &Value::from("RESERVED"),
            &Value::from("CHARGED")
        ),
        "{o}"
    );

    // Past the timeout the sweeper still finds it (it is pending) and hands it over...
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(timed_out(t.stack.sweep_now().await), 1);
    // ...but the timeout's conditional update refuses to cancel a reserved and charged order.
    let direct = store
        .apply(
            &id,
            &FactUpdate {
                cutoff_ms: Some(saga_core::time::now_ms()),
                ..FactUpdate::new(Fact::TimedOut)
            },
            saga_core::time::now_ms(),
        )
        .await
        .expect("apply");
    assert!(
        matches!(direct, Update::NotApplicable(_)),
        "a timeout cancelled a reserved and charged order: {direct:?}"
    );

    // The crashed coordinator's messages come back, and the coordinator runs again.
    for body in &results {
        t.send("CoordinatorQueue", body).await;
    }
    t.stack.set_paused("CoordinatorFunction", false);
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert!(o.get("cancelReason").is_none(), "{o}");
    let ledger = t.ledger().await;
    assert_eq!(ledger_count(&ledger, "REFUND", &id), 0, "{ledger:?}");
    assert_eq!(t.product_quantity("p-race").await, 3);
    assert_invariants(&t, &[o], &HashMap::from([("p-race".to_string(), 4)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_sweep_races_the_results_in_the_coordinator_queue_should_end_either_confirmed_or_fully_compensated()
 {
    // The results and the timeout reach the coordinator together, in whatever order its
    // pollers take them: each order ends CONFIRMED, or CANCELLED for TIMEOUT with both of its
    // successful steps compensated once. Never anything in between.
    let t = TestStack::start_with(|o| {
        o.paused = vec!["CoordinatorFunction".into()];
        short_timeout(o, 2);
    })
    .await;
    t.put_product("p-race2", 600, 20).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(t.place_ok(&[("p-race2", 2)], None).await);
    }
    wait_depth(&t, "CoordinatorQueue", 12).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(timed_out(t.stack.sweep_now().await), 6);
    t.stack.set_paused("CoordinatorFunction", false);
    let orders = t.wait_all_settled(&ids, SETTLE).await;
    for o in &orders {
        match o["status"].as_str() {
            Some("CONFIRMED") => assert!(o.get("cancelReason").is_none(), "{o}"),
            Some("CANCELLED") => {
                assert_eq!(o["cancelReason"], "TIMEOUT", "{o}");
                assert_eq!(o["stockStatus"], "RELEASED", "{o}");
                assert_eq!(o["paymentStatus"], "REFUNDED", "{o}");
            }
            _ => panic!("not final: {o}"),
        }
    }
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    eprintln!(
        "sweep race: {confirmed} of {} confirmed, the rest timed out and compensated",
        orders.len()
    );
    assert_invariants(&t, &orders, &HashMap::from([("p-race2".to_string(), 20)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_sweeper_runs_on_its_schedule_should_time_out_a_held_back_order_without_being_called()
 {
    let t = TestStack::start_with(|o| {
        o.paused = vec!["StockFunction".into()];
        o.sweep_every = Some(Duration::from_secs(1));
        short_timeout(o, 2);
    })
    .await;
    t.put_product("p-sched", 350, 3).await;
    let id = t.place_ok(&[("p-sched", 3)], None).await;
    let started = std::time::Instant::now();
    let o = wait_for(&t, &id, "cancelled by the schedule", |o| {
        o["status"] == "CANCELLED"
    })
    .await;
    let after = started.elapsed();
    assert_eq!(o["cancelReason"], "TIMEOUT", "{o}");
    assert!(
        after >= Duration::from_millis(1_500),
        "cancelled before the timeout: {after:?}"
    );
    eprintln!("the schedule cancelled the order {after:?} after its placement");

    // The held-back reservation arrives late: it is made, then released; the charge refunded.
    t.stack.set_paused("StockFunction", false);
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["cancelReason"], "TIMEOUT");
    assert_eq!(o["stockStatus"], "RELEASED", "{o}");
    assert_eq!(o["paymentStatus"], "REFUNDED", "{o}");
    assert_eq!(t.product_quantity("p-sched").await, 3);
    assert_invariants(&t, &[o], &HashMap::from([("p-sched".to_string(), 3)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_an_order_is_confirmed_or_cancelled_should_leave_the_pending_index_and_never_be_swept()
{
    let t = TestStack::start_with(|o| {
        o.paused = vec!["CoordinatorFunction".into()];
        short_timeout(o, 1);
    })
    .await;
    t.put_product("p-idx", 500, 5).await;
    let ok = t.place_ok(&[("p-idx", 1)], None).await;
    let declined = t
        .place_ok(&[("p-idx", 1)], Some("tok_chargeDeclined"))
        .await;

    // While pending, both are in the sparse index the sweeper queries.
    let mut pending = pending_index(&t).await;
    pending.sort();
    let mut both = vec![ok.clone(), declined.clone()];
    both.sort();
    assert_eq!(pending, both);

    t.stack.set_paused("CoordinatorFunction", false);
    let confirmed = t.wait_settled(&ok, SETTLE).await;
    assert_eq!(confirmed["status"], "CONFIRMED", "{confirmed}");
    let cancelled = t.wait_settled(&declined, SETTLE).await;
    assert_eq!(cancelled["cancelReason"], "PAYMENT_DECLINED", "{cancelled}");

    assert!(
        pending_index(&t).await.is_empty(),
        "a finished order is still in the pending index"
    );
    let item = t
        .stack
        .clients
        .dynamodb
        .get_item()
        .table_name(t.stack.table("OrdersTable"))
        .key("orderId", AttributeValue::S(ok.clone()))
        .consistent_read(true)
        .send()
        .await
        .expect("get order")
        .item
        .expect("the order");
    assert!(
        !item.contains_key("pendingSweep"),
        "pendingSweep kept: {item:?}"
    );

    // Well past the timeout, a sweep finds nothing and changes nothing.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(timed_out(t.stack.sweep_now().await), 0);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(t.order(&ok).await["status"], "CONFIRMED");
    assert_eq!(t.order(&declined).await["cancelReason"], "PAYMENT_DECLINED");
    assert_invariants(
        &t,
        &[confirmed, cancelled],
        &HashMap::from([("p-idx".to_string(), 5)]),
    )
    .await;
    t.stop().await;
}

// The Idempotency-Key takeover path must not start the saga of an order the sweeper already
// finished: the card would be charged and refunded, the stock reserved and released, for an
// order that was over.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_client_retries_an_order_that_timed_out_should_not_start_its_saga_again() {
    // The API crashed after writing the order, before sending its messages; the sweeper
    // cancelled it; then the client retries with the same Idempotency-Key.
    let crashing = TestStack::start_with(|o| {
        o.faults =
            saga_core::faults::Faults::none().with(saga_core::faults::FaultPoint::AfterWrite, 1.0);
        o.paused = vec![
            "StockFunction".into(),
            "PaymentFunction".into(),
            "CoordinatorFunction".into(),
        ];
    })
    .await;
    let prefix = crashing.prefix.clone();
    let t = TestStack::start_with(|o| {
        o.prefix = prefix;
        short_timeout(o, 1);
    })
    .await;
    t.put_product("p-retry", 800, 4).await;
    let body = serde_json::json!({"items": [{"productId": "p-retry", "quantity": 1}]});
    let key = [("idempotency-key", "retry-after-timeout-1")];
    let r = crashing.request("POST", "/orders", Some(&body), &key).await;
    assert_eq!(r.status, 500, "{}", r.raw);
    let orders = t.scan("OrdersTable").await;
    assert_eq!(orders.len(), 1);
    let id = orders[0]["orderId"].as_s().unwrap().clone();

    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(timed_out(t.stack.sweep_now().await), 1);
    let o = wait_for(&t, &id, "timed out", |o| o["status"] == "CANCELLED").await;
    assert_eq!(o["cancelReason"], "TIMEOUT");

    let r = t.request("POST", "/orders", Some(&body), &key).await;
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(r.body["orderId"], id.as_str());
    assert_eq!(r.body["status"], "CANCELLED", "{}", r.raw);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ledger = t.ledger().await;
    assert_eq!(
        ledger_count(&ledger, "CHARGE", &id),
        0,
        "a cancelled order's card was charged: {ledger:?}"
    );
    assert_eq!(t.product_quantity("p-retry").await, 4);
    crashing.stack.stop().await;
    t.stop().await;
}
