//! Each function's IAM role grants exactly what the function does, judged by what it does.
//!
//! A stack runs with the runner's access recorder (`local_runner::access`): every AWS call made
//! on a function's behalf, by its handler or by its event source mapping (on AWS, Lambda polls
//! and deletes with the function's role), is recorded with the IAM action it needs and the
//! resource it acts on, as the template's logical ids. The scenarios below drive every path that
//! makes an AWS call: an order confirmed; out-of-stock and unknown-product rejections and a
//! declined payment, compensated by a release and a refund; an `Idempotency-Key` replayed and
//! reused with another body; the order and product routes; the sweeper timing out a stale
//! order; a customer cancelling a confirmed order; and the idempotency layer's recovery paths (a crashed request taken over, a claim
//! expired after a failed send, a claim released after a failed provider call).
//!
//! Then, per function, the recorded (action, resource) pairs are compared with the `Allow`
//! statements of its role, in both directions: used but not granted fails, granted but never
//! used fails. What Lambda itself does with the role and the code never calls is expected
//! without being observed: writing to the function's log group (`logs:CreateLogStream`,
//! `logs:PutLogEvents`), sending traces when `Tracing: Active` (`xray:PutTraceSegments`,
//! `xray:PutTelemetryRecords`, which have no resource-level permissions: `"*"`), and, for an SQS
//! event source, `sqs:GetQueueAttributes` on its queue (the local event source emulation reads
//! the queue's settings from the template instead; its `ReceiveMessage` and
//! `DeleteMessageBatch` are recorded like any call).
//!
//! The mutation tests change the template or the recording (one break each) and assert the
//! check reports it, so the check demonstrably fails when it should.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextRef, Input,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use local_runner::access::{Access, AccessRecorder, Resource};
use local_runner::template::{Effect, FunctionSpec, ResourceRef, Template};
use saga_core::aws::AwsClients;
use saga_core::config::{OrderApiConfig, PaymentConfig};
use saga_core::faults::{FaultPoint, Faults};
use saga_core::handlers::api::ApiHandler;
use saga_core::handlers::batch::SqsHandler;
use saga_core::handlers::payment::PaymentHandler;
use saga_core::idempotency::{IdempotencyRecord, Status};
use saga_core::time::now_ms;
use saga_tests::TestStack;
use saga_tests::templates::{mutated, real_template_text, report};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(120);

/// What Lambda does with a function's role without the code calling it.
const LOGGING_ACTIONS: &[&str] = &["logs:CreateLogStream", "logs:PutLogEvents"];
const TRACING_ACTIONS: &[&str] = &["xray:PutTraceSegments", "xray:PutTelemetryRecords"];
/// Of the three actions the Lambda developer guide lists for polling an SQS event source
/// (`sqs:ReceiveMessage`, `sqs:DeleteMessage`, `sqs:GetQueueAttributes`), the one the local
/// event source emulation does not call.
const POLLER_ACTIONS_NOT_EMULATED: &[&str] = &["sqs:GetQueueAttributes"];

// ==========================================================================================
// The check
// ==========================================================================================

/// What an action is used or granted on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum On {
    /// `"*"`.
    Any,
    /// The ARN of a template resource, followed by `suffix` (`/index/NAME` for an index).
    Arn { logical_id: String, suffix: String },
    /// Anything else, as written (an ARN spelled out; a table or queue not of the template).
    Other(String),
}

impl On {
    fn of(logical_id: &str) -> Self {
        On::Arn {
            logical_id: logical_id.to_string(),
            suffix: String::new(),
        }
    }
}

impl From<&Resource> for On {
    fn from(r: &Resource) -> Self {
        match r {
            Resource::Template { logical_id, suffix } => On::Arn {
                logical_id: logical_id.clone(),
                suffix: suffix.clone(),
            },
            Resource::Unknown(what) => On::Other(what.clone()),
        }
    }
}

impl From<&ResourceRef> for On {
    fn from(r: &ResourceRef) -> Self {
        match r {
            ResourceRef::Any => On::Any,
            ResourceRef::Arn { logical_id, suffix } => On::Arn {
                logical_id: logical_id.clone(),
                suffix: suffix.clone(),
            },
            ResourceRef::Literal(s) => On::Other(s.clone()),
        }
    }
}

/// `On` in words, with the kind of resource from the template: "table OrdersTable",
/// "index PendingOrdersIndex of table OrdersTable", "queue StockQueue".
fn describe(template: &Template, on: &On) -> String {
    match on {
        On::Any => "\"*\"".to_string(),
        On::Other(o) => o.clone(),
        On::Arn { logical_id, suffix } => {
            let kind = match template.resource_types.get(logical_id).map(String::as_str) {
                Some("AWS::DynamoDB::Table") => "table",
                Some("AWS::SQS::Queue") => "queue",
                Some("AWS::Logs::LogGroup") => "log group",
                _ => "resource",
            };
            match suffix.strip_prefix("/index/") {
                Some(index) => format!("index {index} of {kind} {logical_id}"),
                None if suffix.is_empty() => format!("{kind} {logical_id}"),
                None => format!("{kind} {logical_id} + {suffix:?}"),
            }
        }
    }
}

