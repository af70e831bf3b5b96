//! The catalogue over the wire (DynamoDB Local and moto, through the real handler): a product
//! is created with its stock once; name and price change under `If-Match` and never touch
//! stock; stock changes only through adjustments, each recorded as a movement in the same
//! transaction, never below zero, once per `Idempotency-Key`; and adjustments racing orders on
//! one product lose no unit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::StreamExt;
use saga_core::domain::StockMovement;
use saga_tests::{Reply, TestStack};
use serde_json::{Value, json};

/// However slow the machine: a deadline for the saga to settle, not a speed to meet.
const SETTLE: Duration = Duration::from_secs(300);

/// The stored product item (every attribute), to prove a refused request changed nothing.
async fn product_item(t: &TestStack, id: &str) -> Option<BTreeMap<String, AttributeValue>> {
    t.stack
        .clients
        .dynamodb
        .get_item()
        .table_name(t.stack.table("ProductsTable"))
        .key("productId", AttributeValue::S(id.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get product")
        .item
        .map(|i| i.into_iter().collect())
}

/// The `sub` of the operator's token (the actor of the movements it makes).
async fn operator_sub(t: &TestStack) -> String {
    let token = t.token(saga_tests::OPERATOR, true).await;
    let claims: Value = jsonwebtoken::dangerous::insecure_decode(&token)
        .expect("a JWT")
        .claims;
    claims["sub"].as_str().expect("sub").to_string()
}

async fn put(t: &TestStack, id: &str, body: Value, if_match: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = if_match.map(|m| vec![("if-match", m)]).unwrap_or_default();
    t.as_operator("PUT", &format!("/products/{id}"), &body, &headers)
        .await
}

fn error_code(r: &Reply) -> &str {
    r.body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_product_is_created_should_hold_its_stock_and_one_movement() {
    let t = TestStack::start_paused().await;
    let r = put(
        &t,
        "p-new",
        json!({"name": "Mug", "priceCents": 1250, "quantity": 10}),
        None,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.headers["etag"], "\"v1\"");
    assert_eq!(r.headers["location"], "/products/p-new");
    assert_eq!(
        r.body,
        json!({"productId": "p-new", "name": "Mug", "priceCents": 1250, "quantity": 10, "reserved": 0, "version": 1})
    );
    let got = t.request("GET", "/products/p-new", None, &[]).await;
    assert_eq!((got.status, &got.body), (200, &r.body));
    assert_eq!(got.headers["etag"], "\"v1\"");

    let movements = t.movements("p-new").await;
    assert_eq!(movements.len(), 1, "{movements:?}");
    let first = &movements[0];
    assert_eq!((first.delta, first.quantity_after), (10, 10));
    assert_eq!(first.reason, saga_core::domain::INITIAL_STOCK_REASON);
    assert_eq!(first.actor, operator_sub(&t).await);

    // Creating it again (a stock figure for an existing product): 409, nothing changed.
    let before = product_item(&t, "p-new").await;
    let again = put(
        &t,
        "p-new",
        json!({"name": "Mug", "priceCents": 1250, "quantity": 15}),
        None,
    )
    .await;
    assert_eq!(again.status, 409, "{}", again.raw);
    assert_eq!(error_code(&again), "QUANTITY_NOT_WRITABLE");
    assert_eq!(product_item(&t, "p-new").await, before);
    assert_eq!(t.movements("p-new").await.len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_price_changes_while_orders_reserve_should_leave_the_stock_to_them() {
    let t = TestStack::start().await;
    t.put_product("p-sale", 500, 30).await;
    let etag = t
        .request("GET", "/products/p-sale", None, &[])
        .await
        .headers["etag"]
        .clone();
    // Orders and price changes at once: each price change sends name and price only.
    let orders = futures::future::join_all(
        (0..10).map(|i| place_until_answered(&t, "p-sale", 2, format!("sale-{i}"))),
    );
    let prices = async {
        let mut last = None;
        for price in 400..410u64 {
            // A change that timed out at the gateway (503) is sent again: it sets the same
            // name and price, bumping the version once more only if the first one landed.
            let r = loop {
                let r = put(
                    &t,
                    "p-sale",
                    json!({"name": "On sale", "priceCents": price}),
                    None,
                )
                .await;
                if r.status != 503 {
                    break r;
                }
            };
            assert_eq!(r.status, 200, "{}", r.raw);
            last = Some(r);
        }
        last.unwrap()
    };
    let (placed, last) = tokio::join!(orders, prices);
    let ids: Vec<String> = placed
        .iter()
        .map(|r| {
            assert_eq!(r.status, 202, "{}", r.raw);
            r.body["orderId"].as_str().unwrap().to_string()
        })
        .collect();
    let version = last.body["version"].as_u64().unwrap();
    assert!(
        version >= 11,
        "ten changes after the creation: {}",
        last.raw
    );
    let settled = t.wait_all_settled(&ids, SETTLE).await;
    let held: i64 = settled
        .iter()
        .filter(|o| o["status"] == "CONFIRMED")
        .map(|o| o["items"][0]["quantity"].as_i64().unwrap())
        .sum();
    assert_eq!(held, 20, "30 units are enough for every order");
    let product = t.request("GET", "/products/p-sale", None, &[]).await;
    assert_eq!(product.body["quantity"], 10, "{}", product.raw);
    assert_eq!(product.body["priceCents"], 409);
    assert_eq!(product.body["name"], "On sale");
    // The ETag moved with the price changes only.
    assert_ne!(product.headers["etag"], etag);
    assert_eq!(product.headers["etag"], format!("\"v{version}\""));
    assert_eq!(product.body["version"], version);
    assert_eq!(
        t.movements("p-sale").await.len(),
        1,
        "orders are not movements"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_if_match_is_stale_should_answer_412_and_change_nothing() {
    let t = TestStack::start_paused().await;
    t.put_product("p-etag", 700, 5).await;
    let first = t
        .request("GET", "/products/p-etag", None, &[])
        .await
        .headers["etag"]
        .clone();
    let changed = put(
        &t,
        "p-etag",
        json!({"name": "Renamed", "priceCents": 750}),
        Some(&first),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.raw);
    assert_eq!(changed.headers["etag"], "\"v2\"");

    let before = product_item(&t, "p-etag").await;
    let stale = put(
        &t,
        "p-etag",
        json!({"name": "Stale", "priceCents": 1}),
        Some(&first),
    )
    .await;
    assert_eq!(stale.status, 412, "{}", stale.raw);
    assert_eq!(error_code(&stale), "PRECONDITION_FAILED");
    assert!(stale.body["error"]["message"].is_string());
    assert_eq!(product_item(&t, "p-etag").await, before, "nothing changed");

    // Malformed: 400. A product that does not exist: 412, and it is not created.
    let bad = put(
        &t,
        "p-etag",
        json!({"name": "Bad", "priceCents": 1}),
        Some("v2"),
    )
    .await;
    assert_eq!((bad.status, error_code(&bad)), (400, "INVALID_IF_MATCH"));
    for body in [
        json!({"name": "Ghost", "priceCents": 1}),
        json!({"name": "Ghost", "priceCents": 1, "quantity": 3}),
    ] {
        let ghost = put(&t, "p-ghost", body, Some("\"v1\"")).await;
        assert_eq!(ghost.status, 412, "{}", ghost.raw);
    }
    assert_eq!(product_item(&t, "p-ghost").await, None);
    assert_eq!(product_item(&t, "p-etag").await, before);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_an_adjustment_would_go_below_zero_should_answer_409_and_change_nothing() {
    let t = TestStack::start_paused().await;
    t.put_product("p-few", 300, 3).await;
    let before = product_item(&t, "p-few").await;
    for key in [None, Some("below-1")] {
        let r = t.adjust_stock("p-few", -4, "broken in transit", key).await;
        assert_eq!(r.status, 409, "{}", r.raw);
        assert_eq!(error_code(&r), "INSUFFICIENT_STOCK");
    }
    assert_eq!(product_item(&t, "p-few").await, before);
    assert_eq!(t.movements("p-few").await.len(), 1);
    assert!(
        !t.idempotency_records()
            .await
            .keys()
            .any(|k| k.starts_with("adjust#")),
        "a refused adjustment keeps no key"
    );
    // Exactly what is there may go.
    let r = t.adjust_stock("p-few", -3, "broken in transit", None).await;
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["quantityAfter"], 0);
    assert_eq!(t.product_quantity("p-few").await, 0);
    let unknown = t.adjust_stock("p-none", 1, "restock", None).await;
    assert_eq!((unknown.status, error_code(&unknown)), (404, "NOT_FOUND"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_an_adjustment_is_replayed_should_give_the_same_movement_and_change_stock_once() {
    let t = TestStack::start_paused().await;
    t.put_product("p-key", 100, 10).await;
    let first = t
        .adjust_stock("p-key", 5, "delivery 42", Some("adj-key-1"))
        .await;
    assert_eq!(first.status, 201, "{}", first.raw);
    // Again, once in turn and five times at once: the same movement every time.
    let again = t
        .adjust_stock("p-key", 5, "delivery 42", Some("adj-key-1"))
        .await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let racing = futures::future::join_all(
        (0..5).map(|_| t.adjust_stock("p-key", 5, "delivery 42", Some("adj-key-1"))),
    )
    .await;
    for r in &racing {
        assert_eq!((r.status, &r.body), (201, &first.body), "{}", r.raw);
    }
    assert_eq!(t.product_quantity("p-key").await, 15, "adjusted once");
    let movements = t.movements("p-key").await;
    assert_eq!(movements.len(), 2, "{movements:?}");
    assert_eq!(json!(movements[1]), first.body);
    // The same key with another body, or on another product: 422.
    t.put_product("p-key-2", 100, 10).await;
    for (id, delta) in [("p-key", 6), ("p-key-2", 5)] {
        let r = t
            .adjust_stock(id, delta, "delivery 42", Some("adj-key-1"))
            .await;
        assert_eq!(r.status, 422, "{id}: {}", r.raw);
        assert_eq!(error_code(&r), "IDEMPOTENCY_KEY_REUSED");
    }
    assert_eq!(t.product_quantity("p-key").await, 15);
    assert_eq!(t.product_quantity("p-key-2").await, 10);
    t.stop().await;
}

/// Sends an adjustment until it has a definite answer: a 503 (the quantity kept moving, or a
/// dependency failed) is retried with the same `Idempotency-Key`, as clients are told to.
async fn adjust_until_answered(t: &TestStack, id: &str, delta: i64, key: String) -> Reply {
    for _ in 0..60 {
        let r = t.adjust_stock(id, delta, "race", Some(&key)).await;
        if r.status != 503 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..200))).await;
    }
    panic!("adjustment {key} never got past 503");
}

/// Places an order with an `Idempotency-Key` until it has a definite answer: on a busy
/// machine the local gateway may time the function out (503), and a request still held by such
/// an attempt is a 409 until its deadline; both are retried with the same key, as clients are
/// told to, so the order exists once whatever happened to the first attempt.
async fn place_until_answered(t: &TestStack, product: &str, quantity: u64, key: String) -> Reply {
    let body = json!({"items": [{"productId": product, "quantity": quantity}]});
    for _ in 0..120 {
        let r = t
            .request("POST", "/orders", Some(&body), &[("idempotency-key", &key)])
            .await;
        let in_progress = r.status == 409 && error_code(&r) == "IDEMPOTENCY_KEY_IN_PROGRESS";
        if r.status != 503 && !in_progress {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250 + fastrand::u64(0..250))).await;
    }
    panic!("order {key} never got past 503/409");
}

/// Whether the movements chain: read as edges from the quantity each started from
/// (`quantityAfter - delta`) to the quantity after it, they form one path from `initial` to
/// `last` (every quantity is entered as often as it is left, but for the two ends).
fn chains(movements: &[StockMovement], initial: i64, last: i64) -> Result<(), String> {
    let mut balance: HashMap<i64, i64> = HashMap::new();
    for m in movements {
        let before = m.quantity_after as i64 - m.delta;
        if before < 0 {
            return Err(format!("{m:?} started from a negative quantity"));
        }
        *balance.entry(before).or_default() += 1;
        *balance.entry(m.quantity_after as i64).or_default() -= 1;
    }
    if initial != last {
        *balance.entry(initial).or_default() -= 1;
        *balance.entry(last).or_default() += 1;
    }
    let unbalanced: Vec<_> = balance.iter().filter(|(_, b)| **b != 0).collect();
    if unbalanced.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "quantities entered and left unequally: {unbalanced:?}"
        ))
    }
}

/// The deltas of the race: restocks, small and large removals, some of which cannot fit.
fn race_deltas(n: usize) -> Vec<i64> {
    (0..n)
        .map(|i| match i % 4 {
            0 => 5,
            1 => -3,
            2 => -1,
            _ => -25,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_adjustments_race_each_other_should_chain_their_quantities_exactly() {
    let t = TestStack::start_paused().await;
    let initial = 40;
    t.put_product("p-chain", 100, initial as u64).await;
    let deltas = race_deltas(40);
    let replies = futures::future::join_all(
        deltas
            .iter()
            .enumerate()
            .map(|(i, d)| adjust_until_answered(&t, "p-chain", *d, format!("chain-{i}"))),
    )
    .await;
    let mut accepted = Vec::new();
    for r in &replies {
        match r.status {
            201 => accepted.push(r.body.clone()),
            409 => assert_eq!(error_code(r), "INSUFFICIENT_STOCK", "{}", r.raw),
            _ => panic!("unexpected answer: {}", r.raw),
        }
    }
    let quantity = t.product_quantity("p-chain").await;
    let sum: i64 = accepted.iter().map(|m| m["delta"].as_i64().unwrap()).sum();
    assert_eq!(quantity, initial + sum);
    assert!(quantity >= 0);
    let movements = t.movements("p-chain").await;
    assert_eq!(movements.len(), 1 + accepted.len());
    // With nothing else moving the stock, the movements chain from the initial stock to the
    // quantity now, each starting exactly where another ended.
    chains(&movements[1..], initial, quantity).unwrap_or_else(|e| panic!("{e}: {movements:#?}"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_adjustments_race_orders_for_one_product_should_lose_no_unit() {
    let t = TestStack::start().await;
    let initial: i64 = 60;
    t.put_product("p-race", 100, initial as u64).await;
    let deltas = race_deltas(50);
    let adjustments = futures::future::join_all(
        deltas
            .iter()
            .enumerate()
            .map(|(i, d)| adjust_until_answered(&t, "p-race", *d, format!("race-{i}"))),
    );
    let orders = futures::future::join_all(
        (0..50u64)
            .map(|i| place_until_answered(&t, "p-race", 1 + i % 3, format!("race-order-{i}"))),
    );
    let (adjusted, placed) = tokio::join!(adjustments, orders);

    let ids: Vec<String> = placed
        .iter()
        .map(|r| {
            assert_eq!(r.status, 202, "{}", r.raw);
            r.body["orderId"].as_str().unwrap().to_string()
        })
        .collect();
    let mut accepted: BTreeMap<String, Value> = BTreeMap::new();
    let mut refused = 0;
    for r in &adjusted {
        match r.status {
            201 => {
                let id = r.body["movementId"].as_str().unwrap().to_string();
                assert!(accepted.insert(id, r.body.clone()).is_none());
            }
            409 => {
                assert_eq!(error_code(r), "INSUFFICIENT_STOCK", "{}", r.raw);
                refused += 1;
            }
            _ => panic!("unexpected answer: {}", r.raw),
        }
    }
    eprintln!("{} adjustments accepted, {refused} refused", accepted.len());
    // The race covers both sides of the condition: removals that fit and removals that did not.
    assert!(refused > 0, "no adjustment would have gone below zero");
    assert!(
        accepted.values().any(|m| m["delta"].as_i64().unwrap() < 0),
        "no removal was accepted"
    );

    let orders = t.wait_all_settled(&ids, SETTLE).await;
    let quantity = t.product_quantity("p-race").await;
    assert!(quantity >= 0, "negative stock: {quantity}");
    let sum: i64 = accepted
        .values()
        .map(|m| m["delta"].as_i64().unwrap())
        .sum();
    let held: i64 = orders
        .iter()
        .filter(|o| o["status"] == "CONFIRMED")
        .map(|o| o["items"][0]["quantity"].as_i64().unwrap())
        .sum();
    assert_eq!(
        initial + sum,
        quantity + held,
        "initial {initial} + accepted deltas {sum} != available {quantity} + held by confirmed orders {held}"
    );
    for o in &orders {
        if o["status"] == "CANCELLED" {
            assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK", "{o}");
            assert_ne!(o["stockStatus"], "RESERVED", "{o}");
        }
    }

    // Every accepted adjustment has exactly one movement, the one it answered; every movement
    // started from a quantity that was there and left one that is.
    let movements = t.movements("p-race").await;
    let recorded: BTreeSet<&str> = movements[1..]
        .iter()
        .map(|m| m.movement_id.as_str())
        .collect();
    assert_eq!(
        recorded,
        accepted.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        "one movement per accepted adjustment"
    );
    assert_eq!(movements.len(), 1 + accepted.len());
    let most = initial + deltas.iter().filter(|d| **d > 0).sum::<i64>();
    for m in &movements[1..] {
        assert_eq!(json!(m), accepted[&m.movement_id]);
        let before = m.quantity_after as i64 - m.delta;
        assert!(
            before >= 0 && (m.quantity_after as i64) <= most,
            "inconsistent movement {m:?}"
        );
    }
    t.assert_audit_clean().await;
    t.stop().await;
}

/// A price change as an operator sends it (name and price only, no `If-Match`), retried on a
/// 503 as clients are told to.
async fn change_price(t: &TestStack, id: &str, price: u64) -> Reply {
    for _ in 0..60 {
        let r = put(t, id, json!({"name": id, "priceCents": price}), None).await;
        if r.status != 503 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..200))).await;
    }
    panic!("price change of {id} never got past 503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_200_orders_race_50_restocks_and_price_changes_should_keep_every_unit_and_pass_the_audit()
 {
    const ORDERS: usize = 200;
    const OPERATIONS: usize = 50;
    let t = TestStack::start().await;
    let products = saga_tests::catalogue("p-busy", 4, 30, 10);
    let initial = t.stock_catalogue(&products, |_| 500).await;
    let pacer = saga_tests::Pacer::new(&t, 150);
    // Orders, 20 at a time (paced by the backlog), and the operators' 50 operations at once:
    // every other one a restock of 1 to 10 units, the others price changes, on the same
    // products.
    let orders = futures::stream::iter(0..ORDERS)
        .map(|_| {
            let (t, pacer) = (&t, &pacer);
            let basket = saga_tests::random_basket(&products);
            async move {
                pacer.admit().await;
                let items: Vec<(&str, u64)> =
                    basket.iter().map(|(p, q)| (p.as_str(), *q)).collect();
                t.place_ok(&items, None).await
            }
        })
        .buffer_unordered(20)
        .collect::<Vec<String>>();
    let operations = futures::future::join_all((0..OPERATIONS).map(|i| {
        let t = &t;
        let id = products[i % products.len()].0.clone();
        async move {
            if i % 2 == 0 {
                let delta = 1 + fastrand::i64(0..10);
                let r = adjust_until_answered(t, &id, delta, format!("restock-{i}")).await;
                assert_eq!(r.status, 201, "{}", r.raw);
                (id, delta)
            } else {
                let r = change_price(t, &id, 400 + i as u64).await;
                assert_eq!(r.status, 200, "{}", r.raw);
                (id, 0)
            }
        }
    }));
    let (ids, restocks) = tokio::join!(orders, operations);
    let settled = t.wait_all_settled(&ids, SETTLE).await;
    let confirmed = settled
        .iter()
        .filter(|o| o["status"] == "CONFIRMED")
        .count();
    eprintln!(
        "{ORDERS} orders against {OPERATIONS} operator operations: {confirmed} confirmed, {} cancelled",
        ORDERS - confirmed
    );
    assert!(confirmed > 0, "nothing confirmed");
    for o in &settled {
        if o["status"] == "CANCELLED" {
            assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK", "{o}");
        }
    }
    for (product, start) in &initial {
        let restocked: i64 = restocks
            .iter()
            .filter(|(p, _)| p == product)
            .map(|(_, d)| d)
            .sum();
        let available = t.product_quantity(product).await;
        let held: i64 = settled
            .iter()
            .filter(|o| o["status"] == "CONFIRMED")
            .flat_map(|o| o["items"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["productId"] == product.as_str())
            .map(|i| i["quantity"].as_i64().unwrap())
            .sum();
        assert!(available >= 0, "{product}: negative stock {available}");
        assert_eq!(
            start + restocked,
            available + held,
            "{product}: initial {start} + restocked {restocked} != available {available} + held by confirmed orders {held}"
        );
        // No movement ever left the stock below zero.
        for m in t.movements(product).await {
            assert!(
                m.quantity_after as i64 >= 0 && m.quantity_after as i64 - m.delta >= 0,
                "{m:?}"
            );
        }
    }
    t.assert_audit_clean().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_product_predates_versions_should_count_as_version_0_and_take_if_match() {
    let t = TestStack::start_paused().await;
    // As written before versions and reservations were recorded: no `version`, no `reserved`.
    t.stack
        .clients
        .dynamodb
        .put_item()
        .table_name(t.stack.table("ProductsTable"))
        .item("productId", AttributeValue::S("p-old".into()))
        .item("name", AttributeValue::S("Old".into()))
        .item("priceCents", AttributeValue::N("100".into()))
        .item("quantity", AttributeValue::N("7".into()))
        .send()
        .await
        .expect("seed a product");
    let got = t.request("GET", "/products/p-old", None, &[]).await;
    assert_eq!(got.status, 200, "{}", got.raw);
    assert_eq!(got.headers["etag"], "\"v0\"");
    assert_eq!(
        (&got.body["reserved"], &got.body["version"]),
        (&json!(0), &json!(0))
    );
    let stale = put(
        &t,
        "p-old",
        json!({"name": "Old", "priceCents": 90}),
        Some("\"v1\""),
    )
    .await;
    assert_eq!(stale.status, 412, "{}", stale.raw);
    let changed = put(
        &t,
        "p-old",
        json!({"name": "Old", "priceCents": 90}),
        Some("\"v0\""),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.raw);
    assert_eq!(changed.headers["etag"], "\"v1\"");
    assert_eq!(changed.body["quantity"], 7);
    let r = t.adjust_stock("p-old", -7, "recount", None).await;
    assert_eq!(
        (r.status, &r.body["quantityAfter"]),
        (201, &json!(0)),
        "{}",
        r.raw
    );
    t.stop().await;
}
