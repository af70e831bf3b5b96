//! The events of `events/` and what each must do, shared by every path that invokes the
//! functions: the release binaries under cargo-lambda's Runtime API (tests/tests/binaries.rs)
//! and SAM's local invoke path in Lambda containers (tests/tests/sam_local.rs). A new event
//! goes into [`EVENTS`] and into its function's scenario here, and both tests then run it.
//!
//! A scenario gets a [`TestStack`] of its own (started paused, so that nothing but the function
//! under test handles the events) and a [`Calls`] around the [`Invoke`] of the path under test;
//! [`run_scenario`] runs the scenario of one function and then checks that it invoked every
//! event listed for that function.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::{Value, json};

use crate::TestStack;

/// Every file under events/, with the function it is for. A file missing here fails
/// `every_event_file_is_shaped_as_aws_delivers_it_and_is_tested` (tests/tests/binaries.rs), and
/// one listed here that no scenario invokes fails [`run_scenario`].
pub const EVENTS: &[(&str, &str)] = &[
    ("api-put-product.json", "OrderApiFunction"),
    ("api-put-product-not-operator.json", "OrderApiFunction"),
    ("api-get-product.json", "OrderApiFunction"),
    ("api-get-product-not-found.json", "OrderApiFunction"),
    ("api-place-order.json", "OrderApiFunction"),
    ("api-place-order-idempotency-key.json", "OrderApiFunction"),
    ("api-place-order-invalid-body.json", "OrderApiFunction"),
    ("api-place-order-malformed-json.json", "OrderApiFunction"),
    ("api-place-order-unknown-product.json", "OrderApiFunction"),
    (
        "api-place-order-wrong-content-type.json",
        "OrderApiFunction",
    ),
    ("api-get-order.json", "OrderApiFunction"),
    ("api-get-order-not-found.json", "OrderApiFunction"),
    ("api-get-order-other-customer.json", "OrderApiFunction"),
    ("api-list-orders.json", "OrderApiFunction"),
    ("api-cancel-order-other-customer.json", "OrderApiFunction"),
    ("api-cancel-order.json", "OrderApiFunction"),
    ("api-place-order-no-authorizer.json", "OrderApiFunction"),
    ("api-adjust-stock.json", "OrderApiFunction"),
    ("api-adjust-stock-below-zero.json", "OrderApiFunction"),
    ("api-put-product-change.json", "OrderApiFunction"),
    ("api-put-product-if-match-stale.json", "OrderApiFunction"),
    (
        "api-put-product-quantity-on-existing.json",
        "OrderApiFunction",
    ),
    ("sqs-stock-reserve.json", "StockFunction"),
    ("sqs-stock-reserve-duplicate.json", "StockFunction"),
    ("sqs-stock-reserve-rejected.json", "StockFunction"),
    ("sqs-stock-release.json", "StockFunction"),
    ("sqs-stock-release-fence.json", "StockFunction"),
    ("sqs-stock-reserve-after-fence.json", "StockFunction"),
    ("sqs-stock-batch-with-malformed.json", "StockFunction"),
    ("sqs-payment-charge.json", "PaymentFunction"),
    ("sqs-payment-charge-duplicate.json", "PaymentFunction"),
    ("sqs-payment-charge-declined.json", "PaymentFunction"),
    ("sqs-payment-refund.json", "PaymentFunction"),
    ("sqs-payment-refund-unseen.json", "PaymentFunction"),
    ("sqs-payment-charge-after-fence.json", "PaymentFunction"),
    ("sqs-payment-batch-with-malformed.json", "PaymentFunction"),
    ("sqs-coordinator-stock-reserved.json", "CoordinatorFunction"),
    (
        "sqs-coordinator-payment-charged.json",
        "CoordinatorFunction",
    ),
    ("sqs-coordinator-duplicate.json", "CoordinatorFunction"),
    ("sqs-coordinator-stock-rejected.json", "CoordinatorFunction"),
    (
        "sqs-coordinator-order-timed-out.json",
        "CoordinatorFunction",
    ),
    (
        "sqs-coordinator-order-cancelled.json",
        "CoordinatorFunction",
    ),
    (
        "sqs-coordinator-batch-with-malformed.json",
        "CoordinatorFunction",
    ),
    ("scheduled-sweep.json", "SweeperFunction"),
];