/// Compares what each function of `template` used (in `accesses`) and what Lambda does with
/// its role, with what its role grants. Each problem is one readable line.
fn check_permissions(template: &Template, accesses: &BTreeMap<Access, u64>) -> Vec<String> {
    let mut problems = Vec::new();
    let functions: BTreeSet<&str> = template
        .functions
        .iter()
        .map(|f| f.logical_id.as_str())
        .collect();
    for a in accesses.keys() {
        if !functions.contains(a.function.as_str()) {
            problems.push(format!(
                "{}: recorded {} on {}, but the template has no such function",
                a.function, a.action, a.resource
            ));
        }
    }
    for f in &template.functions {
        check_function(template, f, accesses, &mut problems);
    }
    problems
}

/// (action, resource) -> why it is needed, or where it is granted.
type Permissions = BTreeMap<(String, On), String>;

fn check_function(
    template: &Template,
    f: &FunctionSpec,
    accesses: &BTreeMap<Access, u64>,
    problems: &mut Vec<String>,
) {
    let id = &f.logical_id;
    let needed = needs(f, accesses, problems);
    let Some((role_id, granted)) = grants(template, f, problems) else {
        return;
    };
    for ((action, on), why) in &needed {
        if !granted.contains_key(&(action.clone(), on.clone())) {
            problems.push(format!(
                "{id}: needs {action} on {} (for {why}) but its role {role_id} does not grant it",
                describe(template, on)
            ));
        }
    }
    for ((action, on), at) in &granted {
        if !needed.contains_key(&(action.clone(), on.clone())) {
            problems.push(format!(
                "{id}: {at} grants {action} on {}, which neither its code nor Lambda uses",
                describe(template, on)
            ));
        }
    }
}

/// What a function needs: what it was recorded doing, and what Lambda does with its role.
fn needs(
    f: &FunctionSpec,
    accesses: &BTreeMap<Access, u64>,
    problems: &mut Vec<String>,
) -> Permissions {
    let id = &f.logical_id;
    let mut needed = Permissions::new();
    for a in accesses.keys().filter(|a| &a.function == id) {
        if let Resource::Unknown(what) = &a.resource {
            problems.push(format!(
                "{id}: its {} call acted on {what}, which is not a resource of the template",
                a.operation
            ));
        }
        needed
            .entry((a.action.clone(), On::from(&a.resource)))
            .or_insert_with(|| format!("its {} calls", a.operation));
    }
    if needed.is_empty() {
        problems.push(format!(
            "{id}: no AWS call was recorded for it: the scenarios do not exercise it"
        ));
    }
    match &f.log_group {
        Some(group) => {
            for a in LOGGING_ACTIONS {
                needed.insert(
                    (a.to_string(), On::of(group)),
                    "Lambda writing its logs".into(),
                );
            }
        }
        None => problems.push(format!(
            "{id}: no LoggingConfig.LogGroup naming a log group of the template, so its logs \
             permissions cannot be checked"
        )),
    }
    if f.tracing.as_deref() == Some("Active") {
        for a in TRACING_ACTIONS {
            needed.insert((a.to_string(), On::Any), "Tracing: Active".into());
        }
    }
    for e in &f.sqs_events {
        for a in POLLER_ACTIONS_NOT_EMULATED {
            needed.insert(
                (a.to_string(), On::of(&e.queue)),
                format!("Lambda polling its event source {}", e.name),
            );
        }
    }

    needed
}

/// What a function's role grants, and the role's logical id; `None` when it has no role the
/// test can read.
fn grants(
    template: &Template,
    f: &FunctionSpec,
    problems: &mut Vec<String>,
) -> Option<(String, Permissions)> {
    let id = &f.logical_id;
    if f.sam_policies {
        problems.push(format!(
            "{id}: has SAM Policies; give it its own Role with explicit statements so its \
             permissions can be checked"
        ));
    }
    let Some(role_id) = &f.role else {
        problems.push(format!(
            "{id}: has no Role of its own (!GetAtt Role.Arn): SAM would generate one, with \
             AWSLambdaSQSQueueExecutionRole for SQS events (every queue of the account)"
        ));
        return None;
    };
    let Some(role) = template.role(role_id) else {
        problems.push(format!(
            "{id}: its Role {role_id} is not an AWS::IAM::Role of the template"
        ));
        return None;
    };
    if !role.managed_policy_arns.is_empty() {
        problems.push(format!(
            "{id}: role {role_id} has ManagedPolicyArns {:?}, whose statements this test cannot see",
            role.managed_policy_arns
        ));
    }
    if !role.assumed_by.iter().any(|p| p == "lambda.amazonaws.com") {
        problems.push(format!(
            "{id}: role {role_id} is not assumable by lambda.amazonaws.com (it is by {:?})",
            role.assumed_by
        ));
    }
    let mut granted = Permissions::new();
    for s in &role.statements {
        let at = format!(
            "{role_id}/{}, statement {}",
            s.policy_name,
            s.sid.as_deref().unwrap_or("-")
        );
        if s.effect != Effect::Allow {
            problems.push(format!("{id}: {at} is not Effect: Allow"));
            continue;
        }
        for action in &s.actions {
            if action.contains('*') {
                problems.push(format!("{id}: {at} grants the wildcard action {action}"));
            }
            for r in &s.resources {
                let on = On::from(r);
                match &on {
                    On::Other(o) => problems.push(format!(
                        "{id}: {at}: resource {o} is not understood by this test"
                    )),
                    On::Any if !TRACING_ACTIONS.contains(&action.as_str()) => problems.push(
                        format!("{id}: {at} grants {action} on every resource (\"*\")"),
                    ),
                    _ => {}
                }
                granted.insert((action.clone(), on), at.clone());
            }
        }
    }
    Some((role_id.clone(), granted))
}

