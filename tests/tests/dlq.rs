//! Dead-letter queues: a message no consumer can process reaches its queue's DLQ after
//! maxReceiveCount (5) receives and holds nothing else back; redriving moves messages back to
//! the source queue (the library and the `saga-local redrive` command), where a duplicate has
//! no second effect and a good message completes its order.

use std::collections::HashMap;

use std::process::Command;
use std::time::{Duration, Instant};

use saga_core::messages::{PaymentCommand, StockCommand};
use saga_tests::{TestStack, assert_invariants, repo_root};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(120);

/// `saga-local redrive --queue NAME` for this test's prefix; returns its stdout.
async fn redrive_cli(t: &TestStack, queue: &str) -> String {
    let (_, sqs) = saga_tests::services().await;
    let bin = saga_tests::saga_local_binary();
    let prefix = t.prefix.clone();
    let queue = queue.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["redrive", "--queue", &queue])
            .current_dir(repo_root())
            .env("SAGA_PREFIX", prefix)
            .env("SAGA_SQS_ENDPOINT", sqs)
            .output()
            .expect("run saga-local redrive")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "saga-local redrive failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn redrive_lib(t: &TestStack, dlq: &str, source: &str) -> usize {
    local_runner::redrive::redrive(
        &t.stack.clients.sqs,
        t.stack.queue_url(dlq),
        t.stack.queue_url(source),
        None,
    )
    .await
    .expect("redrive")
}

async fn wait_depth(t: &TestStack, queue: &str, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let depth = t.queue_depth(queue).await;
        if depth >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {depth} messages, not {n}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until no queue of the stack holds a message (visible or in flight).
async fn wait_quiet(t: &TestStack) {
    let queues = [
        "StockQueue",
        "PaymentQueue",
        "CoordinatorQueue",
        "StockDeadLetterQueue",
        "PaymentDeadLetterQueue",
        "CoordinatorDeadLetterQueue",
    ];
    let deadline = Instant::now() + SETTLE;
    'outer: loop {
        assert!(Instant::now() < deadline, "the queues never went quiet");
        tokio::time::sleep(Duration::from_millis(500)).await;
        for q in queues {
            if t.queue_depth(q).await > 0 {
                continue 'outer;
            }
        }
        return;
    }
}

