//! The saga end to end, over the wire against DynamoDB Local and moto.

use std::collections::HashMap;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{Context, LambdaEvent};
use saga_core::config::{PaymentConfig, StockConfig};
use saga_core::faults::{FaultPoint, Faults};
use saga_core::handlers::batch::SqsHandler;
use saga_core::handlers::{payment::PaymentHandler, stock::StockHandler};
use saga_tests::{TestStack, assert_invariants};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_ten_orders_race_for_five_units_should_confirm_exactly_five() {
    let t = TestStack::start().await;
    t.put_product("p-last", 500, 5).await;
    let placed = futures::future::join_all((0..10).map(|_| t.place(&[("p-last", 1)], None))).await;
    let ids: Vec<String> = placed
        .iter()
        .map(|r| {
            assert_eq!(r.status, 202, "{}", r.raw);
            r.body["orderId"].as_str().unwrap().to_string()
        })
        .collect();
    let orders = t.wait_all_settled(&ids, SETTLE).await;
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    let cancelled: Vec<_> = orders
        .iter()
        .filter(|o| o["status"] == "CANCELLED")
        .collect();
    assert_eq!(confirmed, 5);
    assert_eq!(cancelled.len(), 5);
    for o in &cancelled {
        assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK", "{o}");
        assert_eq!(o["cancelProductId"], "p-last", "{o}");
    }
    assert_eq!(t.product_quantity("p-last").await, 0);
    assert_invariants(&t, &orders, &HashMap::from([("p-last".to_string(), 5)])).await;
    t.stop().await;
}

fn sqs_event(message_id: &str, body: &serde_json::Value) -> LambdaEvent<SqsEvent> {
    let event: SqsEvent = serde_json::from_value(json!({"Records": [{
        "messageId": message_id,
        "receiptHandle": "rh",
        "body": body.to_string(),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:StockQueue",
        "awsRegion": "us-east-1"
    }]}))
    .unwrap();
    let mut ctx = Context::default();
    ctx.deadline = (saga_core::time::now_ms() + 5_000) as u64;
    LambdaEvent::new(event, ctx)
}