/// The customer (the token's `sub`) of the API events signed in as alice, and of the orders
/// the events read.
pub const ALICE: &str = "7d8ca528-4931-4254-9273-ea5ee853f271";

/// The operator (the token's `sub`) of the API events signed in as ops.
pub const OPS: &str = "0c1f3b8e-52a1-4d7a-9f7e-3b1a2c4d5e6f";

/// `SentTimestamp` of the events' messages, and the `cutoffMs` of the OrderTimedOut event.
pub const EVENT_TIME_MS: i64 = 1_767_225_600_000;
fn repo() -> PathBuf {
    crate::repo_root()
}

pub fn event_path(file: &str) -> PathBuf {
    repo().join("events").join(file)
}

pub fn read_event(file: &str) -> Value {
    let text =
        std::fs::read_to_string(event_path(file)).unwrap_or_else(|e| panic!("events/{file}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("events/{file} is not JSON: {e}"))
}

/// The messageId of the record of `file` whose body does not parse as a message.
pub fn malformed_record_id(file: &str) -> String {
    let ids: Vec<String> = read_event(file)["Records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let body = r["body"].as_str().unwrap_or_default();
            match serde_json::from_str::<Value>(body) {
                // The coordinator's malformed record is valid JSON with a field no message has.
                Ok(v) => v.get("unexpected").is_some(),
                Err(_) => true,
            }
        })
        .map(|r| r["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "events/{file} should have one malformed record"
    );
    ids[0].clone()
}

/// Every message now in a queue, parsed (and removed).
pub async fn messages(t: &TestStack, queue: &str) -> Vec<Value> {
    let mut out: Vec<Value> = t
        .drain(queue)
        .await
        .iter()
        .map(|b| serde_json::from_str(b).expect("queue message is JSON"))
        .collect();
    out.sort_by_key(|m| m.to_string());
    out
}

/// An order record as the API writes it, with a fixed id.
pub fn order(
    id: &str,
    stock: &str,
    payment: &str,
    payment_id: Option<&str>,
    created_ms: i64,
) -> Value {
    let mut o = json!({
        "orderId": id,
        "customerId": ALICE,
        "status": "PENDING",
        "stockStatus": stock,
        "paymentStatus": payment,
        "items": [{"productId": "p-event-1", "quantity": 2, "unitPriceCents": 1250}],
        "totalCents": 2500,
        "paymentMethod": "tok_visa",
        "createdAt": "2026-01-01T00:00:00Z",
        "updatedAt": "2026-01-01T00:00:00Z",
        "createdAtMs": created_ms,
        "pendingSweep": "PENDING",
    });
    if let Some(p) = payment_id {
        o["paymentId"] = json!(p);
    }
    o
}

pub async fn seed_order(t: &TestStack, order: Value) {
    let order: saga_core::domain::Order =
        serde_json::from_value(order).expect("a valid order record");
    let item: std::collections::HashMap<String, AttributeValue> =
        serde_dynamo::to_item(&order).expect("order to item");
    t.stack
        .clients
        .dynamodb
        .put_item()
        .table_name(t.stack.table("OrdersTable"))
        .set_item(Some(item))
        .send()
        .await
        .expect("seed order");
}

pub fn now_ms() -> i64 {
    saga_core::time::now_ms()
}

/// One way of invoking a function: sends `events/<file>` as the event, returns the function's
/// JSON response (and fails the test on an invocation error).
pub trait Invoke {
    fn invoke(&mut self, file: &str) -> impl Future<Output = Value>;
}

/// An [`Invoke`] that remembers which events it sent, with the helpers the scenarios use.
pub struct Calls<I> {
    inner: I,
    invoked: BTreeSet<String>,
}

impl<I: Invoke> Calls<I> {
    pub fn new(inner: I) -> Self {
        Calls {
            inner,
            invoked: BTreeSet::new(),
        }
    }

    /// The function's JSON response to `events/<file>`.
    pub async fn invoke(&mut self, file: &str) -> Value {
        assert!(event_path(file).exists(), "events/{file} is missing");
        self.invoked.insert(file.to_string());
        self.inner.invoke(file).await
    }

    /// Invokes an API event: (status, headers, JSON body).
    pub async fn http(&mut self, file: &str) -> (u64, Value, Value) {
        let r = self.invoke(file).await;
        let status = r["statusCode"]
            .as_u64()
            .unwrap_or_else(|| panic!("events/{file}: no statusCode in {r}"));
        let body = r["body"].as_str().unwrap_or_default();
        let body = serde_json::from_str(body).unwrap_or(Value::Null);
        (status, r["headers"].clone(), body)
    }

    /// Invokes an SQS event: the ids in `batchItemFailures`.
    pub async fn batch(&mut self, file: &str) -> Vec<String> {
        let r = self.invoke(file).await;
        let failures = r["batchItemFailures"]
            .as_array()
            .unwrap_or_else(|| panic!("events/{file}: no batchItemFailures in {r}"));
        failures
            .iter()
            .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
            .collect()
    }

    /// The path under test (to stop it, read its logs, ...).
    pub fn inner(&mut self) -> &mut I {
        &mut self.inner
    }
}

/// The functions that have events, in the order the scenarios run.
pub fn functions() -> Vec<&'static str> {
    let mut seen = Vec::new();
    for (_, f) in EVENTS {
        if !seen.contains(f) {
            seen.push(*f);
        }
    }
    seen
}

/// Runs `function`'s scenario on `t` through `invoke`, then checks that it invoked exactly the
/// events [`EVENTS`] lists for that function.
pub async fn run_scenario<I: Invoke>(function: &str, t: &TestStack, invoke: I) -> I {
    let mut f = Calls::new(invoke);
    match function {
        "OrderApiFunction" => order_api(t, &mut f).await,
        "StockFunction" => stock(t, &mut f).await,
        "PaymentFunction" => payment(t, &mut f).await,
        "CoordinatorFunction" => coordinator(t, &mut f).await,
        "SweeperFunction" => sweeper(t, &mut f).await,
        other => panic!("no scenario for {other}: add one to tests/src/events.rs"),
    }
    let listed: BTreeSet<String> = EVENTS
        .iter()
        .filter(|(_, fun)| *fun == function)
        .map(|(file, _)| file.to_string())
        .collect();
    assert_eq!(
        f.invoked, listed,
        "{function}'s scenario must invoke exactly the events EVENTS lists for it"
    );
    f.inner
}

/// The order API: products created and read, orders placed (with and without an
/// Idempotency-Key) and read, stock adjusted (a key replayed), a price changed under If-Match,
/// every refused request refused with its code; each accepted order started its saga once and
/// the refused ones sent nothing.
pub async fn order_api<I: Invoke>(t: &TestStack, f: &mut Calls<I>) {
    let (status, headers, body) = f.http("api-put-product.json").await;
    let product = json!({"productId": "p-event-1", "name": "Event widget", "priceCents": 1250, "quantity": 100, "reserved": 0, "version": 1});
    assert_eq!((status, &body), (201, &product));
    assert_eq!(headers["etag"], "\"v1\"");
    let (status, headers, body) = f.http("api-get-product.json").await;
    assert_eq!((status, &body), (200, &product));
    assert_eq!(headers["etag"], "\"v1\"");
    let (status, _, body) = f.http("api-get-product-not-found.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );

    let (status, headers, body) = f.http("api-place-order.json").await;
    assert_eq!(status, 202, "{body}");
    let order_id = body["orderId"].as_str().expect("orderId").to_string();
    assert_eq!(headers["location"], format!("/orders/{order_id}"));
    assert_eq!(body["status"], "PENDING");
    assert_eq!(body["totalCents"], 2500);
    assert_eq!(body["customerId"], ALICE, "the customer is the token's sub");

    // The same Idempotency-Key twice: one order, the second answer replayed.
    let (s1, _, b1) = f.http("api-place-order-idempotency-key.json").await;
    let (s2, h2, b2) = f.http("api-place-order-idempotency-key.json").await;
    assert_eq!((s1, s2), (202, 202), "{b1} {b2}");
    assert_eq!(b1["orderId"], b2["orderId"]);
    assert_ne!(b1["orderId"], body["orderId"]);
    assert_eq!(h2["idempotent-replayed"], "true");
    let keyed_id = b1["orderId"].as_str().unwrap().to_string();

    for (file, status, code) in [
        ("api-place-order-invalid-body.json", 400, "INVALID_REQUEST"),
        ("api-place-order-malformed-json.json", 400, "MALFORMED_JSON"),
        (
            "api-place-order-unknown-product.json",
            400,
            "UNKNOWN_PRODUCT",
        ),
        (
            "api-place-order-wrong-content-type.json",
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
    ] {
        let (s, _, b) = f.http(file).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{file}: {b}"
        );
        assert!(b["error"]["message"].is_string(), "{file}: {b}");
    }

    seed_order(
        t,
        order("o-event-api", "PENDING", "PENDING", None, now_ms()),
    )
    .await;
    let (status, _, body) = f.http("api-get-order.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["orderId"], "o-event-api");
    assert_eq!(body["status"], "PENDING");
    let (status, _, body) = f.http("api-get-order-not-found.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    // Bob asks for Alice's order: the same answer as for an order that does not exist.
    let (status, _, theirs) = f.http("api-get-order-other-customer.json").await;
    assert_eq!(status, 404, "{theirs}");
    assert_eq!(
        theirs["error"]["message"]
            .as_str()
            .unwrap()
            .replace("o-event-api", "X"),
        body["error"]["message"]
            .as_str()
            .unwrap()
            .replace("o-event-missing", "X"),
    );
    // Alice's list: her three orders; nobody else's.
    let (status, _, list) = f.http("api-list-orders.json").await;
    assert_eq!(status, 200, "{list}");
    let listed: BTreeSet<&str> = (list["orders"].as_array().unwrap().iter())
        .map(|o| o["orderId"].as_str().unwrap())
        .collect();
    let expected = BTreeSet::from([order_id.as_str(), keyed_id.as_str(), "o-event-api"]);
    assert_eq!(listed, expected);
    assert!(list.get("nextToken").is_none());
    // A customer changing a product: 403, and the product is as it was.
    let (status, _, body) = f.http("api-put-product-not-operator.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("FORBIDDEN"))
    );
    let (_, _, after) = f.http("api-get-product.json").await;
    assert_eq!(after, product);
    // Bob cancelling Alice's order: the 404 of a missing order, and the order untouched.
    let (status, _, body) = f.http("api-cancel-order-other-customer.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{body}"
    );
    // Alice cancels it (twice: the second answers the same final order).
    for _ in 0..2 {
        let (status, _, body) = f.http("api-cancel-order.json").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "CANCELLED");
        assert_eq!(body["cancelReason"], "CUSTOMER_CANCELLED");
    }

    // Stock changes through an adjustment, recorded as a movement; the same key again replays
    // the same movement and adjusts once.
    let (status, _, movement) = f.http("api-adjust-stock.json").await;
    assert_eq!(status, 201, "{movement}");
    assert_eq!(
        (
            &movement["productId"],
            &movement["delta"],
            &movement["quantityAfter"],
            &movement["actor"],
            &movement["reason"]
        ),
        (
            &json!("p-event-1"),
            &json!(5),
            &json!(105),
            &json!(OPS),
            &json!("restock: delivery 2026-001")
        ),
        "{movement}"
    );
    let (status, headers, again) = f.http("api-adjust-stock.json").await;
    assert_eq!((status, &again), (201, &movement));
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, body) = f.http("api-adjust-stock-below-zero.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("INSUFFICIENT_STOCK")),
        "{body}"
    );
    assert_eq!(t.product_quantity("p-event-1").await, 105);
    let movements = t.movements("p-event-1").await;
    assert_eq!(
        movements.iter().map(|m| m.delta).collect::<Vec<_>>(),
        [100, 5],
        "the initial stock, then the adjustment: {movements:?}"
    );
    assert_eq!(json!(movements[1]), movement);

    // Name and price change under If-Match, stock untouched; a stale ETag and a quantity for
    // an existing product are refused and change nothing.
    let (status, headers, changed) = f.http("api-put-product-change.json").await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (
            &changed["priceCents"],
            &changed["quantity"],
            &changed["version"]
        ),
        (&json!(990), &json!(105), &json!(2))
    );
    assert_eq!(headers["etag"], "\"v2\"");
    let (status, _, body) = f.http("api-put-product-if-match-stale.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (412, Some("PRECONDITION_FAILED")),
        "{body}"
    );
    let (status, _, body) = f.http("api-put-product-quantity-on-existing.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("QUANTITY_NOT_WRITABLE")),
        "{body}"
    );
    let (_, _, after) = f.http("api-get-product.json").await;
    assert_eq!(after, changed);
    assert_eq!(t.movements("p-event-1").await.len(), 2);
    // Reached without the authorizer (a route deployed without it): 401, nothing written.
    let (status, headers, body) = f.http("api-place-order-no-authorizer.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED"))
    );
    assert_eq!(headers["www-authenticate"], "Bearer");

    // Each accepted order started its saga once: a reservation and a charge; the refused
    // requests sent nothing.
    let reserve = |id: &str| json!({"type": "ReserveStock", "orderId": id, "items": [{"productId": "p-event-1", "quantity": 2}]});
    let charge = |id: &str| json!({"type": "ChargePayment", "orderId": id, "customerId": ALICE, "amountCents": 2500, "paymentMethod": "tok_visa"});
    // The cancelled order's results were never seen: its steps are released or fenced off.
    let release = json!({"type": "ReleaseStock", "orderId": "o-event-api", "items": [{"productId": "p-event-1", "quantity": 2}], "fence": true});
    let refund = json!({"type": "RefundPayment", "orderId": "o-event-api", "amountCents": 2500});
    let mut expected_stock = vec![reserve(&order_id), reserve(&keyed_id), release];
    expected_stock.sort_by_key(|m| m.to_string());
    let mut expected_payment = vec![charge(&order_id), charge(&keyed_id), refund];
    expected_payment.sort_by_key(|m| m.to_string());
    assert_eq!(messages(t, "StockQueue").await, expected_stock);
    assert_eq!(messages(t, "PaymentQueue").await, expected_payment);
}

