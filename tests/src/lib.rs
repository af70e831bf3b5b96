//! Test harness: a whole saga stack per test, in this process, over the wire against
//! DynamoDB Local and moto (started once, shared by every test binary, reused if up).
//!
//! Each test gets its own resource prefix, so tests run in parallel without seeing each
//! other's tables and queues; the stack uses the handlers the Lambda binaries use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use std::time::SystemTime;

use aws_sdk_dynamodb::types::AttributeValue;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use local_runner::services::{self, ServiceOptions};
use local_runner::stack::{Stack, StackOptions};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

pub mod events;
pub mod logs;
pub mod sam;
pub mod templates;

pub use local_runner;
pub use saga_core;

/// A request as API Gateway hands it to the order API: with the route key it matched (the
/// handler routes on it, as behind the real gateway) and the claims its JWT authorizer
/// verified, of customer `sub` (with no group).
pub fn via_gateway(req: lambda_http::Request, route_key: &str, sub: &str) -> lambda_http::Request {
    gateway_request(req, route_key, sub, &[])
}

/// [`via_gateway`] for an operator (a member of the `operators` group).
pub fn via_gateway_as_operator(
    req: lambda_http::Request,
    route_key: &str,
    sub: &str,
) -> lambda_http::Request {
    gateway_request(req, route_key, sub, &["operators"])
}

fn gateway_request(
    req: lambda_http::Request,
    route_key: &str,
    sub: &str,
    groups: &[&str],
) -> lambda_http::Request {
    let mut gw = aws_lambda_events::apigw::ApiGatewayV2httpRequestContext::default();
    gw.route_key = Some(route_key.into());
    let mut jwt = aws_lambda_events::apigw::ApiGatewayRequestAuthorizerJwtDescription::default();
    jwt.claims.insert("sub".into(), sub.into());
    jwt.claims.insert("token_use".into(), "access".into());
    if !groups.is_empty() {
        // As API Gateway hands an array claim over: `[a b]`.
        jwt.claims
            .insert("cognito:groups".into(), format!("[{}]", groups.join(" ")));
    }
    let mut authorizer = aws_lambda_events::apigw::ApiGatewayRequestAuthorizer::default();
    authorizer.jwt = Some(jwt);
    gw.authorizer = Some(authorizer);
    lambda_http::RequestExt::with_request_context(
        req,
        lambda_http::request::RequestContext::ApiGatewayV2(gw),
    )
}

/// The catalogue of a load test: `count` products `{prefix}-{i}` with `base + i * step` units.
pub fn catalogue(prefix: &str, count: i64, base: i64, step: i64) -> Vec<(String, i64)> {
    (0..count)
        .map(|i| (format!("{prefix}-{i}"), base + i * step))
        .collect()
}

/// A random basket from a catalogue: one or two distinct products, 1 to 3 units of each.
pub fn random_basket(products: &[(String, i64)]) -> Vec<(String, u64)> {
    let mut picked: Vec<usize> = (0..products.len()).collect();
    fastrand::shuffle(&mut picked);
    picked[..fastrand::usize(1..=2.min(products.len()))]
        .iter()
        .map(|&p| (products[p].0.clone(), fastrand::u64(1..=3)))
        .collect()
}

