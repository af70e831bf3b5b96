//! Cancellation and fencing, over the wire (DynamoDB Local and moto): stock and money never
//! stranded by a cancellation, and a step that had not run when its order was cancelled never
//! takes effect.
//!
//! - A result held in a DLQ while its order times out: the stock is released and the charge
//!   refunded with no redrive; redriving it later changes nothing.
//! - A ReserveStock and a ChargePayment delivered after their order was cancelled: no units
//!   held, no charge.
//! - Customers cancelling at random points of the saga, racing its completion: every
//!   compensation exactly once, the invariants hold, and the audit finds nothing.
//! - A reservation written by the previous version (no outcome) is still released; a release
//!   that must find a reservation and finds none reaches the DLQ.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::StreamExt;
use saga_tests::{TestStack, assert_invariants, settled};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(180);

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Units the products table says are held by orders (`reserved`).
async fn reserved(t: &TestStack, product: &str) -> i64 {
    let r = t
        .request("GET", &format!("/products/{product}"), None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body["reserved"].as_i64().unwrap_or(0)
}

fn ledger_of(ledger: &[(String, String, Option<String>)], id: &str, kind: &str) -> usize {
    ledger
        .iter()
        .filter(|(k, o, out)| {
            k == kind && o == id && (kind != "CHARGE" || out.as_deref() == Some("APPROVED"))
        })
        .count()
}

async fn cancel(t: &TestStack, id: &str) -> saga_tests::Reply {
    t.request("POST", &format!("/orders/{id}/cancel"), None, &[])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_results_sit_in_a_dlq_while_the_order_times_out_should_compensate_without_redrive() {
    let t = TestStack::start_with(|o| {
        o.paused = vec!["CoordinatorFunction".into()];
        o.env_overrides
            .insert("ORDER_TIMEOUT_SECONDS".into(), "1".into());
    })
    .await;
    t.put_product("p-dlq-held", 700, 5).await;
    let id = t.place_ok(&[("p-dlq-held", 2)], None).await;
    // Stock reserved and card charged; both results wait for the held-back coordinator.
    wait_for("both results", async || {
        t.queue_depth("CoordinatorQueue").await == 2
    })
    .await;
    // ... and land in its DLQ instead (what maxReceiveCount failures would do).
    let results = t.drain("CoordinatorQueue").await;
    assert_eq!(results.len(), 2);
    for body in &results {
        t.send("CoordinatorDeadLetterQueue", body).await;
    }
    assert_eq!(t.product_quantity("p-dlq-held").await, 3);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(t.stack.sweep_now().await.unwrap()["timedOut"], 1);
    t.stack.set_paused("CoordinatorFunction", false);

    wait_for("the timed-out order settled", async || {
        settled(&t.order(&id).await)
    })
    .await;
    let order = t.order(&id).await;
    assert_eq!(
        (
            &order["status"],
            &order["cancelReason"],
            &order["stockStatus"],
            &order["paymentStatus"]
        ),
        (
            &json!("CANCELLED"),
            &json!("TIMEOUT"),
            &json!("RELEASED"),
            &json!("REFUNDED")
        ),
        "{order}"
    );
    wait_for("queues quiet", async || t.backlog().await == 0).await;
    assert_eq!(t.product_quantity("p-dlq-held").await, 5);
    assert_eq!(reserved(&t, "p-dlq-held").await, 0);
    let ledger = t.ledger().await;
    assert_eq!(
        (
            ledger_of(&ledger, &id, "CHARGE"),
            ledger_of(&ledger, &id, "REFUND")
        ),
        (1, 1)
    );

    // Redriven late: the results change nothing.
    assert_eq!(t.redrive_all().await, 2);
    wait_for("redriven results processed", async || t.queues_idle().await).await;
    assert_eq!(t.order(&id).await, order);
    assert_eq!(t.product_quantity("p-dlq-held").await, 5);
    assert_eq!(t.ledger().await.len(), ledger.len());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_commands_arrive_after_their_order_was_cancelled_should_hold_and_charge_nothing() {
    let t = TestStack::start_with(|o| {
        o.paused = vec!["StockFunction".into(), "PaymentFunction".into()];
    })
    .await;
    t.put_product("p-late", 300, 4).await;
    let id = t.place_ok(&[("p-late", 3)], None).await;
    // The saga's commands are still on their way (held here, delivered after the cancel).
    let reserve = t.drain("StockQueue").await;
    let charge = t.drain("PaymentQueue").await;
    assert_eq!((reserve.len(), charge.len()), (1, 1));

    let r = cancel(&t, &id).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["status"], "CANCELLED");
    assert_eq!(r.body["cancelReason"], "CUSTOMER_CANCELLED");
    t.stack.set_paused("StockFunction", false);
    t.stack.set_paused("PaymentFunction", false);
    wait_for("the fences", async || settled(&t.order(&id).await)).await;
    let order = t.order(&id).await;
    assert_eq!(
        (&order["stockStatus"], &order["paymentStatus"]),
        (&json!("VOIDED"), &json!("VOIDED")),
        "{order}"
    );

    // Now the late commands (also twice, as at-least-once delivery may).
    for _ in 0..2 {
        t.send("StockQueue", &reserve[0]).await;
        t.send("PaymentQueue", &charge[0]).await;
    }
    wait_for("late commands processed", async || t.queues_idle().await).await;
    assert_eq!(t.product_quantity("p-late").await, 4, "no units held");
    assert_eq!(reserved(&t, "p-late").await, 0);
    assert!(
        t.ledger().await.is_empty(),
        "no charge: {:?}",
        t.ledger().await
    );
    assert_eq!(t.order(&id).await, order);
    // Cancelling again answers the same final order, as it now stands.
    let again = cancel(&t, &id).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, order);
    assert_eq!(
        (&again.body["status"], &again.body["cancelReason"]),
        (&r.body["status"], &r.body["cancelReason"])
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_customers_cancel_at_random_points_should_compensate_each_exactly_once() {
    const ORDERS: usize = 80;
    let t = TestStack::start_with(|o| {
        o.env_overrides
            .insert("PAYMENT_FAILURE_RATE".into(), "0.2".into());
    })
    .await;
    let products = saga_tests::catalogue("p-cancel", 4, 60, 15);
    let initial = t.stock_catalogue(&products, |_| 150).await;
    let placed: Vec<(String, bool)> = futures::stream::iter(0..ORDERS)
        .map(|i| {
            let t = &t;
            let basket = saga_tests::random_basket(&products);
            async move {
                let items: Vec<(&str, u64)> =
                    basket.iter().map(|(p, q)| (p.as_str(), *q)).collect();
                let id = t.place_ok(&items, None).await;
                // Three in four are cancelled, at a random point of their saga (or after it).
                let cancelled = i % 4 != 0;
                if cancelled {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1_500))).await;
                    let r = cancel(t, &id).await;
                    assert_eq!(r.status, 200, "{}", r.raw);
                    assert_eq!(r.body["status"], "CANCELLED", "{}", r.raw);
                }
                (id, cancelled)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let ids: Vec<String> = placed.iter().map(|(id, _)| id.clone()).collect();
    let settled = t.wait_all_settled(&ids, SETTLE).await;
    wait_for("queues quiet", async || t.queues_idle().await).await;
    let by_id: HashMap<&str, &Value> = settled
        .iter()
        .map(|o| (o["orderId"].as_str().unwrap(), o))
        .collect();
    let ledger = t.ledger().await;
    let mut seen = HashMap::<String, usize>::new();
    for (id, cancelled) in &placed {
        let o = by_id[id.as_str()];
        if *cancelled {
            assert_eq!(o["status"], "CANCELLED", "{o}");
        }
        if o["status"] == "CANCELLED" {
            let (charges, refunds) = (
                ledger_of(&ledger, id, "CHARGE"),
                ledger_of(&ledger, id, "REFUND"),
            );
            assert!(
                charges <= 1 && charges == refunds,
                "{o}: {charges} {refunds}"
            );
        }
        *seen
            .entry(format!(
                "{}/{}/{}",
                o["status"].as_str().unwrap(),
                o["stockStatus"].as_str().unwrap(),
                o["paymentStatus"].as_str().unwrap()
            ))
            .or_default() += 1;
    }
    eprintln!("cancellations: outcomes {seen:?}");
    assert_invariants(&t, &settled, &initial).await;
    // `reserved` counts exactly the units of the confirmed orders.
    for product in initial.keys() {
        let held: i64 = settled
            .iter()
            .filter(|o| o["status"] == "CONFIRMED")
            .flat_map(|o| o["items"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["productId"] == product.as_str())
            .map(|i| i["quantity"].as_i64().unwrap())
            .sum();
        assert_eq!(reserved(&t, product).await, held, "{product}");
    }
    t.assert_audit_clean().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_reservation_was_recorded_by_the_previous_version_should_still_be_released() {
    // The only test here that installs the log subscriber (target/test-logs/cancellation.log).
    let _logs = saga_tests::logs::count_logs();
    let t = TestStack::start().await;
    t.put_product("p-legacy", 100, 6).await;
    // As the previous version left it: 4 units taken (and `reserved` not counted), and the
    // record holding only the serialized result.
    let items = json!([{"productId": "p-legacy", "quantity": 4}]);
    let lines: Vec<saga_core::domain::StockLine> = serde_json::from_value(items.clone()).unwrap();
    let dynamodb = &t.stack.clients.dynamodb;
    dynamodb
        .update_item()
        .table_name(t.stack.table("ProductsTable"))
        .key("productId", AttributeValue::S("p-legacy".into()))
        .update_expression("SET quantity = :q")
        .expression_attribute_values(":q", AttributeValue::N("2".into()))
        .send()
        .await
        .unwrap();
    // The record as the previous version wrote it (tests/fixtures/reservation-record-v1.json).
    let fixture: HashMap<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(
            saga_tests::repo_root().join("tests/fixtures/reservation-record-v1.json"),
        )
        .expect("the fixture"),
    )
    .expect("DynamoDB JSON");
    let item: HashMap<String, AttributeValue> = fixture
        .into_iter()
        .map(|(k, v)| {
            let value = match (v.get("S"), v.get("N")) {
                (Some(s), _) => AttributeValue::S(s.as_str().unwrap().into()),
                (_, Some(n)) => AttributeValue::N(n.as_str().unwrap().into()),
                _ => panic!("{k}: only S and N in the fixture"),
            };
            (k, value)
        })
        .collect();
    assert_eq!(
        item["payloadHash"],
        AttributeValue::S(saga_core::idempotency::payload_hash(&lines)),
        "the fixture's payload is the order's items"
    );
    dynamodb
        .put_item()
        .table_name(t.stack.table("IdempotencyTable"))
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
    // Its order, cancelled (the card declined) while the reservation stood.
    let mut order = saga_tests::events::order(
        "o-legacy",
        "RESERVED",
        "DECLINED",
        None,
        saga_core::time::now_ms(),
    );
    order["status"] = json!("CANCELLED");
    order["cancelReason"] = json!("PAYMENT_DECLINED");
    order["items"] = json!([{"productId": "p-legacy", "quantity": 4, "unitPriceCents": 100}]);
    order["totalCents"] = json!(400);
    order.as_object_mut().unwrap().remove("pendingSweep");
    saga_tests::events::seed_order(&t, order).await;
    let release = json!({"type": "ReleaseStock", "orderId": "o-legacy", "items": items});
    for _ in 0..2 {
        t.send("StockQueue", &release.to_string()).await;
    }
    wait_for("the release", async || t.queues_idle().await).await;
    assert_eq!(t.product_quantity("p-legacy").await, 6);
    assert_eq!(reserved(&t, "p-legacy").await, 0);
    assert_eq!(t.dead_letters().await, 0);
    let records = t.idempotency_records().await;
    assert!(
        records["o-legacy#release"].contains("StockReleased"),
        "{records:?}"
    );
    assert_eq!(t.order("o-legacy").await["stockStatus"], "RELEASED");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_release_finds_no_reservation_where_one_must_exist_should_reach_the_dlq() {
    let t = TestStack::start().await;
    t.put_product("p-phantom", 100, 6).await;
    let release = json!({"type": "ReleaseStock", "orderId": "o-phantom",
                         "items": [{"productId": "p-phantom", "quantity": 4}]});
    t.send("StockQueue", &release.to_string()).await;
    wait_for("the DLQ", async || {
        t.queue_depth("StockDeadLetterQueue").await == 1
    })
    .await;
    assert_eq!(t.product_quantity("p-phantom").await, 6, "nothing invented");
    t.stop().await;
}