/// The stock consumer: reserves once (a redelivery publishes the recorded result again), rejects
/// a short item as a business outcome, releases, and fails only the malformed record.
pub async fn stock<I: Invoke>(t: &TestStack, f: &mut Calls<I>) {
    t.put_product("p-event-1", 1250, 100).await;
    t.put_product("p-event-scarce", 900, 1).await;
    let reserved = |id: &str| json!({"type": "StockReserved", "orderId": id});

    assert_eq!(
        f.batch("sqs-stock-reserve.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-1").await, 98);
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [reserved("o-event-stock-1")]
    );

    // Redelivered: nothing reserved twice, the recorded result published again.
    assert_eq!(
        f.batch("sqs-stock-reserve-duplicate.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-1").await, 98);
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [reserved("o-event-stock-1")]
    );

    // Not enough stock: a business outcome, so the record succeeds.
    assert_eq!(
        f.batch("sqs-stock-reserve-rejected.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-scarce").await, 1);
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [
            json!({"type": "StockRejected", "orderId": "o-event-stock-2", "reason": "INSUFFICIENT_STOCK", "productId": "p-event-scarce"})
        ]
    );

    assert_eq!(
        f.batch("sqs-stock-release.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-1").await, 100);
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [json!({"type": "StockReleased", "orderId": "o-event-stock-1"})]
    );

    // An order cancelled before its reservation was seen, and never reserved: the release
    // fences the reservation off, and the ReserveStock that arrives after it holds nothing.
    let voided = json!({"type": "StockVoided", "orderId": "o-event-stock-9"});
    for file in [
        "sqs-stock-release-fence.json",
        "sqs-stock-reserve-after-fence.json",
    ] {
        assert_eq!(f.batch(file).await, Vec::<String>::new(), "{file}");
        assert_eq!(t.product_quantity("p-event-1").await, 100, "{file}");
        assert_eq!(
            messages(t, "CoordinatorQueue").await,
            std::slice::from_ref(&voided),
            "{file}"
        );
    }

    let file = "sqs-stock-batch-with-malformed.json";
    assert_eq!(f.batch(file).await, [malformed_record_id(file)]);
    assert_eq!(t.product_quantity("p-event-1").await, 98);
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [reserved("o-event-stock-3"), reserved("o-event-stock-4")]
    );
}