/// The body of `POST /orders` for a basket (the customer is whoever's token sends it).
pub fn order_request(basket: &[(String, u64)]) -> Value {
    json!({
        "items": basket
            .iter()
            .map(|(p, q)| json!({"productId": p, "quantity": q}))
            .collect::<Vec<_>>(),
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

static SERVICES: OnceCell<(String, String)> = OnceCell::const_new();

/// DynamoDB Local and moto endpoints, started on first use (or reused if already up).
pub async fn services() -> (String, String) {
    SERVICES
        .get_or_init(|| async {
            let opts = ServiceOptions::new(repo_root());
            let s = services::ensure_services(&opts)
                .await
                .unwrap_or_else(|e| panic!("local services: {e}"));
            let endpoints = (s.dynamodb_endpoint(), s.sqs_endpoint());
            // Left running for the other tests and test binaries; `make test` stops them.
            std::mem::forget(s);
            endpoints
        })
        .await
        .clone()
}

pub struct TestStack {
    pub stack: Stack,
    pub base: String,
    pub prefix: String,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// Signed-in users of the stack's pool: access tokens by (user, operator).
    tokens: tokio::sync::Mutex<HashMap<(String, bool), String>>,
}

/// The customer whose token [`TestStack::request`] sends unless told otherwise.
pub const CUSTOMER: &str = "c-1";
/// The operator whose token [`TestStack::put_product`] sends.
pub const OPERATOR: &str = "op-1";

/// The `authorization` header value that makes [`TestStack::raw_request`] send no
/// `Authorization` header at all (an anonymous request).
pub const ANONYMOUS: &str = "";

/// A response: status, headers, JSON body (Null if the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
    pub raw: String,
}

/// Test defaults: fast retries (2 s visibility), short long-polls, no random declines, no
/// scheduled sweeps (tests sweep explicitly).
pub fn test_options(dynamodb: String, sqs: String) -> StackOptions {
    let mut opts = StackOptions::new(repo_root());
    opts.prefix = format!("t{}-", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    opts.http_addr = ([127, 0, 0, 1], 0).into();
    opts.dynamodb_endpoint = dynamodb;
    opts.sqs_endpoint = sqs;
    opts.poll_wait_seconds = 1;
    opts.visibility_timeout = Some(2);
    opts.function_timeout = Some(Duration::from_secs(2));
    opts.sweep_every = Some(Duration::ZERO);
    opts.env_overrides
        .insert("PAYMENT_FAILURE_RATE".into(), "0".into());
    opts
}

impl TestStack {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut StackOptions)) -> Self {
        let (dynamodb, sqs) = services().await;
        let mut opts = test_options(dynamodb, sqs);
        configure(&mut opts);
        let prefix = opts.prefix.clone();
        let stack = Stack::start(opts).await.expect("stack starts");
        let base = format!("http://{}", stack.http_addr);
        Self {
            stack,
            base,
            prefix,
            http: Client::builder(TokioExecutor::new()).build_http(),
            tokens: Default::default(),
        }
    }

    pub async fn stop(self) {
        let template = self.stack.template.clone();
        let clients = self.stack.clients.clone();
        let cognito = self.stack.cognito.clone();
        self.stack.stop().await;
        let _ = local_runner::provision::delete_prefixed(
            &template,
            &self.prefix,
            &clients.dynamodb,
            &clients.sqs,
        )
        .await;
        let _ = local_runner::cognito::delete_prefixed(&template, &self.prefix, &cognito).await;
    }

    /// An access token of `user` in the stack's user pool (created on first use; an operator
    /// when `operator`), signed in through moto's InitiateAuth as a client would.
    pub async fn token(&self, user: &str, operator: bool) -> String {
        let mut tokens = self.tokens.lock().await;
        if let Some(token) = tokens.get(&(user.to_string(), operator)) {
            return token.clone();
        }
        let sign_in = self.stack.sign_in().expect("the template has a user pool");
        let operators = local_runner::cognito::operators_group(&self.stack.template);
        let groups: &[&str] = if operator { &[&operators] } else { &[] };
        let token = sign_in
            .sign_in(user, groups, &[&operators])
            .await
            .unwrap_or_else(|e| panic!("signing {user} in: {e}"))
            .access_token;
        tokens.insert((user.to_string(), operator), token.clone());
        token
    }

    /// The `sub` of a user of the stack's pool: the customer id of the orders it places.
    pub async fn subject(&self, user: &str) -> String {
        let token = self.token(user, false).await;
        let claims: Value = jsonwebtoken::dangerous::insecure_decode(&token)
            .expect("a JWT")
            .claims;
        claims["sub"].as_str().expect("sub").to_string()
    }

    /// A request as a client sends it. Unless `headers` has an `authorization` header, it
    /// carries customer [`CUSTOMER`]'s token; `("authorization", ANONYMOUS)` sends none.
    pub async fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            let token = self.token(CUSTOMER, false).await;
            req = req.header("authorization", format!("Bearer {token}"));
        }
        for (k, v) in headers {
            if k.eq_ignore_ascii_case("authorization") && *v == ANONYMOUS {
                continue;
            }
            req = req.header(*k, *v);
        }
        let resp = self
            .http
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("HTTP request");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let raw = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            raw,
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.raw_request(method, path, &h, bytes).await
    }

    /// Puts every product of a catalogue (price from its stock); returns the initial stock.
    pub async fn stock_catalogue(
        &self,
        products: &[(String, i64)],
        price_cents: impl Fn(i64) -> u64,
    ) -> HashMap<String, i64> {
        for (id, qty) in products {
            self.put_product(id, price_cents(*qty), *qty as u64).await;
        }
        products.iter().cloned().collect()
    }

    /// Creates a product with its initial stock, as operator [`OPERATOR`] (once: stock then
    /// changes only through [`TestStack::adjust_stock`] and the saga).
    pub async fn put_product(&self, id: &str, price_cents: u64, quantity: u64) {
        let r = self
            .as_operator(
                "PUT",
                &format!("/products/{id}"),
                &json!({"name": id, "priceCents": price_cents, "quantity": quantity}),
                &[],
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.raw);
    }

    /// A request with a JSON body as operator [`OPERATOR`].
    pub async fn as_operator(
        &self,
        method: &str,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let auth = format!("Bearer {}", self.token(OPERATOR, true).await);
        let mut h = vec![("authorization", auth.as_str())];
        h.extend_from_slice(headers);
        self.request(method, path, Some(body), &h).await
    }

    /// `POST /products/{id}/stock-adjustments` as operator [`OPERATOR`]; the reply (201 with
    /// the movement, or an error).
    pub async fn adjust_stock(
        &self,
        id: &str,
        delta: i64,
        reason: &str,
        idempotency_key: Option<&str>,
    ) -> Reply {
        let headers: Vec<(&str, &str)> = idempotency_key
            .map(|k| vec![("idempotency-key", k)])
            .unwrap_or_default();
        self.as_operator(
            "POST",
            &format!("/products/{id}/stock-adjustments"),
            &json!({"delta": delta, "reason": reason}),
            &headers,
        )
        .await
    }

    /// Every stock movement of a product, oldest first (by movement id).
    pub async fn movements(&self, product_id: &str) -> Vec<saga_core::domain::StockMovement> {
        let mut movements: Vec<saga_core::domain::StockMovement> = self
            .scan("StockMovementsTable")
            .await
            .into_iter()
            .map(|item| saga_core::adapters::dynamo::from_item(item).expect("a movement"))
            .filter(|m: &saga_core::domain::StockMovement| m.product_id == product_id)
            .collect();
        movements.sort_by(|a, b| a.movement_id.cmp(&b.movement_id));
        movements
    }

    /// Places an order; returns the reply (202 with the order, or an error).
    pub async fn place(&self, items: &[(&str, u64)], payment_method: Option<&str>) -> Reply {
        let mut body = json!({
            "items": items.iter().map(|(p, q)| json!({"productId": p, "quantity": q})).collect::<Vec<_>>(),
        });
        if let Some(m) = payment_method {
            body["paymentMethod"] = json!(m);
        }
        self.request("POST", "/orders", Some(&body), &[]).await
    }

    pub async fn place_ok(&self, items: &[(&str, u64)], payment_method: Option<&str>) -> String {
        let r = self.place(items, payment_method).await;
        assert_eq!(r.status, 202, "{}", r.raw);
        r.body["orderId"].as_str().unwrap().to_string()
    }

    /// An order, read as operator [`OPERATOR`] (who may read anyone's).
    pub async fn order(&self, id: &str) -> Value {
        let auth = format!("Bearer {}", self.token(OPERATOR, true).await);
        let r = self
            .request(
                "GET",
                &format!("/orders/{id}"),
                None,
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        r.body
    }

    /// Waits until the order is CONFIRMED or CANCELLED and its compensations are recorded
    /// (stock RELEASED where it was reserved, payment REFUNDED where it was charged).
    pub async fn wait_settled(&self, id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let o = self.order(id).await;
            if settled(&o) {
                return o;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("order {id} did not settle in {timeout:?}: {o}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Waits until every order in `ids` is settled (see [`settled`]); returns them in the order
    /// of `ids`. One consistent scan of the orders table a second, however many orders: polling
    /// each order through the API would load the very stack under test.
    pub async fn wait_all_settled(&self, ids: &[String], timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut orders = self.all_orders().await;
            let pending: Vec<&String> = ids
                .iter()
                .filter(|id| !orders.get(*id).is_some_and(settled))
                .collect();
            if pending.is_empty() {
                return ids.iter().filter_map(|id| orders.remove(id)).collect();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {} orders did not settle in {timeout:?}, e.g. {}: {}",
                pending.len(),
                ids.len(),
                pending[0],
                orders.get(pending[0]).cloned().unwrap_or(Value::Null)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub async fn product_quantity(&self, id: &str) -> i64 {
        let r = self
            .request("GET", &format!("/products/{id}"), None, &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        r.body["quantity"].as_i64().unwrap()
    }

    pub async fn scan(&self, table_logical_id: &str) -> Vec<HashMap<String, AttributeValue>> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .stack
                .clients
                .dynamodb
                .scan()
                .table_name(self.stack.table(table_logical_id))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .expect("scan");
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return items,
            }
        }
    }

    /// The payment simulator's ledger: (kind, orderId) per entry.
    pub async fn ledger(&self) -> Vec<(String, String, Option<String>)> {
        self.scan("PaymentLedgerTable")
            .await
            .into_iter()
            .map(|item| {
                let s = |k: &str| {
                    item.get(k)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default()
                };
                let outcome = item
                    .get("charge")
                    .and_then(|c| c.as_m().ok())
                    .and_then(|m| m.get("outcome"))
                    .and_then(|v| v.as_s().ok())
                    .cloned();
                (s("kind"), s("orderId"), outcome)
            })
            .collect()
    }

    /// Idempotency records: id -> stored result (empty while in progress).
    pub async fn idempotency_records(&self) -> HashMap<String, String> {
        self.scan("IdempotencyTable")
            .await
            .into_iter()
            .filter_map(|i| {
                let id = i.get("id").and_then(|v| v.as_s().ok()).cloned()?;
                let result = i
                    .get("result")
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .unwrap_or_default();
                Some((id, result))
            })
            .collect()
    }

    pub async fn send(&self, queue_logical_id: &str, body: &str) {
        self.stack
            .clients
            .sqs
            .send_message()
            .queue_url(self.stack.queue_url(queue_logical_id))
            .message_body(body)
            .send()
            .await
            .expect("send");
    }

    /// `saga-local audit` on this stack's tables (the library call the command makes): strongly
    /// consistent reads, the template's order timeout plus the command's default grace.
    pub async fn audit(&self) -> local_runner::audit::Report {
        use local_runner::audit::{self, Rules, ScanOptions, TableNames};
        let tables = TableNames::of(&self.stack.names.tables).expect("the five tables");
        let timeout = audit::template_order_timeout(&self.stack.template).expect("a timeout");
        let rules = Rules {
            now_ms: saga_core::time::now_ms(),
            pending_limit: Duration::from_secs(timeout + 120),
        };
        let opts = ScanOptions {
            consistent: true,
            ..ScanOptions::default()
        };
        audit::audit(&self.stack.clients.dynamodb, &tables, &opts, &rules)
            .await
            .unwrap_or_else(|e| panic!("the audit could not run: {e}"))
    }

    /// The findings of [`TestStack::audit`].
    pub async fn audit_findings(&self) -> Vec<local_runner::audit::Finding> {
        self.audit().await.findings
    }

    /// Fails with the audit's report unless it finds nothing.
    pub async fn assert_audit_clean(&self) {
        let report = self.audit().await;
        assert!(report.clean(), "the audit found:\n{}", report.text());
    }

    /// Approximate number of messages (visible + in flight) in a queue.
    pub async fn queue_depth(&self, queue_logical_id: &str) -> i64 {
        let (visible, in_flight) = self.queue_counts(queue_logical_id).await;
        visible + in_flight
    }

    /// Approximate numbers of messages visible and in flight in a queue.
    pub async fn queue_counts(&self, queue_logical_id: &str) -> (i64, i64) {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let out = self
            .stack
            .clients
            .sqs
            .get_queue_attributes()
            .queue_url(self.stack.queue_url(queue_logical_id))
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("attributes");
        let attrs = out.attributes.unwrap_or_default();
        let count = |a: A| {
            attrs
                .get(&a)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        (
            count(A::ApproximateNumberOfMessages),
            count(A::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Receives (and deletes) every message now in a queue; returns the bodies.
    pub async fn drain(&self, queue_logical_id: &str) -> Vec<String> {
        let mut bodies = Vec::new();
        loop {
            let out = self
                .stack
                .clients
                .sqs
                .receive_message()
                .queue_url(self.stack.queue_url(queue_logical_id))
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .expect("receive");
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                return bodies;
            }
            for m in messages {
                bodies.push(m.body.clone().unwrap_or_default());
                self.stack
                    .clients
                    .sqs
                    .delete_message()
                    .queue_url(self.stack.queue_url(queue_logical_id))
                    .receipt_handle(m.receipt_handle.unwrap_or_default())
                    .send()
                    .await
                    .expect("delete");
            }
        }
    }
}

/// Whether an order is final and its compensations are done.
pub fn settled(o: &Value) -> bool {
    match o["status"].as_str() {
        Some("CONFIRMED") => true,
        Some("CANCELLED") => {
            !matches!(
                o["stockStatus"].as_str(),
                Some("RESERVED") | Some("PENDING")
            ) && !matches!(
                o["paymentStatus"].as_str(),
                Some("CHARGED") | Some("PENDING")
            )
        }
        _ => false,
    }
}

/// The saga's invariants over a set of settled orders, checked against the stores themselves:
/// no negative stock; per product, initial = available + units held by CONFIRMED orders; one
/// charge per CONFIRMED order and none refunded; every charged CANCELLED order refunded exactly
/// once; no reservation left standing for a CANCELLED order.
pub async fn assert_invariants(t: &TestStack, orders: &[Value], initial: &HashMap<String, i64>) {
    for o in orders {
        assert!(settled(o), "order not settled: {o}");
    }
    for (product, start) in initial {
        let available = t.product_quantity(product).await;
        assert!(available >= 0, "{product} went negative: {available}");
        let held: i64 = orders
            .iter()
            .filter(|o| o["status"] == "CONFIRMED")
            .flat_map(|o| o["items"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["productId"] == product.as_str())
            .map(|i| i["quantity"].as_i64().unwrap())
            .sum();
        assert_eq!(
            *start,
            available + held,
            "stock of {product}: initial {start} != available {available} + held {held}"
        );
    }
    let ledger = t.ledger().await;
    let count = |kind: &str, id: &str, outcome: Option<&str>| {
        ledger
            .iter()
            .filter(|(k, o, out)| {
                k == kind && o == id && (outcome.is_none() || out.as_deref() == outcome)
            })
            .count()
    };
    let records = t.idempotency_records().await;
    for o in orders {
        let id = o["orderId"].as_str().unwrap();
        let charged = count("CHARGE", id, Some("APPROVED"));
        assert!(charged <= 1, "order {id} charged {charged} times");
        // The ledger is keyed by the provider idempotency key, so at most one entry per
        // order and kind can exist; what matters is that the order agrees with it.
        match o["status"].as_str().unwrap() {
            "CONFIRMED" => {
                assert_eq!(charged, 1, "confirmed order {id} not charged once");
                assert_eq!(
                    count("REFUND", id, None),
                    0,
                    "confirmed order {id} refunded"
                );
                assert_eq!(o["stockStatus"], "RESERVED");
                assert_eq!(o["paymentStatus"], "CHARGED");
            }
            _ => {
                assert_eq!(
                    count("REFUND", id, None),
                    charged,
                    "cancelled order {id}: charged {charged}, refunds differ: {o}"
                );
                let reserved = records
                    .get(&format!("{id}#reserve"))
                    .is_some_and(|r| r.contains("\"StockReserved\""));
                let released = records.contains_key(&format!("{id}#release"));
                assert_eq!(
                    reserved, released,
                    "cancelled order {id}: reserved {reserved}, released {released}: {o}"
                );
                assert_eq!(
                    o["stockStatus"] == "RELEASED",
                    reserved,
                    "cancelled order {id}: {o}"
                );
                assert!(
                    o["cancelReason"].is_string(),
                    "cancelled order {id} without a reason: {o}"
                );
            }
        }
    }
}

/// What [`TestStack::settle_with_recovery`] had to do.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Messages moved from DLQs back to their queues.
    pub redriven: usize,
    /// Orders the sweeper timed out.
    pub swept: u64,
    pub rounds: usize,
    /// How long until every order was final.
    pub settled_in: Duration,
}

/// The dead-letter queues and their source queues (logical ids).
pub const DLQS: [(&str, &str); 3] = [
    ("StockDeadLetterQueue", "StockQueue"),
    ("PaymentDeadLetterQueue", "PaymentQueue"),
    ("CoordinatorDeadLetterQueue", "CoordinatorQueue"),
];

impl TestStack {
    /// A stack whose queue consumers are all held back: whatever arrives stays in the queues.
    pub async fn start_paused() -> Self {
        Self::start_with(|o| {
            o.paused = vec![
                "StockFunction".into(),
                "PaymentFunction".into(),
                "CoordinatorFunction".into(),
            ];
        })
        .await
    }

    /// Every order in the table, as `GET /orders/{id}` shows it.
    pub async fn all_orders(&self) -> HashMap<String, Value> {
        self.scan("OrdersTable")
            .await
            .into_iter()
            .map(|item| {
                let order: saga_core::domain::Order =
                    saga_core::adapters::dynamo::from_item(item).expect("an order");
                (order.order_id.clone(), order.view())
            })
            .collect()
    }

    /// Moves every message of every DLQ back to its source queue; returns how many.
    pub async fn redrive_all(&self) -> usize {
        let mut moved = 0;
        for (dlq, source) in DLQS {
            moved += local_runner::redrive::redrive(
                &self.stack.clients.sqs,
                self.stack.queue_url(dlq),
                self.stack.queue_url(source),
                None,
            )
            .await
            .expect("redrive");
        }
        moved
    }

    /// Waits until every order in `ids` is final, then until every queue is quiet, so that the
    /// invariants are checked after all effects. The saga gets `natural` to settle on its own;
    /// after that, every few seconds, dead letters are redriven and the sweeper runs (with the
    /// stack's ORDER_TIMEOUT_SECONDS). Fails if an order is missing from the table (lost), or
    /// if no order settles for `stall` (however slow the machine, a working saga keeps
    /// settling orders). `label` prefixes the progress reports.
    pub async fn settle_with_recovery(
        &self,
        ids: &[String],
        label: &str,
        natural: Duration,
        stall: Duration,
    ) -> Recovery {
        let started = tokio::time::Instant::now();
        let mut last_report = started;
        let mut last_recovery = started;
        let mut last_progress = (started, usize::MAX);
        let mut recovery = Recovery::default();
        loop {
            let orders = self.all_orders().await;
            let missing: Vec<_> = ids.iter().filter(|id| !orders.contains_key(*id)).collect();
            assert!(missing.is_empty(), "orders lost: {missing:?}");
            let unsettled: Vec<&Value> = ids
                .iter()
                .map(|id| &orders[id])
                .filter(|o| !settled(o))
                .collect();
            if unsettled.is_empty() {
                break;
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = tokio::time::Instant::now();
                eprintln!(
                    "{label}: {} of {} orders not settled after {:?}",
                    unsettled.len(),
                    ids.len(),
                    started.elapsed()
                );
            }
            if unsettled.len() < last_progress.1 {
                last_progress = (tokio::time::Instant::now(), unsettled.len());
            }
            assert!(
                last_progress.0.elapsed() < stall,
                "{label}: no order settled for {stall:?} ({} of {} still open after {:?}), e.g. {}",
                unsettled.len(),
                ids.len(),
                started.elapsed(),
                unsettled[0]
            );
            if started.elapsed() > natural && last_recovery.elapsed() > Duration::from_secs(4) {
                recovery.rounds += 1;
                last_recovery = tokio::time::Instant::now();
                recovery.redriven += self.redrive_all().await;
                recovery.swept += self.stack.sweep_now().await.expect("sweep")["timedOut"]
                    .as_u64()
                    .unwrap_or(0);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        recovery.settled_in = started.elapsed();
        let quiet = tokio::time::Instant::now() + stall;
        loop {
            recovery.redriven += self.redrive_all().await;
            if self.queues_idle().await {
                return recovery;
            }
            assert!(
                tokio::time::Instant::now() < quiet,
                "{label}: the queues never went quiet within {stall:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Messages waiting or in flight in the three work queues.
    pub async fn backlog(&self) -> i64 {
        let mut total = 0;
        for (_, source) in DLQS {
            total += self.queue_depth(source).await;
        }
        total
    }

    /// Messages in the three dead-letter queues.
    pub async fn dead_letters(&self) -> i64 {
        let mut total = 0;
        for (dlq, _) in DLQS {
            total += self.queue_depth(dlq).await;
        }
        total
    }

    /// Whether every work queue and DLQ is empty (nothing visible or in flight).
    pub async fn queues_idle(&self) -> bool {
        self.backlog().await == 0 && self.dead_letters().await == 0
    }
}

/// Paces a load generator by what the stack absorbs: a new order is admitted only while the
/// work queues hold fewer than `bound` messages, so a slow machine gets a slower test instead
/// of a backlog that grows until the SQS stand-in collapses under it. The depth is read at
/// most every 250 ms and shared by every caller; each admission counts as two more messages
/// (an order's two commands) until the next reading.
pub struct Pacer<'a> {
    stack: &'a TestStack,
    bound: i64,
    state: tokio::sync::Mutex<PacerState>,
}

struct PacerState {
    read_at: Option<tokio::time::Instant>,
    depth: i64,
    peak: i64,
    waits: usize,
    /// When the backlog last shrank (or admitted an order).
    progress_at: tokio::time::Instant,
}

/// Waiting longer than this for the backlog to shrink means the stack stopped working.
const PACER_STALL: Duration = Duration::from_secs(300);

impl<'a> Pacer<'a> {
    pub fn new(stack: &'a TestStack, bound: i64) -> Self {
        Self {
            stack,
            bound,
            state: tokio::sync::Mutex::new(PacerState {
                read_at: None,
                depth: 0,
                peak: 0,
                waits: 0,
                progress_at: tokio::time::Instant::now(),
            }),
        }
    }

    /// Returns once the backlog is under the bound.
    pub async fn admit(&self) {
        loop {
            {
                let mut s = self.state.lock().await;
                if s.read_at
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
                {
                    let depth = self.stack.backlog().await;
                    if depth < s.depth {
                        s.progress_at = tokio::time::Instant::now();
                    }
                    s.depth = depth;
                    s.peak = s.peak.max(depth);
                    s.read_at = Some(tokio::time::Instant::now());
                }
                if s.depth < self.bound {
                    s.depth += 2;
                    s.progress_at = tokio::time::Instant::now();
                    return;
                }
                s.waits += 1;
                assert!(
                    s.progress_at.elapsed() < PACER_STALL,
                    "the work queues have held {} messages (bound {}) without shrinking for {PACER_STALL:?}",
                    s.depth,
                    self.bound
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The deepest backlog seen, and how often a caller had to wait.
    pub async fn report(&self) -> (i64, usize) {
        let s = self.state.lock().await;
        (s.peak, s.waits)
    }
}

/// The newest modification time of the files under `dir` (recursively).
pub(crate) fn newest(dir: &Path) -> SystemTime {
    let mut latest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        latest = latest.max(t);
    }
    latest
}

/// `target/debug/saga-local`, the local runner's binary (see [`workspace_binary`]).
pub fn saga_local_binary() -> PathBuf {
    workspace_binary("saga-local")
}

/// One binary of the workspace's debug build: a function (`stock`, `order-api`, ...) or the
/// runner's `saga-local` / `saga-bench`. The first call in a test process runs `cargo build
/// --workspace --bins --tests`, the packages and features `cargo test --workspace` builds, so it reuses
/// that build and only compiles and links the binaries' own crates: seconds, where the release
/// build (LTO, one codegen unit) takes minutes. Cargo's own freshness check makes later calls
/// in other test processes no-ops. The feature unification with the tests compiles the core's
/// fault points in, but a Lambda binary's `main` gives its handler `Faults::none()`, so none
/// can fire. What deploys, the arm64 release build of `sam build`, runs in
/// tests/tests/sam_local.rs.
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            // `--tests` too: it brings in the dev-dependencies, so features resolve exactly as
            // for `cargo test --workspace` and nothing but the binaries is compiled (without
            // it, ring, rustls and everything built on them are compiled a second time).
            .args(["build", "--workspace", "--bins", "--tests"])
            .current_dir(repo_root())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build --workspace --bins --tests failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // This test binary is <target>/debug/deps/<name>: the build above wrote to
        // <target>/debug, whatever CARGO_TARGET_DIR says.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        exe.parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .ok_or_else(|| format!("{} is not under a target dir", exe.display()))
    });
    let bin = dir.as_ref().unwrap_or_else(|e| panic!("{e}")).join(name);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}