async fn wait_for(t: &TestStack, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let o = t.order(id).await;
        if pred(&o) {
            return o;
        }
        assert!(Instant::now() < deadline, "order {id}: never {what}: {o}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The ReserveStock and ChargePayment the API sent for an order, rebuilt from the order.
fn saga_commands(o: &Value) -> (String, String) {
    let id = o["orderId"].as_str().unwrap().to_string();
    let reserve = StockCommand::ReserveStock {
        order_id: id.clone(),
        items: serde_json::from_value(json!(
            o["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| json!({"productId": i["productId"], "quantity": i["quantity"]}))
                .collect::<Vec<_>>()
        ))
        .unwrap(),
    };
    let charge = PaymentCommand::ChargePayment {
        order_id: id,
        customer_id: o["customerId"].as_str().unwrap().into(),
        amount_cents: o["totalCents"].as_u64().unwrap(),
        payment_method: o["paymentMethod"].as_str().unwrap().into(),
    };
    (
        serde_json::to_string(&reserve).unwrap(),
        serde_json::to_string(&charge).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_poison_messages_arrive_should_dead_letter_them_after_five_receives_and_hold_back_no_good_order()
 {
    let t = TestStack::start().await;
    t.put_product("p-good", 200, 20).await;
    let unknown_order = format!("o-{}", uuid::Uuid::new_v4());
    let stock_poison = vec![
        "this is not JSON".to_string(),
        // A stock command that cannot be valid: no items.
        json!({"type": "ReserveStock", "orderId": "o-empty", "items": []}).to_string(),
    ];
    let payment_poison = vec![
        // A coordinator event on the payment queue.
        json!({"type": "PaymentCharged", "orderId": "o-1", "paymentId": "ch_1"}).to_string(),
    ];
    let coordinator_poison = vec![
        "{\"type\":".to_string(),
        // A stock command on the coordinator queue: refused, never misapplied.
        json!({"type": "ReserveStock", "orderId": "o-1", "items": [{"productId": "p-good", "quantity": 1}]})
            .to_string(),
        // The right shape, for an order that does not exist.
        json!({"type": "StockReserved", "orderId": unknown_order}).to_string(),
    ];
    let started = Instant::now();
    for b in &stock_poison {
        t.send("StockQueue", b).await;
    }
    for b in &payment_poison {
        t.send("PaymentQueue", b).await;
    }
    for b in &coordinator_poison {
        t.send("CoordinatorQueue", b).await;
    }
    // Good orders, at the same time: they complete while the poison is being retried, not
    // after it is out of the way. (Each poison message needs maxReceiveCount receives, one
    // visibility timeout apart; a good message batched with it is not failed with it.)
    let ids = futures::future::join_all((0..5).map(|_| t.place_ok(&[("p-good", 2)], None))).await;
    let orders = t.wait_all_settled(&ids, SETTLE).await;
    let good_in = started.elapsed();
    for o in &orders {
        assert_eq!(o["status"], "CONFIRMED", "{o}");
    }
    let poison = (stock_poison.len() + payment_poison.len() + coordinator_poison.len()) as i64;
    let dead_when_good_settled = t.dead_letters().await;
    assert!(
        dead_when_good_settled < poison,
        "good orders settled only after all {poison} poison messages were dead-lettered: held back"
    );

    // Each poison message is received maxReceiveCount (5) times, then dead-lettered.
    let within = SETTLE * 3;
    wait_depth(
        &t,
        "StockDeadLetterQueue",
        stock_poison.len() as i64,
        within,
    )
    .await;
    wait_depth(
        &t,
        "PaymentDeadLetterQueue",
        payment_poison.len() as i64,
        within,
    )
    .await;
    wait_depth(
        &t,
        "CoordinatorDeadLetterQueue",
        coordinator_poison.len() as i64,
        within,
    )
    .await;
    let dead_in = started.elapsed();
    assert!(
        dead_in >= Duration::from_secs(8),
        "dead-lettered after fewer than 5 receives? {dead_in:?}"
    );
    eprintln!("dlq: good orders confirmed in {good_in:?}; poison dead-lettered in {dead_in:?}");
    for q in ["StockQueue", "PaymentQueue", "CoordinatorQueue"] {
        assert_eq!(t.queue_depth(q).await, 0, "{q} still holds messages");
    }
    assert_eq!(
        sorted(t.drain("StockDeadLetterQueue").await),
        sorted(stock_poison)
    );
    assert_eq!(
        sorted(t.drain("PaymentDeadLetterQueue").await),
        sorted(payment_poison)
    );
    assert_eq!(
        sorted(t.drain("CoordinatorDeadLetterQueue").await),
        sorted(coordinator_poison)
    );
    // Nothing the poison named was touched.
    assert_eq!(t.product_quantity("p-good").await, 10);
    assert_eq!(
        t.request("GET", &format!("/orders/{unknown_order}"), None, &[])
            .await
            .status,
        404,
        "a result for an unknown order created it"
    );
    assert_invariants(&t, &orders, &HashMap::from([("p-good".to_string(), 20)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_dead_lettered_reservation_is_redriven_should_complete_its_order() {
    let t = TestStack::start_with(|o| o.paused = vec!["StockFunction".into()]).await;
    t.put_product("p-redrive", 500, 5).await;
    let id = t.place_ok(&[("p-redrive", 2)], None).await;

    // Its ReserveStock ends up in the DLQ (as after five failed receives).
    wait_depth(&t, "StockQueue", 1, SETTLE).await;
    let reserve = t.drain("StockQueue").await;
    assert_eq!(reserve.len(), 1, "{reserve:?}");
    assert!(reserve[0].contains("\"ReserveStock\""), "{reserve:?}");
    t.send("StockDeadLetterQueue", &reserve[0]).await;
    t.stack.set_paused("StockFunction", false);

    // The order waits: charged, stock pending, nothing reserved.
    wait_for(&t, &id, "charged", |o| o["paymentStatus"] == "CHARGED").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = t.order(&id).await;
    assert_eq!(o["status"], "PENDING", "{o}");
    assert_eq!(o["stockStatus"], "PENDING", "{o}");
    assert_eq!(t.product_quantity("p-redrive").await, 5);

    assert_eq!(
        redrive_lib(&t, "StockDeadLetterQueue", "StockQueue").await,
        1
    );
    assert_eq!(t.queue_depth("StockDeadLetterQueue").await, 0);
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(t.product_quantity("p-redrive").await, 3);
    assert_invariants(&t, &[o], &HashMap::from([("p-redrive".to_string(), 5)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_duplicates_of_done_steps_are_redriven_with_the_cli_should_have_no_second_effect() {
    let t = TestStack::start().await;
    t.put_product("p-dup", 700, 5).await;
    t.put_product("p-dup-short", 100, 1).await;
    let ok = t.place_ok(&[("p-dup", 2)], None).await;
    // And a cancelled one whose charge was refunded: its redriven charge must not charge again.
    let short = t.place_ok(&[("p-dup-short", 3)], None).await;
    let ok_order = t.wait_settled(&ok, SETTLE).await;
    let short_order = t.wait_settled(&short, SETTLE).await;
    assert_eq!(ok_order["status"], "CONFIRMED", "{ok_order}");
    assert_eq!(
        short_order["cancelReason"], "INSUFFICIENT_STOCK",
        "{short_order}"
    );
    assert_eq!(short_order["paymentStatus"], "REFUNDED", "{short_order}");
    wait_quiet(&t).await;
    let ledger_before = sorted(
        t.ledger()
            .await
            .into_iter()
            .map(|e| format!("{e:?}"))
            .collect(),
    );
    let records_before = t.idempotency_records().await;

    // Copies of steps already done, put straight into the DLQs, as if they had dead-lettered.
    for o in [&ok_order, &short_order] {
        let (reserve, charge) = saga_commands(o);
        t.send("StockDeadLetterQueue", &reserve).await;
        t.send("PaymentDeadLetterQueue", &charge).await;
    }
    let out = redrive_cli(&t, "StockDeadLetterQueue").await;
    assert!(out.contains("moved 2 message(s)"), "{out}");
    // The command also takes the source queue's name.
    let out = redrive_cli(&t, "PaymentQueue").await;
    assert!(out.contains("moved 2 message(s)"), "{out}");
    for dlq in ["StockDeadLetterQueue", "PaymentDeadLetterQueue"] {
        assert_eq!(t.queue_depth(dlq).await, 0, "{dlq} not emptied");
    }

    // They are processed (replayed from their idempotency records) and change nothing.
    wait_quiet(&t).await;
    assert_eq!(t.product_quantity("p-dup").await, 3, "reserved twice");
    assert_eq!(t.product_quantity("p-dup-short").await, 1);
    let ledger_after = sorted(
        t.ledger()
            .await
            .into_iter()
            .map(|e| format!("{e:?}"))
            .collect(),
    );
    assert_eq!(ledger_after, ledger_before, "a second charge or refund");
    assert_eq!(t.idempotency_records().await, records_before);
    let ok_after = t.order(&ok).await;
    let short_after = t.order(&short).await;
    assert_eq!(ok_after["status"], "CONFIRMED");
    assert_eq!(short_after["paymentStatus"], "REFUNDED");
    assert_eq!(short_after["stockStatus"], "REJECTED");
    let init = HashMap::from([("p-dup".to_string(), 5), ("p-dup-short".to_string(), 1)]);
    assert_invariants(&t, &[ok_after, short_after], &init).await;
    t.stop().await;
}
