//! Hostile input: bad API requests are refused with a 4xx and a JSON error, and write nothing;
//! arbitrary bytes and paths never make the API panic or answer 5xx; queue consumers refuse
//! what is not one of their messages, record by record.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_http::{Body, RequestExt};
use lambda_runtime::{Context, LambdaEvent};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use saga_core::aws::AwsClients;
use saga_core::config::{CoordinatorConfig, OrderApiConfig, PaymentConfig, StockConfig};
use saga_core::domain::{self, StockLine};
use saga_core::faults::Faults;
use saga_core::handlers::api::ApiHandler;
use saga_core::handlers::batch::SqsHandler;
use saga_core::handlers::{
    coordinator::CoordinatorHandler, payment::PaymentHandler, stock::StockHandler,
};
use saga_core::messages::{self, PaymentCommand, SagaEvent, StockCommand, StockRejection};
use saga_tests::{Reply, TestStack};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn clients(t: &TestStack) -> AwsClients {
    AwsClients {
        dynamodb: t.stack.clients.dynamodb.clone(),
        sqs: t.stack.clients.sqs.clone(),
    }
}

fn lookup(t: &TestStack, function: &str) -> impl Fn(&str) -> Option<String> + use<> {
    let env = t.stack.environments[function].clone();
    move |k: &str| env.get(k).cloned()
}

/// Everything a request could have written.
#[derive(Debug, PartialEq)]
struct Snapshot {
    orders: usize,
    idempotency: usize,
    products: Vec<BTreeMap<String, AttributeValue>>,
    movements: usize,
    stock_queue: i64,
    payment_queue: i64,
    coordinator_queue: i64,
}

async fn snapshot(t: &TestStack) -> Snapshot {
    let mut products: Vec<BTreeMap<String, AttributeValue>> = t
        .scan("ProductsTable")
        .await
        .into_iter()
        .map(|i| i.into_iter().collect())
        .collect();
    products.sort_by_key(|p| format!("{:?}", p.get("productId")));
    Snapshot {
        orders: t.scan("OrdersTable").await.len(),
        idempotency: t.scan("IdempotencyTable").await.len(),
        products,
        movements: t.scan("StockMovementsTable").await.len(),
        stock_queue: t.queue_depth("StockQueue").await,
        payment_queue: t.queue_depth("PaymentQueue").await,
        coordinator_queue: t.queue_depth("CoordinatorQueue").await,
    }
}

/// One bad request and the answer it must get.
struct Case {
    name: String,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(
    name: impl Into<String>,
    method: &'static str,
    path: impl Into<String>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.into(),
        content_type: Some("application/json"),
        body: body.into(),
        status,
        code,
    }
}

fn order_case(name: &str, body: impl Into<Vec<u8>>, code: &'static str) -> Case {
    case(name, "POST", "/orders", body, 400, code)
}

fn order_json(name: &str, body: Value, code: &'static str) -> Case {
    order_case(name, body.to_string(), code)
}

fn product_json(name: &str, body: Value) -> Case {
    case(
        name,
        "PUT",
        "/products/p-1",
        body.to_string(),
        400,
        "INVALID_REQUEST",
    )
}

fn valid_order() -> Value {
    json!({"items": [{"productId": "p-1", "quantity": 1}], "paymentMethod": "tok_visa"})
}

fn valid_product() -> Value {
    json!({"name": "Mug", "priceCents": 100, "quantity": 5})
}

fn with(mut base: Value, pointer: &str, value: Value) -> Value {
    *base.pointer_mut(pointer).expect("pointer exists") = value;
    base
}

fn without(mut base: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    base.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent object")
        .remove(key);
    base
}

/// `value` spliced into JSON text as is (for numbers serde_json would not produce).
fn raw_quantity(quantity: &str) -> String {
    format!(r#"{{"items":[{{"productId":"p-1","quantity":{quantity}}}]}}"#)
}

fn padded(body: &Value, len: usize) -> Vec<u8> {
    let mut bytes = body.to_string().into_bytes();
    assert!(bytes.len() <= len);
    bytes.resize(len, b' ');
    bytes
}

fn assert_error_body(r: &Reply, context: &str) {
    assert!(
        r.body["error"]["code"].is_string() && r.body["error"]["message"].is_string(),
        "{context}: not a JSON error body: {}",
        r.raw
    );
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/json"),
        "{context}"
    );
}

/// Sends raw bytes over TCP (for request targets an HTTP client refuses to build). `None` when
/// the server closed the connection without answering.
async fn raw_http(addr: SocketAddr, request: &[u8]) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(request).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn raw_request_bytes(method: &str, target: &[u8], body: &[u8]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    req.extend_from_slice(b"Content-Type: application/json\r\n");
    req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    req
}

// ---------------------------------------------------------------------------------------------
// Table-driven bad requests
// ---------------------------------------------------------------------------------------------