// ==========================================================================================
// Recording every path
// ==========================================================================================

/// The accesses of every function over all the scenarios, recorded once for all the tests of
/// this file (on a runtime of its own, since each test has its own).
fn recording() -> &'static BTreeMap<Access, u64> {
    static RECORDING: OnceLock<Result<BTreeMap<Access, u64>, String>> = OnceLock::new();
    let result = RECORDING.get_or_init(|| {
        std::thread::spawn(|| {
            let started = std::time::Instant::now();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .expect("a runtime");
            let accesses = runtime.block_on(record_every_path());
            eprintln!(
                "recorded {} distinct accesses in {:?}",
                accesses.len(),
                started.elapsed()
            );
            accesses
        })
        .join()
        .map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the scenarios panicked".into())
        })
    });
    match result {
        Ok(accesses) => accesses,
        Err(e) => panic!("recording the functions' calls failed: {e}"),
    }
}

/// Fails every call it picks, after the function's recorder has seen it (it is added to the
/// function's clients after the recorder): an AWS call that fails, for the paths that handle
/// one. The call still needs its permission on AWS.
#[derive(Clone)]
struct Refuse(Arc<dyn Fn(&Input) -> bool + Send + Sync>);

impl std::fmt::Debug for Refuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refuse")
    }
}

impl Intercept for Refuse {
    fn name(&self) -> &'static str {
        "Refuse"
    }

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if (self.0)(context.input()) {
            return Err("refused by the test".into());
        }
        Ok(())
    }
}

/// A function's clients, with `refuse` failing the calls it picks.
fn refusing(clients: &AwsClients, refuse: Refuse) -> AwsClients {
    AwsClients {
        dynamodb: aws_sdk_dynamodb::Client::from_conf(
            clients
                .dynamodb
                .config()
                .to_builder()
                .interceptor(refuse.clone())
                .build(),
        ),
        sqs: aws_sdk_sqs::Client::from_conf(
            clients
                .sqs
                .config()
                .to_builder()
                .interceptor(refuse)
                .build(),
        ),
    }
}

fn lookup(t: &TestStack, function: &str) -> impl Fn(&str) -> Option<String> + use<> {
    let env = t.stack.environments[function].clone();
    move |k: &str| env.get(k).cloned()
}

fn order_body(items: &[(&str, u64)], payment_method: Option<&str>) -> Value {
    let mut body = json!({
        "items": items.iter().map(|(p, q)| json!({"productId": p, "quantity": q})).collect::<Vec<_>>(),
    });
    if let Some(m) = payment_method {
        body["paymentMethod"] = json!(m);
    }
    body
}

async fn post_with_key(t: &TestStack, body: &Value, key: &str) -> saga_tests::Reply {
    t.request("POST", "/orders", Some(body), &[("idempotency-key", key)])
        .await
}

/// `POST /orders` with an `Idempotency-Key`, straight to an API handler, with a deadline, as
/// customer `sub`.
async fn post_to(
    handler: &ApiHandler,
    body: &Value,
    key: &str,
    deadline_ms: i64,
    sub: &str,
) -> u16 {
    let mut ctx = lambda_runtime::Context::default();
    ctx.deadline = deadline_ms as u64;
    let req = http::Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(lambda_http::Body::Text(body.to_string()))
        .unwrap();
    let req = lambda_http::RequestExt::with_lambda_context(req, ctx);
    let req = saga_tests::via_gateway(req, "POST /orders", sub);
    handler.handle(req).await.unwrap().status().as_u16()
}

async fn idempotency_record(t: &TestStack, id: &str) -> Option<IdempotencyRecord> {
    t.stack
        .clients
        .dynamodb
        .get_item()
        .table_name(t.stack.table("IdempotencyTable"))
        .key(
            "id",
            aws_sdk_dynamodb::types::AttributeValue::S(id.to_string()),
        )
        .consistent_read(true)
        .send()
        .await
        .expect("get")
        .item
        .map(|i| serde_dynamo::from_item::<_, IdempotencyRecord>(i).expect("a record"))
}