/// The payment consumer: charges once (a redelivery reports the same payment), declines as a
/// business outcome, refunds, and fails only the malformed record.
pub async fn payment<I: Invoke>(t: &TestStack, f: &mut Calls<I>) {
    assert_eq!(
        f.batch("sqs-payment-charge.json").await,
        Vec::<String>::new()
    );
    let first = messages(t, "CoordinatorQueue").await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["type"], "PaymentCharged");
    assert_eq!(first[0]["orderId"], "o-event-pay-1");
    let payment_id = first[0]["paymentId"].as_str().unwrap().to_string();
    assert!(payment_id.starts_with("ch_"), "{payment_id}");

    // Redelivered: the provider is not called again; the same payment is reported.
    assert_eq!(
        f.batch("sqs-payment-charge-duplicate.json").await,
        Vec::<String>::new()
    );
    assert_eq!(messages(t, "CoordinatorQueue").await, first);
    let charges = |ledger: &[(String, String, Option<String>)], id: &str| {
        ledger
            .iter()
            .filter(|(k, o, _)| k == "CHARGE" && o == id)
            .count()
    };
    assert_eq!(charges(&t.ledger().await, "o-event-pay-1"), 1);

    // A declined card is a business outcome: the record succeeds.
    assert_eq!(
        f.batch("sqs-payment-charge-declined.json").await,
        Vec::<String>::new()
    );
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [json!({"type": "PaymentDeclined", "orderId": "o-event-pay-2", "reason": "CARD_DECLINED"})]
    );

    assert_eq!(
        f.batch("sqs-payment-refund.json").await,
        Vec::<String>::new()
    );
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [
            json!({"type": "PaymentRefunded", "orderId": "o-event-pay-1", "paymentId": "ch_event0001"})
        ]
    );

    // An order cancelled before its charge was seen, and never charged: the refund fences the
    // charge off, and the ChargePayment that arrives after it charges nothing.
    let ledger_before = t.ledger().await.len();
    let voided = json!({"type": "PaymentVoided", "orderId": "o-event-pay-9"});
    for file in [
        "sqs-payment-refund-unseen.json",
        "sqs-payment-charge-after-fence.json",
    ] {
        assert_eq!(f.batch(file).await, Vec::<String>::new(), "{file}");
        assert_eq!(
            messages(t, "CoordinatorQueue").await,
            std::slice::from_ref(&voided),
            "{file}"
        );
    }
    assert_eq!(
        t.ledger().await.len(),
        ledger_before,
        "no charge, no refund"
    );
    assert!(
        t.ledger()
            .await
            .iter()
            .any(|(k, o, _)| k == "REFUND" && o == "o-event-pay-1")
    );

    let file = "sqs-payment-batch-with-malformed.json";
    assert_eq!(f.batch(file).await, [malformed_record_id(file)]);
    let results = messages(t, "CoordinatorQueue").await;
    let charged: BTreeSet<&str> = results
        .iter()
        .filter(|m| m["type"] == "PaymentCharged")
        .map(|m| m["orderId"].as_str().unwrap())
        .collect();
    assert_eq!(
        charged,
        BTreeSet::from(["o-event-pay-3", "o-event-pay-4"]),
        "{results:?}"
    );
    assert_eq!(results.len(), 2, "{results:?}");
}