fn bad_requests() -> Vec<Case> {
    let mut cases = Vec::new();
    let v = valid_order;

    // Not JSON at all.
    for (name, body) in [
        ("empty body", ""),
        ("whitespace only", "   \n"),
        ("unclosed object", "{"),
        ("truncated", r#"{"paymentMethod": "tok_visa","#),
        ("plain text", "not json"),
        ("single quotes", "{'paymentMethod': 'tok_visa'}"),
        (
            "missing comma",
            r#"{"paymentMethod":"tok_visa" "items":[]}"#,
        ),
        (
            "trailing comma",
            r#"{"paymentMethod":"tok_visa","items":[],}"#,
        ),
        (
            "comment",
            r#"{"paymentMethod":"tok_visa", /* hi */ "items":[]}"#,
        ),
        ("NaN", r#"{"items":[{"productId":"p-1","quantity":NaN}]}"#),
        (
            "trailing garbage",
            r#"{"items":[{"productId":"p-1","quantity":1}]} x"#,
        ),
        (
            "two objects",
            r#"{"items":[{"productId":"p-1","quantity":1}]}{"items":[{"productId":"p-1","quantity":1}]}"#,
        ),
        (
            "lone surrogate escape",
            r#"{"paymentMethod":"tok-\ud800","items":[{"productId":"p-1","quantity":1}]}"#,
        ),
        (
            "raw control character in a string",
            "{\"paymentMethod\":\"tok-\u{1}\",\"items\":[{\"productId\":\"p-1\",\"quantity\":1}]}",
        ),
    ] {
        cases.push(order_case(name, body, "MALFORMED_JSON"));
    }
    // Not UTF-8.
    cases.push(order_case(
        "non-UTF-8 bytes",
        b"\xff\xfe\x00{\x00}".to_vec(),
        "MALFORMED_JSON",
    ));
    cases.push(order_case(
        "invalid UTF-8 inside a string",
        b"{\"paymentMethod\":\"tok-\xc3\x28\",\"items\":[{\"productId\":\"p-1\",\"quantity\":1}]}"
            .to_vec(),
        "MALFORMED_JSON",
    ));
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(v().to_string().as_bytes());
    cases.push(order_case("UTF-8 byte order mark", bom, "MALFORMED_JSON"));
    let utf16: Vec<u8> = v()
        .to_string()
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    cases.push(order_case("UTF-16 text", utf16, "MALFORMED_JSON"));

    // Deeply nested.
    let depth = 5_000;
    cases.push(order_case(
        "deeply nested arrays",
        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        "INVALID_REQUEST",
    ));
    cases.push(order_case(
        "deeply nested objects as the payment method",
        format!(
            r#"{{"paymentMethod":{}1{}}}"#,
            r#"{"a":"#.repeat(2_000),
            "}".repeat(2_000)
        ),
        "INVALID_REQUEST",
    ));
    cases.push(order_case(
        "deeply nested arrays as the items",
        format!(
            r#"{{"paymentMethod":"tok_visa","items":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        "INVALID_REQUEST",
    ));

    // JSON, but not an object.
    for (name, body) in [
        ("an empty array", "[]"),
        ("a string", r#""order""#),
        ("null", "null"),
        ("a number", "42"),
        ("a boolean", "true"),
    ] {
        cases.push(order_case(name, body, "INVALID_REQUEST"));
    }
    // Regression guard: serde's derived structs also accept a JSON array of the fields in
    // order; the API requires objects (`domain::ObjectOnly`), so these are refused.
    cases.push(order_case(
        "an array in field order",
        r#"[[{"productId":"p-1","quantity":1}],"tok_visa"]"#,
        "INVALID_REQUEST",
    ));
    cases.push(order_json(
        "items given as arrays in field order",
        json!({"items": [["p-1", 1]]}),
        "INVALID_REQUEST",
    ));

    // Wrong types.
    for (name, pointer, value) in [
        (
            "paymentMethod an array",
            "/paymentMethod",
            json!(["tok_visa"]),
        ),
        (
            "paymentMethod an object",
            "/paymentMethod",
            json!({"id": "tok_visa"}),
        ),
        ("items a string", "/items", json!("p-1")),
        ("items an object", "/items", json!({"productId": "p-1"})),
        ("items null", "/items", Value::Null),
        ("an item a string", "/items/0", json!("p-1")),
        ("productId a number", "/items/0/productId", json!(7)),
        ("quantity a string", "/items/0/quantity", json!("1")),
        ("quantity a boolean", "/items/0/quantity", json!(true)),
        ("quantity null", "/items/0/quantity", Value::Null),
    ] {
        cases.push(order_json(
            name,
            with(v(), pointer, value),
            "INVALID_REQUEST",
        ));
    }
    cases.push(order_json(
        "paymentMethod a number",
        json!({"items": [{"productId": "p-1", "quantity": 1}], "paymentMethod": 5}),
        "INVALID_REQUEST",
    ));

    // Missing fields.
    for (name, pointer) in [
        ("no items", "/items"),
        ("an item without productId", "/items/0/productId"),
        ("an item without quantity", "/items/0/quantity"),
    ] {
        cases.push(order_json(name, without(v(), pointer), "INVALID_REQUEST"));
    }
    cases.push(order_json("an empty object", json!({}), "INVALID_REQUEST"));

    // Unknown and duplicate fields.
    let mut extra = v();
    extra["discountCents"] = json!(500);
    cases.push(order_json("an unknown field", extra, "INVALID_REQUEST"));
    let mut item_extra = v();
    item_extra["items"][0]["unitPriceCents"] = json!(1);
    cases.push(order_json(
        "an unknown field in an item (a client-chosen price)",
        item_extra,
        "INVALID_REQUEST",
    ));
    let mut miscased = without(v(), "/paymentMethod");
    miscased["PaymentMethod"] = json!("tok_visa");
    cases.push(order_json(
        "a field in the wrong case",
        miscased,
        "INVALID_REQUEST",
    ));
    cases.push(order_case(
        "a duplicated field",
        r#"{"paymentMethod":"tok_visa","paymentMethod":"tok_amex","items":[{"productId":"p-1","quantity":1}]}"#,
        "INVALID_REQUEST",
    ));

    // Items.
    cases.push(order_json(
        "no items",
        with(v(), "/items", json!([])),
        "INVALID_REQUEST",
    ));
    let too_many: Vec<Value> = (0..=domain::MAX_ITEMS_PER_ORDER)
        .map(|i| json!({"productId": format!("p-{i}"), "quantity": 1}))
        .collect();
    cases.push(order_json(
        "more items than allowed",
        with(v(), "/items", json!(too_many)),
        "INVALID_REQUEST",
    ));
    cases.push(order_json(
        "the same product twice",
        with(
            v(),
            "/items",
            json!([{"productId": "p-1", "quantity": 1}, {"productId": "p-2", "quantity": 1}, {"productId": "p-1", "quantity": 2}]),
        ),
        "INVALID_REQUEST",
    ));

    // Quantities.
    for q in [
        "0",
        "-1",
        "-0",
        "1.5",
        "1.0",
        "1e2",
        "1001",
        "18446744073709551615",
        "18446744073709551616",
        "1000000000000000000000000000000",
    ] {
        cases.push(order_case(
            &format!("quantity {q}"),
            raw_quantity(q),
            "INVALID_REQUEST",
        ));
    }

    // Unknown products.
    cases.push(order_json(
        "an unknown product",
        with(v(), "/items/0/productId", json!("p-nope")),
        "UNKNOWN_PRODUCT",
    ));
    cases.push(order_json(
        "one known and one unknown product",
        with(
            v(),
            "/items",
            json!([{"productId": "p-1", "quantity": 1}, {"productId": "p-ghost", "quantity": 1}]),
        ),
        "UNKNOWN_PRODUCT",
    ));

    // The customer is the token's `sub`: a customer id in the body is an unknown field,
    // refused whatever its value (nobody orders in another's name).
    for customer in [json!("c-2"), json!(""), json!(1), Value::Null] {
        let mut body = v();
        body["customerId"] = customer.clone();
        cases.push(order_json(
            &format!("a customerId {customer} in the body"),
            body,
            "INVALID_REQUEST",
        ));
    }

    // Ids in the body.
    let too_long = "x".repeat(domain::MAX_ID_LEN + 1);
    for (what, pointer) in [("productId", "/items/0/productId")] {
        for (how, id) in [
            ("empty", String::new()),
            ("too long", too_long.clone()),
            ("with NUL", "a\u{0}b".into()),
            ("with a control character", "a\u{7}b".into()),
            ("with a newline", "a\nb".into()),
            ("with a space", "a b".into()),
            ("with #", "a#b".into()),
            ("with /", "a/b".into()),
            ("non-ASCII", "caf\u{e9}".into()),
        ] {
            cases.push(order_json(
                &format!("{what} {how}"),
                with(v(), pointer, json!(id)),
                "INVALID_REQUEST",
            ));
        }
    }
    for (how, id) in [
        ("empty", String::new()),
        ("too long", too_long.clone()),
        ("with a control character", "tok\u{1b}".into()),
    ] {
        let mut body = v();
        body["paymentMethod"] = json!(id);
        cases.push(order_json(
            &format!("paymentMethod {how}"),
            body,
            "INVALID_REQUEST",
        ));
    }

    // Size and content type.
    cases.push(case(
        "a body one byte over the limit",
        "POST",
        "/orders",
        padded(&v(), domain::MAX_BODY_BYTES + 1),
        413,
        "PAYLOAD_TOO_LARGE",
    ));
    cases.push(case(
        "a 1 MiB body",
        "POST",
        "/orders",
        padded(&v(), 1 << 20),
        413,
        "PAYLOAD_TOO_LARGE",
    ));
    for ct in [
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "",
    ] {
        let mut c = case(
            format!("content type {ct:?}"),
            "POST",
            "/orders",
            v().to_string(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        );
        c.content_type = Some(ct);
        cases.push(c);
    }

    // Ids in the path.
    let valid_product_body = valid_product().to_string();
    for (how, segment) in [
        ("too long", too_long.clone()),
        ("with NUL", "a%00b".into()),
        ("with a control character", "a%01b".into()),
        ("with a newline", "a%0Ab".into()),
        ("with DEL", "a%7Fb".into()),
        ("with an encoded space", "a%20b".into()),
        ("with an encoded slash", "a%2Fb".into()),
        ("with an encoded #", "a%23b".into()),
        ("with an invalid UTF-8 escape", "a%FFb".into()),
        ("with encoded non-ASCII", "caf%C3%A9".into()),
        ("with a lone %", "a%b".into()),
    ] {
        cases.push(case(
            format!("GET /orders/{{id}} {how}"),
            "GET",
            format!("/orders/{segment}"),
            Vec::new(),
            400,
            "INVALID_ID",
        ));
        cases.push(case(
            format!("GET /products/{{id}} {how}"),
            "GET",
            format!("/products/{segment}"),
            Vec::new(),
            400,
            "INVALID_ID",
        ));
        cases.push(case(
            format!("PUT /products/{{id}} {how}"),
            "PUT",
            format!("/products/{segment}"),
            valid_product_body.clone(),
            400,
            "INVALID_ID",
        ));
    }

    // Bad product bodies.
    let p = valid_product;
    for (name, body) in [
        ("negative price", with(p(), "/priceCents", json!(-1))),
        ("fractional price", with(p(), "/priceCents", json!(1.5))),
        (
            "price over the maximum",
            with(p(), "/priceCents", json!(domain::MAX_PRICE_CENTS + 1)),
        ),
        ("price a string", with(p(), "/priceCents", json!("100"))),
        ("negative quantity", with(p(), "/quantity", json!(-5))),
        (
            "quantity over the maximum",
            with(p(), "/quantity", json!(domain::MAX_STOCK + 1)),
        ),
        ("missing name", without(p(), "/name")),
        ("missing price", without(p(), "/priceCents")),
        ("empty name", with(p(), "/name", json!(""))),
        ("blank name", with(p(), "/name", json!("   "))),
        (
            "too long a name",
            with(p(), "/name", json!("n".repeat(domain::MAX_NAME_LEN + 1))),
        ),
        (
            "too long a name in multi-byte characters",
            with(
                p(),
                "/name",
                json!("\u{e9}".repeat(domain::MAX_NAME_LEN + 1)),
            ),
        ),
        (
            "a control character in the name",
            with(p(), "/name", json!("Mu\u{7}g")),
        ),
        ("name null", with(p(), "/name", Value::Null)),
        ("an unknown field", {
            let mut b = p();
            b["sku"] = json!("x");
            b
        }),
        ("a productId in the body", {
            let mut b = p();
            b["productId"] = json!("p-2");
            b
        }),
        ("null body", Value::Null),
        ("an array body", json!([])),
    ] {
        cases.push(product_json(&format!("PUT /products: {name}"), body));
    }
    cases.push(case(
        "PUT /products: a body in field order",
        "PUT",
        "/products/p-1",
        r#"["Evil",1,999]"#,
        400,
        "INVALID_REQUEST",
    ));
    cases.push(case(
        "PUT /products: malformed JSON",
        "PUT",
        "/products/p-1",
        r#"{"name":"Mug","#,
        400,
        "MALFORMED_JSON",
    ));
    cases.push(case(
        "PUT /products: empty body",
        "PUT",
        "/products/p-1",
        "",
        400,
        "MALFORMED_JSON",
    ));
    cases.push(case(
        "PUT /products: non-UTF-8 bytes",
        "PUT",
        "/products/p-1",
        b"\x80\x81\x82".to_vec(),
        400,
        "MALFORMED_JSON",
    ));
    cases.push(case(
        "PUT /products: over the size limit",
        "PUT",
        "/products/p-1",
        padded(&p(), domain::MAX_BODY_BYTES + 1),
        413,
        "PAYLOAD_TOO_LARGE",
    ));
    let mut wrong_ct = case(
        "PUT /products: text/plain",
        "PUT",
        "/products/p-1",
        p().to_string(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    wrong_ct.content_type = Some("text/plain");
    cases.push(wrong_ct);

    // The product model: stock is set at creation, then changes only through adjustments.
    cases.push(case(
        "PUT /products: no quantity for a product that does not exist",
        "PUT",
        "/products/p-new",
        without(p(), "/quantity").to_string(),
        400,
        "INVALID_REQUEST",
    ));
    cases.push(case(
        "PUT /products: a quantity for an existing product",
        "PUT",
        "/products/p-1",
        with(p(), "/quantity", json!(1_000)).to_string(),
        409,
        "QUANTITY_NOT_WRITABLE",
    ));

    // Stock adjustments.
    let adjustments = "/products/p-1/stock-adjustments";
    let a = || json!({"delta": 5, "reason": "restock"});
    let max = domain::MAX_STOCK as i64;
    for (name, body) in [
        ("delta 0", with(a(), "/delta", json!(0))),
        ("fractional delta", with(a(), "/delta", json!(1.5))),
        ("delta a string", with(a(), "/delta", json!("5"))),
        (
            "delta over the maximum",
            with(a(), "/delta", json!(max + 1)),
        ),
        (
            "delta under the minimum",
            with(a(), "/delta", json!(-max - 1)),
        ),
        ("delta beyond i64", with(a(), "/delta", json!(u64::MAX))),
        ("missing delta", without(a(), "/delta")),
        ("missing reason", without(a(), "/reason")),
        ("empty reason", with(a(), "/reason", json!(""))),
        ("blank reason", with(a(), "/reason", json!("  "))),
        (
            "too long a reason",
            with(
                a(),
                "/reason",
                json!("r".repeat(domain::MAX_REASON_LEN + 1)),
            ),
        ),
        (
            "a control character in the reason",
            with(a(), "/reason", json!("a\u{0}b")),
        ),
        ("reason null", with(a(), "/reason", Value::Null)),
        ("an unknown field", a().tap_insert("quantity", json!(9))),
        (
            "a productId in the body",
            a().tap_insert("productId", json!("p-2")),
        ),
        ("null body", Value::Null),
        ("an array body", json!([5, "restock"])),
    ] {
        cases.push(case(
            format!("POST stock-adjustments: {name}"),
            "POST",
            adjustments,
            body.to_string(),
            400,
            "INVALID_REQUEST",
        ));
    }
    cases.push(case(
        "POST stock-adjustments: malformed JSON",
        "POST",
        adjustments,
        r#"{"delta": 5,"#,
        400,
        "MALFORMED_JSON",
    ));
    cases.push(case(
        "POST stock-adjustments: below zero",
        "POST",
        adjustments,
        with(a(), "/delta", json!(-51)).to_string(),
        409,
        "INSUFFICIENT_STOCK",
    ));
    cases.push(case(
        "POST stock-adjustments: above the largest stock",
        "POST",
        adjustments,
        with(a(), "/delta", json!(max)).to_string(),
        409,
        "STOCK_LIMIT_EXCEEDED",
    ));
    cases.push(case(
        "POST stock-adjustments: an unknown product",
        "POST",
        "/products/p-none/stock-adjustments",
        a().to_string(),
        404,
        "NOT_FOUND",
    ));
    cases.push(case(
        "POST stock-adjustments: a bad product id",
        "POST",
        "/products/a%01b/stock-adjustments",
        a().to_string(),
        400,
        "INVALID_ID",
    ));
    cases
}

trait TapInsert {
    fn tap_insert(self, key: &str, value: Value) -> Value;
}

impl TapInsert for Value {
    /// The object with one more field.
    fn tap_insert(mut self, key: &str, value: Value) -> Value {
        self.as_object_mut()
            .expect("an object")
            .insert(key.into(), value);
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_request_is_bad_should_answer_4xx_with_a_json_error_and_write_nothing() {
    let t = TestStack::start_paused().await;
    t.put_product("p-1", 100, 50).await;
    t.put_product("p-2", 250, 7).await;
    let before = snapshot(&t).await;
    assert_eq!(before.orders, 0);

    let mut before = before;
    let mut failures = Vec::new();
    let cases = bad_requests();
    // The product routes are the operators'; a customer's bad body would be a 403.
    let operator = format!("Bearer {}", t.token(saga_tests::OPERATOR, true).await);
    for (i, c) in cases.iter().enumerate() {
        // Each POST twice: without and with an Idempotency-Key (no key may be written either).
        let key = format!("hostile-{i}");
        let keys: Vec<Option<&str>> = if c.method == "POST" {
            vec![None, Some(&key)]
        } else {
            vec![None]
        };
        for key in keys {
            let mut headers = Vec::new();
            if c.path.starts_with("/products") {
                headers.push(("authorization", operator.as_str()));
            }
            if let Some(ct) = c.content_type {
                headers.push(("content-type", ct));
            }
            if let Some(k) = key {
                headers.push(("idempotency-key", k));
            }
            let r = t
                .raw_request(c.method, &c.path, &headers, c.body.clone())
                .await;
            let ok = r.status == c.status
                && r.body["error"]["code"] == c.code
                && r.body["error"]["message"].is_string()
                && r.headers.get("content-type").map(String::as_str) == Some("application/json");
            if !ok {
                failures.push(format!(
                    "{} (key {key:?}): expected {} {}, got {} {}",
                    c.name,
                    c.status,
                    c.code,
                    r.status,
                    r.raw.chars().take(300).collect::<String>()
                ));
            }
            let after = snapshot(&t).await;
            if after != before {
                failures.push(format!(
                    "{} (key {key:?}) WROTE: orders {} -> {}, idempotency {} -> {}, queues {}/{}/{} -> {}/{}/{}, products changed: {}, movements {} -> {}",
                    c.name,
                    before.orders,
                    after.orders,
                    before.idempotency,
                    after.idempotency,
                    before.stock_queue,
                    before.payment_queue,
                    before.coordinator_queue,
                    after.stock_queue,
                    after.payment_queue,
                    after.coordinator_queue,
                    before.products != after.products,
                    before.movements,
                    after.movements,
                ));
                // Later cases are judged against the new state, so each write is reported once.
                before = after;
            }
        }
    }
    eprintln!("{} bad requests checked", cases.len());
    t.stop().await;
    assert!(
        failures.is_empty(),
        "{} bad request(s) not refused cleanly:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_gateway_has_no_route_should_answer_404_and_write_nothing() {
    let t = TestStack::start_paused().await;
    t.put_product("p-1", 100, 50).await;
    let before = snapshot(&t).await;
    // API Gateway answers these itself, before the function: `{"message":"Not Found"}`.
    for (method, path) in [
        ("DELETE", "/orders/"),
        ("PUT", "/products/"),
        ("GET", "/products/"),
        ("DELETE", "/orders/o-1"),
        ("PATCH", "/products/p-1"),
        ("POST", "/products/p-1"),
        ("GET", "/orders/a/b"),
        ("GET", "/"),
        ("POST", "/orders/o-1"),
    ] {
        let r = t
            .raw_request(
                method,
                path,
                &[("content-type", "application/json")],
                valid_product().to_string().into_bytes(),
            )
            .await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.raw);
        assert_eq!(r.body, json!({"message": "Not Found"}), "{method} {path}");
    }
    // A route without a token: the gateway's 401, before the function.
    let r = t
        .request(
            "GET",
            "/orders",
            None,
            &[("authorization", saga_tests::ANONYMOUS)],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.raw);
    assert_eq!(r.body, json!({"message": "Unauthorized"}));
    assert_eq!(snapshot(&t).await, before);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_body_is_exactly_at_the_size_limit_should_be_accepted() {
    let t = TestStack::start_paused().await;
    t.put_product("p-1", 100, 50).await;
    let r = t
        .raw_request(
            "POST",
            "/orders",
            &[("content-type", "application/json; charset=utf-8")],
            padded(&valid_order(), domain::MAX_BODY_BYTES),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.raw);
    // No content type at all is taken as JSON too.
    let r = t
        .raw_request(
            "POST",
            "/orders",
            &[],
            valid_order().to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.raw);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_product_id_is_a_route_word_should_still_be_served() {
    let t = TestStack::start_paused().await;
    // Regression guard: a product or order id that is also a route word is an id like any
    // other (the gateway matches `{productId}` / `{orderId}`, the handler routes on the key).
    let operator = format!("Bearer {}", t.token(saga_tests::OPERATOR, true).await);
    let r = t
        .request(
            "PUT",
            "/products/orders",
            Some(&valid_product()),
            &[("authorization", &operator)],
        )
        .await;
    assert_eq!(r.status, 201, "PUT /products/orders: {}", r.raw);
    let r = t.request("GET", "/products/orders", None, &[]).await;
    assert_eq!(r.status, 200, "GET /products/orders: {}", r.raw);
    let r = t.request("GET", "/orders/orders", None, &[]).await;
    assert_eq!(r.status, 404, "GET /orders/orders: {}", r.raw);
    assert_error_body(&r, "GET /orders/orders");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_path_holds_raw_non_ascii_bytes_should_answer_4xx_not_drop_the_connection() {
    let t = TestStack::start_paused().await;
    let addr = t.stack.http_addr;
    for target in [
        &b"/orders/caf\xc3\xa9"[..],
        b"/orders/%a\xc3\xa9",
        b"/orders/%\xc3\xa9",
        b"/products/%e\xe2\x82\xac",
    ] {
        let shown = String::from_utf8_lossy(target).into_owned();
        for method in ["GET", "PUT"] {
            let body = if method == "PUT" {
                valid_product().to_string().into_bytes()
            } else {
                Vec::new()
            };
            let answer = raw_http(addr, &raw_request_bytes(method, target, &body)).await;
            // Regression guard: `%` followed by a hex digit and a multi-byte character once
            // sliced the path inside a character, and the connection dropped unanswered.
            let (status, body) =
                answer.unwrap_or_else(|| panic!("{method} {shown}: no answer (server panicked?)"));
            assert!(
                (400..500).contains(&status),
                "{method} {shown}: {status} {body}"
            );
        }
    }
    t.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Property tests of the API: arbitrary bytes, bodies and paths
// ---------------------------------------------------------------------------------------------

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9:._-]{1,64}",
        "[a-zA-Z0-9:._-]{65,80}",
        Just(String::new()),
        Just("p-1".to_string()),
        Just("p-2".to_string()),
        "\\PC{0,40}",
        ".{0,20}",
        "[\\x00-\\x1f\\x7f #/%\"\\\\]{1,8}",
    ]
}

fn arb_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..1_100).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        Just(json!("1")),
        Just(Value::Null),
    ]
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("customerId".to_string()),
        Just("items".to_string()),
        Just("productId".to_string()),
        Just("quantity".to_string()),
        Just("paymentMethod".to_string()),
        Just("name".to_string()),
        Just("priceCents".to_string()),
        "[a-zA-Z]{1,10}",
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number(),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(arb_key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Orders that are often valid or nearly so, to get past parsing into validation and writes.
fn arb_order() -> impl Strategy<Value = Value> {
    let item = (arb_text(), arb_number()).prop_map(|(p, q)| json!({"productId": p, "quantity": q}));
    let valid_item = (prop_oneof![Just("p-1"), Just("p-2")], 1u64..=3)
        .prop_map(|(p, q)| json!({"productId": p, "quantity": q}));
    (
        prop_oneof![
            2 => prop::collection::vec(valid_item, 1..2),
            1 => prop::collection::vec(item, 0..30),
        ],
        prop::option::of(arb_text()),
        prop::option::weighted(0.2, (arb_key(), arb_json())),
    )
        .prop_map(|(items, method, extra)| {
            let mut o = json!({"items": items});
            if let Some(m) = method {
                o["paymentMethod"] = json!(m);
            }
            if let Some((k, v)) = extra {
                o[k] = v;
            }
            o
        })
}

fn arb_product_body() -> impl Strategy<Value = Value> {
    (
        arb_text(),
        arb_number(),
        arb_number(),
        prop::option::of((arb_key(), arb_json())),
    )
        .prop_map(|(name, price, quantity, extra)| {
            let mut p = json!({"name": name, "priceCents": price, "quantity": quantity});
            if let Some((k, v)) = extra {
                p[k] = v;
            }
            p
        })
}

/// Bodies: arbitrary bytes, arbitrary JSON, near-valid documents, and those cut short.
fn arb_body(doc: BoxedStrategy<Value>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..600),
        2 => arb_json().prop_map(|v| v.to_string().into_bytes()),
        4 => doc.clone().prop_map(|v| v.to_string().into_bytes()),
        1 => (doc, any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let mut b = v.to_string().into_bytes();
            let at = cut.index(b.len() + 1);
            b.truncate(at);
            b
        }),
    ]
}

fn arb_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("orders".to_string()),
        2 => Just("products".to_string()),
        1 => Just(String::new()),
        3 => "[a-zA-Z0-9._~-]{1,70}",
        2 => "(%[0-9A-Fa-f]{2}){1,4}",
        2 => "[a-z]{0,3}%[0-9A-Fa-f]?",
        1 => "[!$&'()*+,;=:@]{1,5}",
        3 => "[a-z]{0,2}%[0-9a-f]?[\\u{80}-\\u{10FFFF}]{1,2}",
        2 => "\\PC{1,4}",
    ]
}

fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        (prop_oneof![Just("orders"), Just("products")], arb_segment())
            .prop_map(|(a, b)| format!("/{a}/{b}")),
        prop::collection::vec(arb_segment(), 0..4).prop_map(|s| format!("/{}", s.join("/"))),
    ]
}

#[derive(Clone, Debug)]
struct ApiInput {
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    idempotency_key: Option<Vec<u8>>,
    body: Vec<u8>,
}

fn arb_api_input() -> impl Strategy<Value = ApiInput> {
    let order_body = arb_body(arb_order().boxed());
    let product_body = arb_body(arb_product_body().boxed());
    let content_type = prop_oneof![
        4 => Just(Some("application/json")),
        1 => Just(None),
        1 => Just(Some("text/plain")),
        1 => Just(Some("application/problem+json")),
    ];
    let key = prop::option::of(prop_oneof![
        "[!-~]{1,255}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..300),
    ]);
    prop_oneof![
        (order_body, content_type.clone(), key.clone()).prop_map(|(body, ct, key)| ApiInput {
            method: "POST",
            path: "/orders".into(),
            content_type: ct,
            idempotency_key: key,
            body,
        }),
        (arb_segment(), product_body, content_type.clone()).prop_map(|(id, body, ct)| {
            ApiInput {
                method: "PUT",
                path: format!("/products/{id}"),
                content_type: ct,
                idempotency_key: None,
                body,
            }
        }),
        (
            prop_oneof![
                Just("GET"),
                Just("PUT"),
                Just("POST"),
                Just("DELETE"),
                Just("PATCH")
            ],
            arb_path(),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(method, path, body)| ApiInput {
                method,
                path,
                content_type: Some("application/json"),
                idempotency_key: None,
                body,
            }),
    ]
}

fn api_request(input: &ApiInput) -> Option<lambda_http::Request> {
    let mut builder = http::Request::builder()
        .method(input.method)
        .uri(&input.path);
    if let Some(ct) = input.content_type {
        builder = builder.header("content-type", ct);
    }
    if let Some(key) = &input.idempotency_key {
        let value = http::HeaderValue::from_bytes(key).ok()?;
        builder = builder.header("idempotency-key", value);
    }
    let body = match String::from_utf8(input.body.clone()) {
        Ok(text) if text.is_empty() => Body::Empty,
        Ok(text) => Body::Text(text),
        Err(_) => Body::Binary(input.body.clone()),
    };
    let mut ctx = Context::default();
    ctx.deadline = (saga_core::time::now_ms() + 5_000) as u64;
    let mut request = builder.body(body).ok()?.with_lambda_context(ctx);
    // What API Gateway adds: the route it matched, the path parameters it extracted and the
    // caller's claims (an operator on the product routes, so that bodies reach validation).
    if let Some((route_key, params)) = gateway_route(input.method, &input.path) {
        request = if route_key.contains("/products/") {
            saga_tests::via_gateway_as_operator(request, &route_key, "op-hostile")
        } else {
            saga_tests::via_gateway(request, &route_key, "c-hostile")
        }
        .with_path_parameters(params);
    }
    Some(request)
}

/// The handler's route (`saga_core::handlers::api::ROUTES`) a method and path match, as API
/// Gateway matches it: segment by segment, `{name}` taking one non-empty segment.
fn gateway_route(
    method: &str,
    path: &str,
) -> Option<(String, std::collections::HashMap<String, String>)> {
    let path = path.split('?').next().unwrap_or_default();
    let segments = path.trim_matches('/').split('/').collect::<Vec<_>>();
    saga_core::handlers::api::ROUTES.iter().find_map(|route| {
        let (m, template) = route.split_once(' ')?;
        let parts = template.trim_matches('/').split('/').collect::<Vec<_>>();
        if m != method || parts.len() != segments.len() {
            return None;
        }
        let mut params = std::collections::HashMap::new();
        for (part, segment) in parts.iter().zip(&segments) {
            match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) if !segment.is_empty() => {
                    params.insert(name.to_string(), segment.to_string());
                }
                None if part == segment => {}
                _ => return None,
            }
        }
        Some((route.to_string(), params))
    })
}