fn lookup(t: &TestStack, function: &str) -> impl Fn(&str) -> Option<String> + use<> {
    let env = t.stack.environments[function].clone();
    move |k: &str| env.get(k).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_reserve_stock_is_redelivered_or_its_handler_dies_after_the_write_should_reserve_once()
{
    // Every consumer held back: this test delivers the messages itself.
    let t = TestStack::start_with(|o| {
        o.paused = vec![
            "StockFunction".into(),
            "PaymentFunction".into(),
            "CoordinatorFunction".into(),
        ];
    })
    .await;
    t.put_product("p-r", 100, 10).await;
    let id = t.place_ok(&[("p-r", 3)], None).await;
    let reserve = json!({"type": "ReserveStock", "orderId": id, "items": [{"productId": "p-r", "quantity": 3}]});
    let clients = t.stack.clients.clone();
    let config = StockConfig::load(&lookup(&t, "StockFunction")).unwrap();

    // 1. Dies after its DynamoDB write, before publishing and before SQS deletes the message.
    let crashing = StockHandler::new(
        &clients,
        config.clone(),
        Faults::none().with(FaultPoint::AfterWrite, 1.0),
    );
    let r = crashing.handle(sqs_event("m-1", &reserve)).await.unwrap();
    assert_eq!(
        r.batch_item_failures.len(),
        1,
        "the crashed record must be retried"
    );
    assert_eq!(t.product_quantity("p-r").await, 7);

    // 2. The retry (same body, new message id as after a redrive) and a plain duplicate.
    let handler = StockHandler::new(&clients, config, Faults::none());
    for message_id in ["m-1", "m-2"] {
        let r = handler
            .handle(sqs_event(message_id, &reserve))
            .await
            .unwrap();
        assert!(r.batch_item_failures.is_empty());
    }
    assert_eq!(t.product_quantity("p-r").await, 7, "reserved once");
    // Each successful delivery published the step's result, so the crash lost nothing.
    let published = t.drain("CoordinatorQueue").await;
    assert_eq!(published.len(), 2, "{published:?}");
    assert!(published.iter().all(|b| b.contains("StockReserved")));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_charge_payment_is_redelivered_or_crashes_mid_call_should_charge_once() {
    let t = TestStack::start_with(|o| {
        o.paused = vec![
            "StockFunction".into(),
            "PaymentFunction".into(),
            "CoordinatorFunction".into(),
        ];
    })
    .await;
    t.put_product("p-c", 700, 10).await;
    let id = t.place_ok(&[("p-c", 2)], None).await;
    let charge = json!({"type": "ChargePayment", "orderId": id, "customerId": "c-1", "amountCents": 1400, "paymentMethod": "tok_visa"});
    let clients = t.stack.clients.clone();
    let config = PaymentConfig::load(&lookup(&t, "PaymentFunction")).unwrap();

    // Dies inside the payment call: the provider charged, nothing was recorded on our side.
    let crashing = PaymentHandler::new(
        &clients,
        config.clone(),
        Faults::none().with(FaultPoint::InPayment, 1.0),
    );
    let mut event = sqs_event("m-1", &charge);
    event.context.deadline = (saga_core::time::now_ms() + 300) as u64;
    let r = crashing.handle(event).await.unwrap();
    assert_eq!(r.batch_item_failures.len(), 1);
    // The claim is held until the dead invocation's deadline; wait it out, as SQS would.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let handler = PaymentHandler::new(&clients, config.clone(), Faults::none());
    for message_id in ["m-1", "m-2", "m-3"] {
        let r = handler
            .handle(sqs_event(message_id, &charge))
            .await
            .unwrap();
        assert!(r.batch_item_failures.is_empty());
    }
    let ledger = t.ledger().await;
    let charges: Vec<_> = ledger
        .iter()
        .filter(|(k, o, _)| k == "CHARGE" && o == &id)
        .collect();
    assert_eq!(charges.len(), 1, "{ledger:?}");
    let published = t.drain("CoordinatorQueue").await;
    assert_eq!(
        published.len(),
        3,
        "each successful delivery publishes: {published:?}"
    );
    let payment_ids: std::collections::HashSet<_> = published
        .iter()
        .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()["paymentId"].clone())
        .collect();
    assert_eq!(
        payment_ids.len(),
        1,
        "every replay reports the same charge: {published:?}"
    );

    // A second order: dies after recording the charge, before publishing it. The redelivery
    // publishes the recorded result and charges nothing more.
    let id2 = t.place_ok(&[("p-c", 1)], None).await;
    let charge2 = json!({"type": "ChargePayment", "orderId": id2, "customerId": "c-1", "amountCents": 700, "paymentMethod": "tok_visa"});
    let after_write = PaymentHandler::new(
        &clients,
        config,
        Faults::none().with(FaultPoint::AfterWrite, 1.0),
    );
    assert_eq!(
        after_write
            .handle(sqs_event("m-5", &charge2))
            .await
            .unwrap()
            .batch_item_failures
            .len(),
        1
    );
    assert!(
        t.drain("CoordinatorQueue").await.is_empty(),
        "nothing published before the crash"
    );
    assert!(
        handler
            .handle(sqs_event("m-5", &charge2))
            .await
            .unwrap()
            .batch_item_failures
            .is_empty()
    );
    let published = t.drain("CoordinatorQueue").await;
    assert_eq!(published.len(), 1);
    assert!(published[0].contains("PaymentCharged") && published[0].contains(&id2));
    let charges2 = t
        .ledger()
        .await
        .into_iter()
        .filter(|(k, o, _)| k == "CHARGE" && o == &id2)
        .count();
    assert_eq!(charges2, 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_payment_is_declined_should_cancel_and_return_the_stock() {
    let t = TestStack::start().await;
    t.put_product("p-d", 300, 4).await;
    let id = t.place_ok(&[("p-d", 3)], Some("tok_chargeDeclined")).await;
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["cancelReason"], "PAYMENT_DECLINED");
    assert_eq!(o["paymentStatus"], "DECLINED");
    assert_eq!(o["stockStatus"], "RELEASED", "{o}");
    assert_eq!(t.product_quantity("p-d").await, 4);
    assert_invariants(&t, &[o], &HashMap::from([("p-d".to_string(), 4)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_stock_is_rejected_after_a_successful_charge_should_refund_exactly_once() {
    // Stock held back until the charge has landed, so the rejection comes after the charge.
    let t = TestStack::start_with(|o| {
        o.paused = vec!["StockFunction".into()];
        o.duplicate_rate = 1.0;
    })
    .await;
    t.put_product("p-s", 900, 1).await;
    let id = t.place_ok(&[("p-s", 2)], None).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    while t.order(&id).await["paymentStatus"] != "CHARGED" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "charge never landed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.stack.set_paused("StockFunction", false);
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK");
    assert_eq!(o["paymentStatus"], "REFUNDED", "{o}");
    let refunds = t
        .ledger()
        .await
        .into_iter()
        .filter(|(k, oid, _)| k == "REFUND" && oid == &id)
        .count();
    assert_eq!(refunds, 1);
    assert_invariants(&t, &[o], &HashMap::from([("p-s".to_string(), 1)])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_one_item_of_two_is_short_should_reserve_neither() {
    let t = TestStack::start().await;
    t.put_product("p-a", 100, 10).await;
    t.put_product("p-b", 100, 1).await;
    let id = t.place_ok(&[("p-a", 4), ("p-b", 2)], None).await;
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK");
    assert_eq!(o["cancelProductId"], "p-b");
    assert_eq!(o["stockStatus"], "REJECTED");
    assert_eq!(t.product_quantity("p-a").await, 10);
    assert_eq!(t.product_quantity("p-b").await, 1);
    let init = HashMap::from([("p-a".to_string(), 10), ("p-b".to_string(), 1)]);
    assert_invariants(&t, &[o], &init).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_an_order_confirms_should_show_prices_total_and_statuses() {
    let t = TestStack::start().await;
    t.put_product("p-mug", 1250, 5).await;
    t.put_product("p-tee", 2000, 5).await;
    let r = t.place(&[("p-mug", 2), ("p-tee", 1)], None).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.body["status"], "PENDING");
    let id = r.body["orderId"].as_str().unwrap().to_string();
    assert_eq!(r.headers["location"], format!("/orders/{id}"));
    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(o["totalCents"], 2 * 1250 + 2000);
    assert_eq!(o["items"][0]["unitPriceCents"], 1250);
    assert_eq!(
        o["customerId"],
        t.subject(saga_tests::CUSTOMER).await.as_str()
    );
    assert!(o.get("cancelReason").is_none());
    assert!(o["createdAt"].is_string() && o["updatedAt"].is_string());
    assert_eq!(t.product_quantity("p-mug").await, 3);
    let p = t.request("GET", "/products/p-mug", None, &[]).await;
    assert_eq!(
        (
            &p.body["productId"],
            &p.body["name"],
            &p.body["priceCents"],
            &p.body["quantity"]
        ),
        (&json!("p-mug"), &json!("p-mug"), &json!(1250), &json!(3)),
        "{}",
        p.raw
    );
    assert!(p.body["reserved"].is_u64(), "{}", p.raw);
    assert_eq!(p.headers["etag"], "\"v1\"", "only PUT changes the ETag");
    assert_eq!(
        t.request("GET", "/orders/nope", None, &[]).await.status,
        404
    );
    assert_eq!(
        t.request("GET", "/products/nope", None, &[]).await.status,
        404
    );
    t.stop().await;
}