/// The coordinator: moves each order on, ignores a duplicate, cancels and compensates, times out,
/// and fails only the malformed record.
pub async fn coordinator<I: Invoke>(t: &TestStack, f: &mut Calls<I>) {
    let created = now_ms();
    seed_order(
        t,
        order("o-event-coord-1", "PENDING", "PENDING", None, created),
    )
    .await;
    seed_order(
        t,
        order(
            "o-event-coord-2",
            "PENDING",
            "CHARGED",
            Some("ch_event0002"),
            created,
        ),
    )
    .await;
    seed_order(
        t,
        order("o-event-coord-3", "PENDING", "PENDING", None, created),
    )
    .await;
    seed_order(
        t,
        order("o-event-coord-4", "PENDING", "PENDING", None, created),
    )
    .await;
    // Created before the OrderTimedOut event's cutoff.
    seed_order(
        t,
        order(
            "o-event-coord-5",
            "PENDING",
            "PENDING",
            None,
            EVENT_TIME_MS - 600_000,
        ),
    )
    .await;

    assert_eq!(
        f.batch("sqs-coordinator-stock-reserved.json").await,
        Vec::<String>::new()
    );
    let o = t.order("o-event-coord-1").await;
    assert_eq!(
        (o["status"].as_str(), o["stockStatus"].as_str()),
        (Some("PENDING"), Some("RESERVED"))
    );

    assert_eq!(
        f.batch("sqs-coordinator-payment-charged.json").await,
        Vec::<String>::new()
    );
    let o = t.order("o-event-coord-1").await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(o["paymentId"], "ch_event0001");

    // A duplicate of a fact already applied changes nothing.
    assert_eq!(
        f.batch("sqs-coordinator-duplicate.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.order("o-event-coord-1").await, o);

    // Stock rejected for an order already charged: cancelled, and the charge refunded.
    assert_eq!(
        f.batch("sqs-coordinator-stock-rejected.json").await,
        Vec::<String>::new()
    );
    let o = t.order("o-event-coord-2").await;
    assert_eq!(o["status"], "CANCELLED", "{o}");
    assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK");
    assert_eq!(o["cancelProductId"], "p-event-scarce");
    assert_eq!(
        messages(t, "PaymentQueue").await,
        [
            json!({"type": "RefundPayment", "orderId": "o-event-coord-2", "paymentId": "ch_event0002", "amountCents": 2500})
        ]
    );

    assert_eq!(
        f.batch("sqs-coordinator-order-timed-out.json").await,
        Vec::<String>::new()
    );
    let o = t.order("o-event-coord-5").await;
    assert_eq!(
        (o["status"].as_str(), o["cancelReason"].as_str()),
        (Some("CANCELLED"), Some("TIMEOUT")),
        "{o}"
    );
    // Cancelled before either result was seen: both steps are undone if they ran, fenced off
    // if not.
    let fence = |id: &str| json!({"type": "ReleaseStock", "orderId": id, "items": [{"productId": "p-event-1", "quantity": 2}], "fence": true});
    assert_eq!(messages(t, "StockQueue").await, [fence("o-event-coord-5")]);
    assert_eq!(
        messages(t, "PaymentQueue").await,
        [json!({"type": "RefundPayment", "orderId": "o-event-coord-5", "amountCents": 2500})]
    );

    // A customer's cancellation handed over again by the sweeper (the API died before sending
    // the compensations): both steps were seen, so both are undone, and the mark is cleared.
    let mut cancelled = order(
        "o-event-coord-6",
        "RESERVED",
        "CHARGED",
        Some("ch_event0006"),
        created,
    );
    cancelled["status"] = json!("CANCELLED");
    cancelled["cancelReason"] = json!("CUSTOMER_CANCELLED");
    cancelled["pendingSweep"] = json!("CANCELLING");
    seed_order(t, cancelled).await;
    assert_eq!(
        f.batch("sqs-coordinator-order-cancelled.json").await,
        Vec::<String>::new()
    );
    assert_eq!(
        messages(t, "StockQueue").await,
        [
            json!({"type": "ReleaseStock", "orderId": "o-event-coord-6", "items": [{"productId": "p-event-1", "quantity": 2}]})
        ]
    );
    assert_eq!(
        messages(t, "PaymentQueue").await,
        [
            json!({"type": "RefundPayment", "orderId": "o-event-coord-6", "paymentId": "ch_event0006", "amountCents": 2500})
        ]
    );
    let o = t.order("o-event-coord-6").await;
    assert_eq!(o["status"], "CANCELLED");
    let item = t
        .scan("OrdersTable")
        .await
        .into_iter()
        .find(|i| {
            i.get("orderId")
                .and_then(|v| v.as_s().ok())
                .map(String::as_str)
                == Some("o-event-coord-6")
        })
        .expect("the order");
    assert!(!item.contains_key("pendingSweep"), "the mark is cleared");

    let file = "sqs-coordinator-batch-with-malformed.json";
    assert_eq!(f.batch(file).await, [malformed_record_id(file)]);
    assert_eq!(t.order("o-event-coord-3").await["stockStatus"], "RESERVED");
    let o = t.order("o-event-coord-4").await;
    assert_eq!(
        (o["status"].as_str(), o["cancelReason"].as_str()),
        (Some("CANCELLED"), Some("PAYMENT_DECLINED")),
        "{o}"
    );

    // The declined order was cancelled before its reservation was seen: released if it ran,
    // fenced off if not. Its payment was declined: nothing to refund.
    assert_eq!(messages(t, "StockQueue").await, [fence("o-event-coord-4")]);
    assert_eq!(messages(t, "PaymentQueue").await, Vec::<Value>::new());
}

/// The sweeper: hands over exactly the stale pending orders.
pub async fn sweeper<I: Invoke>(t: &TestStack, f: &mut Calls<I>) {
    let now = now_ms();
    let hour_ago = now - 3_600_000;
    seed_order(
        t,
        order("o-event-sweep-1", "PENDING", "PENDING", None, hour_ago),
    )
    .await;
    seed_order(
        t,
        order("o-event-sweep-2", "RESERVED", "PENDING", None, hour_ago),
    )
    .await;
    // Too recent to time out.
    seed_order(t, order("o-event-sweep-3", "PENDING", "PENDING", None, now)).await;
    // Old but already final: not in the pending index.
    let mut confirmed = order(
        "o-event-sweep-4",
        "RESERVED",
        "CHARGED",
        Some("ch_x"),
        hour_ago,
    );
    confirmed["status"] = json!("CONFIRMED");
    confirmed.as_object_mut().unwrap().remove("pendingSweep");
    seed_order(t, confirmed).await;
    // Cancelled by its customer, whose API call died before sending the compensations: still
    // marked as cancelling, so the coordinator gets it again.
    let mut cancelling = order("o-event-sweep-5", "RESERVED", "PENDING", None, now);
    cancelling["status"] = json!("CANCELLED");
    cancelling["cancelReason"] = json!("CUSTOMER_CANCELLED");
    cancelling["pendingSweep"] = json!("CANCELLING");
    seed_order(t, cancelling).await;

    let summary = f.invoke("scheduled-sweep.json").await;
    assert_eq!(summary["timedOut"], 2, "{summary}");
    assert_eq!(summary["cancelling"], 1, "{summary}");
    let cutoff = summary["cutoffMs"].as_i64().expect("cutoffMs");
    let timeout_ms = 1000
        * t.stack.environments["SweeperFunction"]["ORDER_TIMEOUT_SECONDS"]
            .parse::<i64>()
            .unwrap();
    assert!(
        (now - timeout_ms..=now_ms() - timeout_ms).contains(&cutoff),
        "{summary}"
    );
    assert_eq!(
        messages(t, "CoordinatorQueue").await,
        [
            json!({"type": "OrderTimedOut", "orderId": "o-event-sweep-1", "cutoffMs": cutoff}),
            json!({"type": "OrderTimedOut", "orderId": "o-event-sweep-2", "cutoffMs": cutoff}),
            json!({"type": "OrderCancelled", "orderId": "o-event-sweep-5"}),
        ]
    );
}