/// Runs `f` on a thread with a large stack (proptest's generators and the SDK's futures are
/// deep in debug builds), from inside an async test; `block_on` works there.
fn on_big_stack<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn_scoped(scope, f)
            .expect("spawn a test thread");
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_api_gets_arbitrary_bytes_bodies_and_paths_should_never_panic_or_answer_5xx() {
    let t = TestStack::start_paused().await;
    t.put_product("p-1", 100, 1_000_000).await;
    t.put_product("p-2", 250, 1_000_000).await;
    let config = OrderApiConfig::load(&lookup(&t, "OrderApiFunction")).unwrap();
    let handler = ApiHandler::new(&clients(&t), config, Faults::none());
    let rt = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let statuses = std::sync::Mutex::new(BTreeMap::<u16, usize>::new());
    let result = on_big_stack(|| {
        runner(600)
            .run(&arb_api_input(), |input| {
                let Some(req) = api_request(&input) else {
                    return Ok(()); // not a request an HTTP stack could carry
                };
                let resp = rt
                    .block_on(handler.handle(req))
                    .map_err(|e| TestCaseError::fail(format!("handler error: {e}")))?;
                let status = resp.status().as_u16();
                *statuses.lock().unwrap().entry(status).or_default() += 1;
                let body: Value =
                    serde_json::from_slice(resp.body().as_ref()).unwrap_or(Value::Null);
                prop_assert!(status < 500, "{status} {body} for {input:?}");
                if status >= 400 {
                    prop_assert!(
                        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                        "{status} without a JSON error: {body} for {input:?}"
                    );
                }
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    let statuses = statuses.into_inner().unwrap();
    eprintln!(
        "API property test: statuses {statuses:?} in {:?}",
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // Some inputs must have got through to writes, or the generator is too timid.
    assert!(statuses.get(&202).is_some_and(|n| *n > 0), "{statuses:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_http_front_gets_arbitrary_paths_should_always_answer_below_500() {
    let t = TestStack::start_paused().await;
    t.put_product("p-1", 100, 1_000_000).await;
    let addr = t.stack.http_addr;
    let rt = tokio::runtime::Handle::current();
    let strategy = (
        prop_oneof![
            Just("GET"),
            Just("PUT"),
            Just("POST"),
            Just("DELETE"),
            Just("HEAD")
        ],
        arb_path(),
        prop::option::of("[a-z%=&0-9]{0,12}"),
        prop_oneof![
            Just(valid_product().to_string().into_bytes()),
            Just(valid_order().to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..40),
        ],
    );
    let result = on_big_stack(|| {
        runner(200)
            .run(&strategy, |(method, path, query, body)| {
                let mut target = path.clone().into_bytes();
                if let Some(q) = query {
                    target.push(b'?');
                    target.extend_from_slice(q.as_bytes());
                }
                let answer =
                    rt.block_on(raw_http(addr, &raw_request_bytes(method, &target, &body)));
                // Regression guard: a path segment with `%` then a multi-byte character
                // (minimal case `GET /orders/%\u{800}`) once dropped the connection unanswered.
                let Some((status, text)) = answer else {
                    return Err(TestCaseError::fail(format!(
                        "{method} {path}: connection dropped without an answer"
                    )));
                };
                prop_assert!(status < 500, "{method} {path}: {status} {text}");
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    t.stop().await;
}

// ---------------------------------------------------------------------------------------------
// SQS messages: parsing and per-record refusal
// ---------------------------------------------------------------------------------------------

fn arb_order_id() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:._-]{1,64}"
}

fn arb_lines() -> impl Strategy<Value = Vec<StockLine>> {
    prop::collection::vec(
        (arb_order_id(), 1u64..=1_000).prop_map(|(product_id, quantity)| StockLine {
            product_id,
            quantity,
        }),
        1..5,
    )
}

fn arb_stock_command() -> impl Strategy<Value = StockCommand> {
    prop_oneof![
        (arb_order_id(), arb_lines())
            .prop_map(|(order_id, items)| StockCommand::ReserveStock { order_id, items }),
        (arb_order_id(), arb_lines(), any::<bool>()).prop_map(|(order_id, items, fence)| {
            StockCommand::ReleaseStock {
                order_id,
                items,
                fence,
            }
        }),
    ]
}

fn arb_payment_command() -> impl Strategy<Value = PaymentCommand> {
    prop_oneof![
        (arb_order_id(), arb_text(), any::<u64>(), arb_text()).prop_map(
            |(order_id, customer_id, amount_cents, payment_method)| {
                PaymentCommand::ChargePayment {
                    order_id,
                    customer_id,
                    amount_cents,
                    payment_method,
                }
            }
        ),
        (arb_order_id(), prop::option::of(arb_text()), any::<u64>()).prop_map(
            |(order_id, payment_id, amount_cents)| PaymentCommand::RefundPayment {
                order_id,
                payment_id,
                amount_cents,
            }
        ),
    ]
}

fn arb_saga_event() -> impl Strategy<Value = SagaEvent> {
    let rejection = prop_oneof![
        Just(StockRejection::InsufficientStock),
        Just(StockRejection::UnknownProduct)
    ];
    prop_oneof![
        arb_order_id().prop_map(|order_id| SagaEvent::StockReserved { order_id }),
        (arb_order_id(), rejection, arb_text()).prop_map(|(order_id, reason, product_id)| {
            SagaEvent::StockRejected {
                order_id,
                reason,
                product_id,
            }
        }),
        arb_order_id().prop_map(|order_id| SagaEvent::StockReleased { order_id }),
        (arb_order_id(), arb_text()).prop_map(|(order_id, payment_id)| {
            SagaEvent::PaymentCharged {
                order_id,
                payment_id,
            }
        }),
        (arb_order_id(), arb_text())
            .prop_map(|(order_id, reason)| SagaEvent::PaymentDeclined { order_id, reason }),
        (arb_order_id(), arb_text()).prop_map(|(order_id, payment_id)| {
            SagaEvent::PaymentRefunded {
                order_id,
                payment_id,
            }
        }),
        (arb_order_id(), any::<i64>()).prop_map(|(order_id, cutoff_ms)| SagaEvent::OrderTimedOut {
            order_id,
            cutoff_ms
        }),
        arb_order_id().prop_map(|order_id| SagaEvent::StockVoided { order_id }),
        arb_order_id().prop_map(|order_id| SagaEvent::PaymentVoided { order_id }),
        arb_order_id().prop_map(|order_id| SagaEvent::OrderCancelled { order_id }),
    ]
}

/// A message of any queue, serialized, and which queue it belongs to (0 stock, 1 payment,
/// 2 coordinator).
fn arb_any_message() -> impl Strategy<Value = (usize, String)> {
    prop_oneof![
        arb_stock_command().prop_map(|m| (0, serde_json::to_string(&m).unwrap())),
        arb_payment_command().prop_map(|m| (1, serde_json::to_string(&m).unwrap())),
        arb_saga_event().prop_map(|m| (2, serde_json::to_string(&m).unwrap())),
    ]
}

fn parses_as(queue: usize, body: &str) -> bool {
    match queue {
        0 => messages::parse::<StockCommand>(Some(body), "stock", StockCommand::order_id).is_ok(),
        1 => messages::parse::<PaymentCommand>(Some(body), "payment", PaymentCommand::order_id)
            .is_ok(),
        _ => messages::parse::<SagaEvent>(Some(body), "coordinator", SagaEvent::order_id).is_ok(),
    }
}

/// Strings that are rarely messages: anything, any JSON, and real messages mangled.
fn arb_garbage_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "\\PC{0,200}",
        prop::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        arb_json().prop_map(|v| v.to_string()),
        (arb_any_message(), any::<prop::sample::Index>()).prop_map(|((_, m), cut)| {
            let at = cut.index(m.len());
            let mut at = at;
            while !m.is_char_boundary(at) {
                at -= 1;
            }
            m[..at].to_string()
        }),
    ]
}

#[test]
fn when_any_string_is_parsed_as_a_message_should_never_panic() {
    runner(2_000)
        .run(
            &prop_oneof![arb_garbage_text(), arb_any_message().prop_map(|(_, m)| m)],
            |body| {
                for queue in 0..3 {
                    let _ = parses_as(queue, &body);
                }
                let _ = messages::parse::<StockCommand>(None, "stock", StockCommand::order_id);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn when_a_message_is_parsed_by_another_queue_should_be_refused() {
    runner(1_000)
        .run(&arb_any_message(), |(queue, body)| {
            prop_assert!(parses_as(queue, &body), "own queue refused {body}");
            for other in (0..3).filter(|q| *q != queue) {
                prop_assert!(
                    !parses_as(other, &body),
                    "queue {other} accepted a message of queue {queue}: {body}"
                );
            }
            Ok(())
        })
        .unwrap();
    // And a round trip gives back the same message.
    runner(300)
        .run(&arb_stock_command(), |m| {
            let body = serde_json::to_string(&m).unwrap();
            let back =
                messages::parse::<StockCommand>(Some(&body), "stock", StockCommand::order_id)
                    .unwrap();
            prop_assert_eq!(back, m);
            Ok(())
        })
        .unwrap();
    runner(300)
        .run(&arb_saga_event(), |m| {
            let body = serde_json::to_string(&m).unwrap();
            let back = messages::parse::<SagaEvent>(Some(&body), "c", SagaEvent::order_id).unwrap();
            prop_assert_eq!(back, m);
            Ok(())
        })
        .unwrap();
}

/// Bodies that are not a message of `queue`: garbage, other queues' messages, and this queue's
/// messages with an extra field, a bad order id or no type tag. `None` is a record without body.
fn arb_not_a_message(queue: usize) -> impl Strategy<Value = Option<String>> {
    let own = move || match queue {
        0 => arb_stock_command()
            .prop_map(|m| serde_json::to_value(m).unwrap())
            .boxed(),
        1 => arb_payment_command()
            .prop_map(|m| serde_json::to_value(m).unwrap())
            .boxed(),
        _ => arb_saga_event()
            .prop_map(|m| serde_json::to_value(m).unwrap())
            .boxed(),
    };
    let bad_id = prop_oneof![
        Just(String::new()),
        "[a-z]{65,80}",
        "[a-z]{0,3}[\\x00-\\x1f #/]{1,3}",
    ];
    prop_oneof![
        1 => Just(None),
        4 => arb_garbage_text()
            .prop_filter("not a message of this queue", move |s| !parses_as(queue, s))
            .prop_map(Some),
        2 => arb_any_message()
            .prop_filter("another queue's", move |(q, _)| *q != queue)
            .prop_map(|(_, m)| Some(m)),
        1 => (own(), arb_key()).prop_map(|(mut m, k)| {
            m[format!("x{k}")] = json!(1);
            Some(m.to_string())
        }),
        1 => (own(), bad_id).prop_map(|(mut m, id)| {
            m["orderId"] = json!(id);
            Some(m.to_string())
        }),
        1 => own().prop_map(|mut m| {
            m.as_object_mut().unwrap().remove("type");
            Some(m.to_string())
        }),
        1 => own().prop_map(|mut m| {
            m["type"] = json!("DropTables");
            Some(m.to_string())
        }),
    ]
}

fn sqs_record(message_id: &str, body: Option<&str>) -> Value {
    let mut r = json!({
        "messageId": message_id,
        "receiptHandle": format!("rh-{message_id}"),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:Queue",
        "awsRegion": "us-east-1"
    });
    if let Some(b) = body {
        r["body"] = json!(b);
    }
    r
}

/// A batch of `valid` messages and `garbage` bodies, shuffled; returns the event and the
/// garbage records' message ids.
fn mixed_batch(
    valid: &[String],
    garbage: &[Option<String>],
    order: &[usize],
) -> (LambdaEvent<SqsEvent>, HashSet<String>) {
    let mut records = Vec::new();
    let mut bad = HashSet::new();
    for &i in order {
        if i < valid.len() {
            records.push(sqs_record(&format!("valid-{i}"), Some(&valid[i])));
        } else {
            let g = i - valid.len();
            let id = format!("garbage-{g}");
            records.push(sqs_record(&id, garbage[g].as_deref()));
            bad.insert(id);
        }
    }
    let event: SqsEvent = serde_json::from_value(json!({ "Records": records })).unwrap();
    let mut ctx = Context::default();
    ctx.deadline = (saga_core::time::now_ms() + 10_000) as u64;
    (LambdaEvent::new(event, ctx), bad)
}

fn arb_batch(
    queue: usize,
    valid: usize,
) -> impl Strategy<Value = (Vec<Option<String>>, Vec<usize>)> {
    prop::collection::vec(arb_not_a_message(queue), 1..=(10 - valid)).prop_flat_map(
        move |garbage| {
            let n = valid + garbage.len();
            (
                Just(garbage),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            )
        },
    )
}

/// Places orders (consumers paused, so nothing else touches them) and returns their ids.
async fn placed_orders(t: &TestStack, n: usize) -> Vec<String> {
    t.put_product("p-1", 100, 1_000).await;
    t.put_product("p-2", 200, 1_000).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(t.place_ok(&[("p-1", 1), ("p-2", 1)], None).await);
    }
    ids
}

/// Runs `cases` mixed batches through `handle`; each must fail exactly its garbage records.
async fn assert_garbage_fails_alone<H, F>(queue: usize, valid: Vec<String>, cases: u32, handle: H)
where
    H: Fn(LambdaEvent<SqsEvent>) -> F + Sync,
    F: Future<
        Output = Result<aws_lambda_events::event::sqs::SqsBatchResponse, lambda_runtime::Error>,
    >,
{
    for (i, body) in valid.iter().enumerate() {
        assert!(
            parses_as(queue, body),
            "valid message {i} must parse: {body}"
        );
    }
    let rt = tokio::runtime::Handle::current();
    let result = on_big_stack(|| {
        runner(cases)
            .run(&arb_batch(queue, valid.len()), |(garbage, order)| {
                let (event, bad) = mixed_batch(&valid, &garbage, &order);
                let response = rt
                    .block_on(handle(event))
                    .map_err(|e| TestCaseError::fail(format!("whole batch failed: {e}")))?;
                let failed: HashSet<String> = response
                    .batch_item_failures
                    .iter()
                    .map(|f| f.item_identifier.clone())
                    .collect();
                prop_assert_eq!(&failed, &bad, "garbage {:?}", garbage);
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_stock_batch_mixes_garbage_and_valid_messages_should_fail_exactly_the_garbage() {
    let t = TestStack::start_paused().await;
    let ids = placed_orders(&t, 2).await;
    let valid = [
        json!({"type": "ReserveStock", "orderId": ids[0], "items": [{"productId": "p-1", "quantity": 1}, {"productId": "p-2", "quantity": 1}]}),
        json!({"type": "ReserveStock", "orderId": ids[1], "items": [{"productId": "p-1", "quantity": 2}]}),
        // An order cancelled before its reservation was seen: the release fences it off. (A
        // release without the fence, for a reservation that does not exist, is a fault for
        // the DLQ, not a valid message.)
        json!({"type": "ReleaseStock", "orderId": "o-never-reserved", "items": [{"productId": "p-1", "quantity": 1}], "fence": true}),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    let config = StockConfig::load(&lookup(&t, "StockFunction")).unwrap();
    let handler = StockHandler::new(&clients(&t), config, Faults::none());
    assert_garbage_fails_alone(0, valid, 24, |e| async { Ok(handler.handle(e).await?) }).await;
    // However often the valid messages came, stock was reserved once per order.
    assert_eq!(t.product_quantity("p-1").await, 1_000 - 3);
    assert_eq!(t.product_quantity("p-2").await, 1_000 - 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_payment_batch_mixes_garbage_and_valid_messages_should_fail_exactly_the_garbage() {
    let t = TestStack::start_paused().await;
    let ids = placed_orders(&t, 2).await;
    let valid = [
        json!({"type": "ChargePayment", "orderId": ids[0], "customerId": "c-1", "amountCents": 300, "paymentMethod": "tok_visa"}),
        json!({"type": "ChargePayment", "orderId": ids[1], "customerId": "c-1", "amountCents": 300, "paymentMethod": "tok_chargeDeclined"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    let config = PaymentConfig::load(&lookup(&t, "PaymentFunction")).unwrap();
    let handler = PaymentHandler::new(&clients(&t), config, Faults::none());
    assert_garbage_fails_alone(1, valid, 24, |e| async { Ok(handler.handle(e).await?) }).await;
    let charges = t
        .ledger()
        .await
        .into_iter()
        .filter(|(k, _, _)| k == "CHARGE")
        .count();
    assert_eq!(charges, 2, "one ledger entry per order");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_coordinator_batch_mixes_garbage_and_valid_messages_should_fail_exactly_the_garbage()
{
    let t = TestStack::start_paused().await;
    let ids = placed_orders(&t, 2).await;
    let valid = [
        json!({"type": "StockReserved", "orderId": ids[0]}),
        json!({"type": "PaymentCharged", "orderId": ids[0], "paymentId": "ch_test"}),
        json!({"type": "PaymentDeclined", "orderId": ids[1], "reason": "card declined"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    let config = CoordinatorConfig::load(&lookup(&t, "CoordinatorFunction")).unwrap();
    let handler = CoordinatorHandler::new(&clients(&t), config, Faults::none());
    assert_garbage_fails_alone(2, valid, 24, |e| async { Ok(handler.handle(e).await?) }).await;
    assert_eq!(t.order(&ids[0]).await["status"], "CONFIRMED");
    assert_eq!(t.order(&ids[1]).await["status"], "CANCELLED");
    t.stop().await;
}

#[test]
fn when_a_message_is_a_json_array_in_field_order_should_be_refused() {
    // Regression guard: like the API bodies, serde's derived types also accept a JSON array of
    // the fields in order (and an internally tagged enum takes the tag as the first element);
    // `messages::parse` requires objects, so these are refused.
    let bodies = [
        (
            0,
            r#"["ReserveStock","o-1",[{"productId":"p-1","quantity":1}]]"#,
        ),
        (
            0,
            r#"{"type":"ReserveStock","orderId":"o-1","items":[["p-1",1]]}"#,
        ),
        (1, r#"["ChargePayment","o-1","c-1",100,"tok_visa"]"#),
        (2, r#"["StockReserved","o-1"]"#),
    ];
    let accepted: Vec<_> = bodies
        .iter()
        .filter(|(queue, body)| parses_as(*queue, body))
        .collect();
    assert!(accepted.is_empty(), "accepted as messages: {accepted:?}");
}