fn order_id(r: &saga_tests::Reply) -> String {
    assert_eq!(r.status, 202, "{}", r.raw);
    r.body["orderId"].as_str().unwrap().to_string()
}

/// Drives every path of the saga that makes an AWS call, asserting each reached its outcome,
/// and returns what each function did.
async fn record_every_path() -> BTreeMap<Access, u64> {
    let recorder = AccessRecorder::default();
    // Stock held back at first, so that the charges land before the reservations: an
    // out-of-stock order is then refunded, a declined one released.
    let t = TestStack::start_with(|o| {
        o.access_recorder = Some(recorder.clone());
        o.paused = vec!["StockFunction".into()];
        o.env_overrides
            .insert("ORDER_TIMEOUT_SECONDS".into(), "2".into());
    })
    .await;

    // The operator routes: PUT and GET a product (and one that does not exist).
    for (id, price, quantity) in [
        ("p-lp-ok", 500, 100),
        ("p-lp-short", 300, 1),
        ("p-lp-gone", 200, 10),
    ] {
        t.put_product(id, price, quantity).await;
    }
    assert_eq!(t.product_quantity("p-lp-ok").await, 100);
    // A name change under If-Match, and stock adjustments (one with a key, replayed): the
    // creation and the adjustments write their movements in their transactions.
    let r = t
        .as_operator(
            "PUT",
            "/products/p-lp-ok",
            &json!({"name": "p-lp-ok renamed", "priceCents": 500}),
            &[("if-match", "\"v1\"")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let added = t
        .adjust_stock("p-lp-ok", 10, "restock", Some("lp-adjust"))
        .await;
    assert_eq!(added.status, 201, "{}", added.raw);
    let replayed = t
        .adjust_stock("p-lp-ok", 10, "restock", Some("lp-adjust"))
        .await;
    assert_eq!(replayed.body, added.body);
    let r = t.adjust_stock("p-lp-ok", -10, "recount", None).await;
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(t.product_quantity("p-lp-ok").await, 100);
    assert_eq!(t.movements("p-lp-ok").await.len(), 3);
    assert_eq!(
        t.request("GET", "/products/p-lp-none", None, &[])
            .await
            .status,
        404
    );

    // Phase 1, with stock held back.
    let confirmed = t.place_ok(&[("p-lp-ok", 2)], None).await;
    let out_of_stock = t.place_ok(&[("p-lp-short", 2)], None).await;
    let declined = t
        .place_ok(&[("p-lp-ok", 1)], Some("tok_chargeDeclined"))
        .await;
    // A product that exists when the order is priced and is gone when stock is reserved.
    let unknown = t.place_ok(&[("p-lp-gone", 1)], None).await;
    t.stack
        .clients
        .dynamodb
        .delete_item()
        .table_name(t.stack.table("ProductsTable"))
        .key(
            "productId",
            aws_sdk_dynamodb::types::AttributeValue::S("p-lp-gone".into()),
        )
        .send()
        .await
        .expect("delete the product");
    // An unknown product at placement is refused before anything is written.
    let r = t.place(&[("p-lp-none", 1)], None).await;
    assert_eq!(r.status, 400, "{}", r.raw);
    assert_eq!(r.body["error"]["code"], "UNKNOWN_PRODUCT", "{}", r.raw);
    // The customer's own list, a page at a time (the customer-orders index).
    let page = t.request("GET", "/orders?limit=2", None, &[]).await;
    assert_eq!(page.status, 200, "{}", page.raw);
    assert_eq!(page.body["orders"].as_array().map(Vec::len), Some(2));
    assert!(page.body["nextToken"].is_string());

    // An Idempotency-Key: placed, replayed, reused with another body.
    let keyed_body = order_body(&[("p-lp-ok", 1)], None);
    let keyed = order_id(&post_with_key(&t, &keyed_body, "lp-key-replay").await);
    let replay = post_with_key(&t, &keyed_body, "lp-key-replay").await;
    assert_eq!(order_id(&replay), keyed);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let reused = post_with_key(&t, &order_body(&[("p-lp-ok", 3)], None), "lp-key-replay").await;
    assert_eq!(reused.status, 422, "{}", reused.raw);

    let api = "OrderApiFunction";
    let api_clients = t.stack.function_clients[api].clone();
    let api_config = OrderApiConfig::load(&lookup(&t, api)).unwrap();
    // The customer whose token `post_with_key` sends.
    let customer = t.subject(saga_tests::CUSTOMER).await;

    // The API dies after its transaction (the fault point after a write): the key is left in
    // progress until the request's deadline, and a retry after it takes the key over and
    // finishes the same order.
    let crashed_body = order_body(&[("p-lp-ok", 1)], None);
    let crashing = ApiHandler::new(
        &api_clients,
        api_config.clone(),
        Faults::none().with(FaultPoint::AfterWrite, 1.0),
    );
    let deadline = now_ms() + 1_000;
    assert_eq!(
        post_to(
            &crashing,
            &crashed_body,
            "lp-key-crash",
            deadline,
            &customer
        )
        .await,
        500
    );
    let held = idempotency_record(&t, &format!("api#{customer}#lp-key-crash"))
        .await
        .expect("the claim");
    assert_eq!(held.status, Status::InProgress);
    tokio::time::sleep(Duration::from_millis(
        (deadline + 100 - now_ms()).max(0) as u64
    ))
    .await;
    let taken_over = order_id(&post_with_key(&t, &crashed_body, "lp-key-crash").await);
    assert_eq!(Some(&taken_over), held.order_id.as_ref(), "the same order");

    // Sending the saga's first messages fails: the claim is expired at once, and the retry
    // takes it over and finishes the same order.
    let stock_queue = t.stack.queue_url("StockQueue").to_string();
    let no_stock_queue = Refuse(Arc::new(move |input: &Input| {
        input
            .downcast_ref::<aws_sdk_sqs::operation::send_message::SendMessageInput>()
            .is_some_and(|i| i.queue_url.as_deref() == Some(stock_queue.as_str()))
    }));
    let failing_send = ApiHandler::new(
        &refusing(&api_clients, no_stock_queue),
        api_config,
        Faults::none(),
    );
    let send_failed_body = order_body(&[("p-lp-ok", 2)], None);
    assert_eq!(
        post_to(
            &failing_send,
            &send_failed_body,
            "lp-key-send-failed",
            now_ms() + 60_000,
            &customer,
        )
        .await,
        503
    );
    let record = idempotency_record(&t, &format!("api#{customer}#lp-key-send-failed"))
        .await
        .expect("the claim");
    assert_eq!(record.status, Status::InProgress);
    assert!(
        record.in_progress_until_ms.unwrap() < now_ms(),
        "the claim was expired"
    );
    let resent = order_id(&post_with_key(&t, &send_failed_body, "lp-key-send-failed").await);
    assert_eq!(Some(&resent), record.order_id.as_ref(), "the same order");

    // The payment provider fails: the payment step gives up its claim so that a retry can run.
    let payment = "PaymentFunction";
    let ledger = t.stack.table("PaymentLedgerTable").to_string();
    let no_ledger = Refuse(Arc::new(move |input: &Input| {
        input
            .downcast_ref::<aws_sdk_dynamodb::operation::put_item::PutItemInput>()
            .is_some_and(|i| i.table_name.as_deref() == Some(ledger.as_str()))
    }));
    let failing_provider = PaymentHandler::new(
        &refusing(&t.stack.function_clients[payment], no_ledger),
        PaymentConfig::load(&lookup(&t, payment)).unwrap(),
        Faults::none(),
    );
    let charge = json!({"type": "ChargePayment", "orderId": "o-lp-provider-down", "customerId": "c-lp", "amountCents": 100, "paymentMethod": "tok_visa"});
    let event: SqsEvent = serde_json::from_value(json!({"Records": [{
        "messageId": "m-lp-1",
        "receiptHandle": "rh",
        "body": charge.to_string(),
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": t.stack.names.queue_arns["PaymentQueue"],
        "awsRegion": "us-east-1"
    }]}))
    .unwrap();
    let mut ctx = lambda_runtime::Context::default();
    ctx.deadline = (now_ms() + 5_000) as u64;
    let ledger_put = Access {
        function: payment.into(),
        operation: "PutItem".into(),
        action: "dynamodb:PutItem".into(),
        resource: Resource::of("PaymentLedgerTable"),
    };
    let ledger_puts = || recorder.accesses().get(&ledger_put).copied().unwrap_or(0);
    let before = ledger_puts();
    let r = failing_provider
        .handle(lambda_runtime::LambdaEvent::new(event, ctx))
        .await
        .unwrap();
    assert_eq!(r.batch_item_failures.len(), 1, "the record is retried");
    assert_eq!(
        ledger_puts(),
        before + 1,
        "a refused call is still recorded"
    );
    assert!(
        idempotency_record(&t, "o-lp-provider-down#charge")
            .await
            .is_none(),
        "the claim was released"
    );

    // Stock goes on: every order of phase 1 settles, compensations included.
    t.stack.set_paused("StockFunction", false);
    let settled = |id: String| {
        let t = &t;
        async move { t.wait_settled(&id, SETTLE).await }
    };
    let o = settled(confirmed).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    let o = settled(out_of_stock).await;
    assert_eq!(o["cancelReason"], "INSUFFICIENT_STOCK", "{o}");
    assert_eq!(o["paymentStatus"], "REFUNDED", "{o}");
    let o = settled(declined).await;
    assert_eq!(o["cancelReason"], "PAYMENT_DECLINED", "{o}");
    assert_eq!(o["stockStatus"], "RELEASED", "{o}");
    let o = settled(unknown).await;
    assert_eq!(o["cancelReason"], "UNKNOWN_PRODUCT", "{o}");
    assert_eq!(o["stockStatus"], "REJECTED", "{o}");
    assert_eq!(o["paymentStatus"], "REFUNDED", "{o}");
    for id in [keyed, taken_over, resent] {
        let o = settled(id).await;
        assert_eq!(o["status"], "CONFIRMED", "{o}");
    }

    // Phase 2: the sweeper. Payment held back; the order is reserved, stays PENDING past
    // ORDER_TIMEOUT_SECONDS, is timed out (stock released), and the late charge is refunded.
    t.stack.set_paused(payment, true);
    // A poll already waiting on the queue when the pause came still delivers: let it end.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let stale = t.place_ok(&[("p-lp-ok", 1)], None).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    while t.order(&stale).await["stockStatus"] != "RESERVED" {
        assert!(tokio::time::Instant::now() < deadline, "never reserved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let o = t.order(&stale).await;
    assert_eq!(o["paymentStatus"], "PENDING", "payment held back: {o}");
    let swept = t.stack.sweep_now().await.expect("the sweep ran");
    assert_eq!(swept["timedOut"], 1, "{swept}");
    t.stack.set_paused(payment, false);
    let o = t.wait_settled(&stale, SETTLE).await;
    assert_eq!(o["cancelReason"], "TIMEOUT", "{o}");
    assert_eq!(o["stockStatus"], "RELEASED", "{o}");
    // The held-back charge either ran before the cancellation's fence (then it is refunded)
    // or finds the fence (then it charges nothing); which one comes first is SQS's choice.
    assert!(
        o["paymentStatus"] == "REFUNDED" || o["paymentStatus"] == "VOIDED",
        "{o}"
    );

    // Phase 3: the customer cancels a confirmed order: the API's conditional update, and
    // both compensations sent from the API.
    let mine = t.place_ok(&[("p-lp-ok", 1)], None).await;
    let o = t.wait_settled(&mine, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    let r = t
        .request("POST", &format!("/orders/{mine}/cancel"), None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let o = t.wait_settled(&mine, SETTLE).await;
    assert_eq!(o["cancelReason"], "CUSTOMER_CANCELLED", "{o}");
    assert_eq!(
        (&o["stockStatus"], &o["paymentStatus"]),
        (&json!("RELEASED"), &json!("REFUNDED")),
        "{o}"
    );

    // Whatever is still in flight (acknowledgements) lands before the recording is read.
    let quiet = tokio::time::Instant::now() + SETTLE;
    while !t.queues_idle().await {
        assert!(
            tokio::time::Instant::now() < quiet,
            "queues never went idle"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let accesses = recorder.accesses();
    t.stop().await;
    accesses
}

// ==========================================================================================
// Tests
// ==========================================================================================

/// The recording holds what the handlers are known to do: a guard against scenarios that
/// silently miss a path. `SHOW_CALLS=1 cargo test -p saga-tests --test least_privilege
/// recording -- --nocapture` prints every access recorded.
#[test]
fn when_driving_every_path_should_record_each_functions_calls() {
    let accesses = recording();
    if std::env::var_os("SHOW_CALLS").is_some() {
        for (a, n) in accesses {
            println!(
                "{:<20} {:<20} {:<28} {:<40} x{n}",
                a.function, a.operation, a.action, a.resource
            );
        }
    }
    let used = |function: &str| -> BTreeSet<(String, String)> {
        accesses
            .keys()
            .filter(|a| a.function == function)
            .map(|a| (a.action.clone(), a.resource.to_string()))
            .collect()
    };
    #[rustfmt::skip]
    let expected = [
        // The stock reservation: the idempotency record put, one update per line, and the
        // release's condition check on the reservation record, all inside transactions.
        ("StockFunction", "dynamodb:PutItem", "IdempotencyTable"),
        ("StockFunction", "dynamodb:UpdateItem", "ProductsTable"),
        ("StockFunction", "dynamodb:ConditionCheckItem", "IdempotencyTable"),
        ("StockFunction", "sqs:SendMessage", "CoordinatorQueue"),
        // The payment step: claim, complete, release on failure, and the provider's ledger.
        ("PaymentFunction", "dynamodb:PutItem", "IdempotencyTable"),
        ("PaymentFunction", "dynamodb:UpdateItem", "IdempotencyTable"),
        ("PaymentFunction", "dynamodb:DeleteItem", "IdempotencyTable"),
        ("PaymentFunction", "dynamodb:PutItem", "PaymentLedgerTable"),
        // The API: prices in one batch read, the order and its key's claim in one
        // transaction, the key completed, taken over and expired, the saga's first messages.
        ("OrderApiFunction", "dynamodb:BatchGetItem", "ProductsTable"),
        // The catalogue: a product created with its first movement (one transaction), its
        // name changed, its stock adjusted with the movement and the key's record (one
        // transaction), the key's record read first.
        ("OrderApiFunction", "dynamodb:GetItem", "ProductsTable"),
        ("OrderApiFunction", "dynamodb:PutItem", "ProductsTable"),
        ("OrderApiFunction", "dynamodb:UpdateItem", "ProductsTable"),
        ("OrderApiFunction", "dynamodb:PutItem", "StockMovementsTable"),
        ("OrderApiFunction", "dynamodb:GetItem", "IdempotencyTable"),
        ("OrderApiFunction", "dynamodb:PutItem", "IdempotencyTable"),
        ("OrderApiFunction", "dynamodb:PutItem", "OrdersTable"),
        ("OrderApiFunction", "dynamodb:UpdateItem", "IdempotencyTable"),
        ("OrderApiFunction", "sqs:SendMessage", "StockQueue"),
        ("OrderApiFunction", "sqs:SendMessage", "PaymentQueue"),
        ("CoordinatorFunction", "dynamodb:UpdateItem", "OrdersTable"),
        // Each queue consumer's event source mapping receives and deletes with the function's
        // role (DeleteMessageBatch is authorised by sqs:DeleteMessage).
        ("StockFunction", "sqs:ReceiveMessage", "StockQueue"),
        ("StockFunction", "sqs:DeleteMessage", "StockQueue"),
        ("PaymentFunction", "sqs:ReceiveMessage", "PaymentQueue"),
        ("PaymentFunction", "sqs:DeleteMessage", "PaymentQueue"),
        ("CoordinatorFunction", "sqs:ReceiveMessage", "CoordinatorQueue"),
        ("CoordinatorFunction", "sqs:DeleteMessage", "CoordinatorQueue"),
        // A customer's cancellation is a conditional update by the API.
        ("OrderApiFunction", "dynamodb:UpdateItem", "OrdersTable"),
        // The customer's order list queries the customer-orders index.
        ("OrderApiFunction", "dynamodb:Query", "OrdersTable/index/CustomerOrdersIndex"),
        // The sweeper queries the pending-orders index.
        ("SweeperFunction", "dynamodb:Query", "OrdersTable/index/PendingOrdersIndex"),
    ];
    for (function, action, resource) in expected {
        assert!(
            used(function).contains(&(action.to_string(), resource.to_string())),
            "{function} should call {action} on {resource}; recorded {:#?}",
            used(function)
        );
    }
    // The sweeper sends in batches, authorised by sqs:SendMessage, and never scans.
    assert!(accesses.keys().any(|a| a.function == "SweeperFunction"
        && a.operation == "SendMessageBatch"
        && a.action == "sqs:SendMessage"));
    assert!(
        !used("SweeperFunction")
            .iter()
            .any(|(a, _)| a == "dynamodb:Scan")
    );
    // Nothing the stock function does deletes.
    assert!(
        !used("StockFunction")
            .iter()
            .any(|(a, _)| a == "dynamodb:DeleteItem")
    );
    // Every table and queue named is one of the template's.
    for a in accesses.keys() {
        assert!(
            matches!(a.resource, Resource::Template { .. }),
            "{a:?} names a resource outside the template"
        );
    }
}

#[test]
fn when_checking_the_real_template_should_grant_exactly_what_each_function_uses() {
    let template = Template::from_str(&real_template_text()).expect("template parses");
    let problems = check_permissions(&template, recording());
    assert!(
        problems.is_empty(),
        "template.yaml has {} least-privilege problem(s):\n{}",
        problems.len(),
        report(&problems)
    );
}

fn assert_reported_with(text: &str, accesses: &BTreeMap<Access, u64>, expected: &[&str]) {
    let template = Template::from_str(text).expect("the mutated template parses");
    let problems = check_permissions(&template, accesses);
    assert!(
        problems
            .iter()
            .any(|p| expected.iter().all(|e| p.contains(e))),
        "expected a problem mentioning {expected:?}; got:\n{}",
        report(&problems)
    );
}

fn assert_reported(text: &str, expected: &[&str]) {
    assert_reported_with(text, recording(), expected);
}

#[test]
fn when_a_role_grants_an_action_the_code_does_not_use_should_report_it() {
    let text = mutated(
        "Action: dynamodb:UpdateItem\n                Resource: !GetAtt ProductsTable.Arn",
        "Action:\n                  - dynamodb:UpdateItem\n                  - dynamodb:DeleteItem\n                Resource: !GetAtt ProductsTable.Arn",
        Some("  StockRole:"),
    );
    assert_reported(
        &text,
        &[
            "StockFunction",
            "dynamodb:DeleteItem",
            "table ProductsTable",
            "neither its code nor Lambda uses",
        ],
    );
    // The right action on the wrong table is both unused and missing.
    let text = mutated(
        "Resource: !GetAtt PaymentLedgerTable.Arn",
        "Resource: !GetAtt OrdersTable.Arn",
        Some("  PaymentRole:"),
    );
    assert_reported(
        &text,
        &[
            "PaymentFunction",
            "dynamodb:PutItem",
            "table OrdersTable",
            "neither its code nor Lambda uses",
        ],
    );
    assert_reported(
        &text,
        &[
            "PaymentFunction",
            "needs dynamodb:PutItem on table PaymentLedgerTable",
        ],
    );
}

#[test]
fn when_a_role_lacks_an_action_the_code_uses_should_report_it() {
    let text = mutated(
        "                  - dynamodb:ConditionCheckItem\n",
        "",
        Some("  StockRole:"),
    );
    assert_reported(
        &text,
        &[
            "StockFunction",
            "needs dynamodb:ConditionCheckItem on table IdempotencyTable",
            "StockRole",
        ],
    );
    let text = mutated(
        "                  - sqs:GetQueueAttributes\n",
        "",
        Some("  CoordinatorRole:"),
    );
    assert_reported(
        &text,
        &[
            "CoordinatorFunction",
            "needs sqs:GetQueueAttributes on queue CoordinatorQueue",
        ],
    );
    // The sweeper's grant on the whole table instead of its index.
    let text = mutated(
        "Resource: !Sub ${OrdersTable.Arn}/index/PendingOrdersIndex",
        "Resource: !GetAtt OrdersTable.Arn",
        Some("  SweeperRole:"),
    );
    assert_reported(
        &text,
        &[
            "SweeperFunction",
            "needs dynamodb:Query on index PendingOrdersIndex of table OrdersTable",
        ],
    );
}

/// The other side: the code changes and the template does not.
#[test]
fn when_the_code_starts_making_a_call_its_role_does_not_grant_should_report_it() {
    let text = real_template_text();
    let access = |function: &str, operation: &str, action: &str, resource: Resource| Access {
        function: function.into(),
        operation: operation.into(),
        action: action.into(),
        resource,
    };
    // The products store reads a product with a Scan instead of a GetItem.
    let mut changed = recording().clone();
    let get = access(
        "OrderApiFunction",
        "GetItem",
        "dynamodb:GetItem",
        Resource::of("ProductsTable"),
    );
    assert!(
        changed.remove(&get).is_some(),
        "the API no longer reads a product"
    );
    changed.insert(
        access(
            "OrderApiFunction",
            "Scan",
            "dynamodb:Scan",
            Resource::of("ProductsTable"),
        ),
        1,
    );
    assert_reported_with(
        &text,
        &changed,
        &[
            "OrderApiFunction",
            "needs dynamodb:Scan on table ProductsTable",
        ],
    );
    assert_reported_with(
        &text,
        &changed,
        &[
            "OrderApiFunction",
            "grants dynamodb:GetItem on table ProductsTable",
            "neither",
        ],
    );
    // The stock function's calls plus one delete of an order.
    let mut changed = recording().clone();
    changed.insert(
        access(
            "StockFunction",
            "DeleteItem",
            "dynamodb:DeleteItem",
            Resource::of("OrdersTable"),
        ),
        1,
    );
    assert_reported_with(
        &text,
        &changed,
        &[
            "StockFunction",
            "needs dynamodb:DeleteItem on table OrdersTable",
            "StockRole",
        ],
    );
    // A call on a queue the template does not declare.
    let mut changed = recording().clone();
    changed.insert(
        access(
            "CoordinatorFunction",
            "SendMessage",
            "sqs:SendMessage",
            Resource::Unknown("queue http://127.0.0.1:9324/000000000000/elsewhere".into()),
        ),
        1,
    );
    assert_reported_with(
        &text,
        &changed,
        &[
            "CoordinatorFunction",
            "SendMessage call acted on queue http://127.0.0.1:9324/000000000000/elsewhere",
            "not a resource of the template",
        ],
    );
}

/// The same, recorded: a stack whose template points the coordinator at the products table
/// records the coordinator updating it, which its role does not allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_function_is_pointed_at_another_table_should_record_and_report_the_call() {
    let text = mutated(
        "          ORDERS_TABLE: !Ref OrdersTable\n",
        "          ORDERS_TABLE: !Ref ProductsTable\n",
        Some("  CoordinatorFunction:"),
    );
    let path = std::env::temp_dir().join(format!(
        "least-privilege-{}.yaml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, &text).expect("write the mutated template");
    let recorder = AccessRecorder::default();
    let t = TestStack::start_with(|o| {
        o.template_path = path.clone();
        o.access_recorder = Some(recorder.clone());
    })
    .await;
    t.send(
        "CoordinatorQueue",
        &json!({"type": "StockReserved", "orderId": "o-lp-elsewhere"}).to_string(),
    )
    .await;
    let wanted = Access {
        function: "CoordinatorFunction".into(),
        operation: "UpdateItem".into(),
        action: "dynamodb:UpdateItem".into(),
        resource: Resource::of("ProductsTable"),
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !recorder.accesses().contains_key(&wanted) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator never updated the products table: {:#?}",
            recorder.accesses()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accesses = recorder.accesses();
    t.stop().await;
    let _ = std::fs::remove_file(&path);
    assert_reported_with(
        &text,
        &accesses,
        &[
            "CoordinatorFunction",
            "needs dynamodb:UpdateItem on table ProductsTable",
            "CoordinatorRole",
        ],
    );
}
