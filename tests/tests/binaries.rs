//! The Lambda binaries themselves, built in release mode, fed every file under `events/`
//! through the Lambda Runtime API, against the local stack (DynamoDB Local and moto).
//!
//! For each function: `cargo lambda watch --only-lambda-apis` serves the Runtime API on a free
//! port of 127.0.0.1; the release binary (`target/release/<name>`, what
//! `cargo build --release -p order-api -p stock -p payment -p coordinator -p sweeper` builds)
//! runs against it with exactly the environment the template gives the function (resolved to
//! this test's tables and queues) plus what Lambda itself sets; `cargo lambda invoke
//! --data-file events/<file>.json` sends each event and the test asserts the response: status
//! and body for the API, the exact `batchItemFailures` for the queue consumers (the malformed
//! record's id and no other), the sweeper's summary, and what each invocation left in the
//! tables and queues.
//!
//! The binaries are run directly, rather than through `cargo lambda watch`'s own `cargo run`,
//! so that what is tested is the build that ships: `cargo run --bin X` at the workspace root
//! would unify features with the test crates and compile the fault-injection points in.
//! The test builds them once (a no-op when `make build` already did); the local stack's own
//! consumers are paused so that nothing but the binary handles the events.
//!
//! Last, `sam build` builds what deploys (`cargo lambda build --release --arm64` per function,
//! zig as the cross linker) and the test checks every function got an arm64 `bootstrap`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use saga_tests::TestStack;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The Lambda binaries, as `cargo build --release -p ...` names them.
const BINARIES: &[&str] = &["order-api", "stock", "payment", "coordinator", "sweeper"];

/// Every file under events/, with the function it is for. A file missing here fails
/// [`every_event_file_is_shaped_as_aws_delivers_it_and_is_tested`].
const EVENTS: &[(&str, &str)] = &[
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
    ("api-place-order-no-authorizer.json", "OrderApiFunction"),
    ("sqs-stock-reserve.json", "StockFunction"),
    ("sqs-stock-reserve-duplicate.json", "StockFunction"),
    ("sqs-stock-reserve-rejected.json", "StockFunction"),
    ("sqs-stock-release.json", "StockFunction"),
    ("sqs-stock-batch-with-malformed.json", "StockFunction"),
    ("sqs-payment-charge.json", "PaymentFunction"),
    ("sqs-payment-charge-duplicate.json", "PaymentFunction"),
    ("sqs-payment-charge-declined.json", "PaymentFunction"),
    ("sqs-payment-refund.json", "PaymentFunction"),
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
        "sqs-coordinator-batch-with-malformed.json",
        "CoordinatorFunction",
    ),
    ("scheduled-sweep.json", "SweeperFunction"),
];

/// The customer (the token's `sub`) of the API events signed in as alice, and of the orders
/// the events read.
const ALICE: &str = "7d8ca528-4931-4254-9273-ea5ee853f271";

/// `SentTimestamp` of the events' messages, and the `cutoffMs` of the OrderTimedOut event.
const EVENT_TIME_MS: i64 = 1_767_225_600_000;

fn repo() -> PathBuf {
    saga_tests::repo_root()
}

fn event_path(file: &str) -> PathBuf {
    repo().join("events").join(file)
}

fn read_event(file: &str) -> Value {
    let text =
        std::fs::read_to_string(event_path(file)).unwrap_or_else(|e| panic!("events/{file}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("events/{file} is not JSON: {e}"))
}

/// The messageId of the record of `file` whose body does not parse as a message.
fn malformed_record_id(file: &str) -> String {
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

fn venv_bin() -> PathBuf {
    repo().join(".venv/bin")
}

/// Where `cargo build` puts the release binaries: `CARGO_TARGET_DIR` when set (the build runs
/// with this process's environment), else the target dir this test was built in.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo().join(dir),
        // CARGO_TARGET_TMPDIR is <target dir>/tmp.
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_path_buf(),
    }
}

/// Builds the release binaries once per test run (cargo's own freshness check makes this a
/// second or two when `make build` already built them).
fn build_release_binaries() -> &'static Result<Duration, String> {
    static BUILT: OnceLock<Result<Duration, String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let started = Instant::now();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(repo()).args(["build", "--release"]);
        for b in BINARIES {
            cmd.args(["-p", b]);
        }
        let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build --release failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(started.elapsed())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One function's release binary attached to a `cargo lambda watch` Runtime API.
struct Function {
    name: String,
    port: u16,
    log: PathBuf,
    watch_log: PathBuf,
    // Both are killed when the test ends (kill_on_drop), also on failure.
    _watch: Child,
    binary: Child,
}

impl Function {
    async fn start(t: &TestStack, logical_id: &str) -> Function {
        let built = build_release_binaries();
        if let Err(e) = built {
            panic!("{e}");
        }
        let cargo_lambda = venv_bin().join("cargo-lambda");
        assert!(
            cargo_lambda.exists(),
            "{} is missing: run `make setup-tools` (infra/scripts/setup.sh tools)",
            cargo_lambda.display()
        );
        let spec = t
            .stack
            .template
            .function(logical_id)
            .unwrap_or_else(|| panic!("no {logical_id} in template.yaml"));
        let name = spec.binary.clone();
        let binary = target_dir().join("release").join(&name);
        assert!(binary.exists(), "{} was not built", binary.display());

        let port = free_port();
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("binaries");
        std::fs::create_dir_all(&logs).unwrap();
        let watch_log = logs.join(format!("{}{name}-watch.log", t.prefix));
        let log = logs.join(format!("{}{name}.log", t.prefix));
        let watch = Command::new(&cargo_lambda)
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "-A",
                "127.0.0.1",
                "-P",
            ])
            .arg(port.to_string())
            .current_dir(repo())
            .env("PATH", path_with_venv())
            .stdin(Stdio::null())
            .stdout(log_file(&watch_log))
            .stderr(log_file(&watch_log))
            .kill_on_drop(true)
            .spawn()
            .expect("start cargo lambda watch");
        let mut watch = watch;
        wait_for_port(port, &watch_log).await;
        // Listening, and ours: a watch that lost the port to another process has exited.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            watch.try_wait().expect("watch status").is_none(),
            "cargo lambda watch exited:\n{}",
            tail(&watch_log, 30)
        );

        // Exactly what Lambda would give the function: the template's environment (resolved
        // to this test's resources) and Lambda's own variables; nothing inherited.
        let (dynamodb, sqs) = saga_tests::services().await;
        let mut env: BTreeMap<String, String> = t.stack.environments[logical_id].clone();
        env.extend(
            [
                (
                    "AWS_LAMBDA_RUNTIME_API",
                    format!("http://127.0.0.1:{port}/.rt"),
                ),
                ("AWS_LAMBDA_FUNCTION_NAME", name.clone()),
                ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
                (
                    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                    spec.memory_mb.to_string(),
                ),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ENDPOINT_URL_DYNAMODB", dynamodb),
                ("AWS_ENDPOINT_URL_SQS", sqs),
                ("AWS_ACCESS_KEY_ID", "local".into()),
                ("AWS_SECRET_ACCESS_KEY", "local".into()),
                ("AWS_EC2_METADATA_DISABLED", "true".into()),
                ("AWS_CONFIG_FILE", "/dev/null".into()),
                ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        let binary = Command::new(&binary)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        Function {
            name,
            port,
            log,
            watch_log,
            _watch: watch,
            binary,
        }
    }

    /// `cargo lambda invoke --data-file events/<file>`: the function's JSON response.
    async fn invoke(&mut self, file: &str) -> Value {
        let path = event_path(file);
        assert!(path.exists(), "events/{file} is missing");
        let mut invoke = Command::new(venv_bin().join("cargo-lambda"));
        invoke
            .args(["lambda", "invoke", "-A", "127.0.0.1", "-P"])
            .arg(self.port.to_string())
            .arg("--data-file")
            .arg(&path)
            .current_dir(repo())
            .env("PATH", path_with_venv())
            .kill_on_drop(true);
        let output = tokio::select! {
            out = tokio::time::timeout(Duration::from_secs(60), invoke.output()) => out,
            status = self.binary.wait() => panic!(
                "{} exited ({status:?}) while handling events/{file}:\n{}",
                self.name, tail(&self.log, 30)
            ),
        };
        let out = output
            .unwrap_or_else(|_| {
                panic!(
                    "{}: events/{file} got no response in 60 s\nfunction log:\n{}\nwatch log:\n{}",
                    self.name,
                    tail(&self.log, 30),
                    tail(&self.watch_log, 30)
                )
            })
            .expect("run cargo lambda invoke");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: cargo lambda invoke events/{file} failed: {}{}\nfunction log:\n{}",
            self.name,
            stdout,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log, 30)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "{}: events/{file}: response is not JSON ({e}): {stdout}",
                self.name
            )
        })
    }

    /// Invokes an API event: (status, headers, JSON body).
    async fn http(&mut self, file: &str) -> (u64, Value, Value) {
        let r = self.invoke(file).await;
        let status = r["statusCode"]
            .as_u64()
            .unwrap_or_else(|| panic!("events/{file}: no statusCode in {r}"));
        let body = r["body"].as_str().unwrap_or_default();
        let body = serde_json::from_str(body).unwrap_or(Value::Null);
        (status, r["headers"].clone(), body)
    }

    /// Invokes an SQS event: the ids in `batchItemFailures`.
    async fn batch(&mut self, file: &str) -> Vec<String> {
        let r = self.invoke(file).await;
        let failures = r["batchItemFailures"]
            .as_array()
            .unwrap_or_else(|| panic!("events/{file}: no batchItemFailures in {r}"));
        failures
            .iter()
            .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
            .collect()
    }
}

/// A log file that several writers append to.
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn path_with_venv() -> String {
    format!(
        "{}:{}",
        venv_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

async fn wait_for_port(port: u16, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "cargo lambda watch did not listen on 127.0.0.1:{port}:\n{}",
            tail(log, 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message now in a queue, parsed (and removed).
async fn messages(t: &TestStack, queue: &str) -> Vec<Value> {
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
fn order(id: &str, stock: &str, payment: &str, payment_id: Option<&str>, created_ms: i64) -> Value {
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

async fn seed_order(t: &TestStack, order: Value) {
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

fn now_ms() -> i64 {
    saga_core::time::now_ms()
}

// ==========================================================================================

#[test]
fn every_event_file_is_shaped_as_aws_delivers_it_and_is_tested() {
    let files: BTreeSet<String> = std::fs::read_dir(repo().join("events"))
        .expect("events/")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".json"))
        .collect();
    let tested: BTreeSet<String> = EVENTS.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(
        files, tested,
        "every events/ file must be listed in EVENTS (and so invoked by a test here)"
    );
    let queues = BTreeMap::from([
        ("StockFunction", "StockQueue"),
        ("PaymentFunction", "PaymentQueue"),
        ("CoordinatorFunction", "CoordinatorQueue"),
    ]);
    for (file, function) in EVENTS {
        let v = read_event(file);
        match *function {
            "OrderApiFunction" => {
                // API Gateway HTTP API, payload format 2.0.
                let e: aws_lambda_events::apigw::ApiGatewayV2httpRequest =
                    serde_json::from_value(v.clone())
                        .unwrap_or_else(|e| panic!("{file}: not an HTTP API event: {e}"));
                assert_eq!(v["version"], "2.0", "{file}");
                let method = v["requestContext"]["http"]["method"].as_str().unwrap();
                assert_eq!(
                    v["routeKey"].as_str().unwrap().split(' ').next(),
                    Some(method),
                    "{file}"
                );
                assert_eq!(v["rawPath"], v["requestContext"]["http"]["path"], "{file}");
                assert!(e.request_context.request_id.is_some(), "{file}");
                assert_eq!(v["isBase64Encoded"], false, "{file}");
                for name in v["headers"].as_object().unwrap().keys() {
                    assert_eq!(
                        name,
                        &name.to_lowercase(),
                        "{file}: HTTP API lowercases header names"
                    );
                }
            }
            "SweeperFunction" => {
                // EventBridge scheduled event (the `Schedule` event of SAM).
                for key in [
                    "version",
                    "id",
                    "detail-type",
                    "source",
                    "account",
                    "time",
                    "region",
                    "resources",
                    "detail",
                ] {
                    assert!(v.get(key).is_some(), "{file}: lacks {key}");
                }
                assert_eq!(v["detail-type"], "Scheduled Event", "{file}");
                assert_eq!(v["source"], "aws.events", "{file}");
                assert!(
                    v["resources"][0]
                        .as_str()
                        .is_some_and(|r| r.starts_with("arn:aws:events:"))
                );
            }
            consumer => {
                let _: aws_lambda_events::sqs::SqsEvent = serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("{file}: not an SQS event: {e}"));
                let records = v["Records"].as_array().unwrap();
                assert!(!records.is_empty() && records.len() <= 10, "{file}");
                for r in records {
                    for key in [
                        "messageId",
                        "receiptHandle",
                        "body",
                        "attributes",
                        "messageAttributes",
                        "md5OfBody",
                        "eventSource",
                        "eventSourceARN",
                        "awsRegion",
                    ] {
                        assert!(r.get(key).is_some(), "{file}: a record lacks {key}");
                    }
                    assert_eq!(r["eventSource"], "aws:sqs", "{file}");
                    assert_eq!(r["md5OfBody"].as_str().unwrap().len(), 32, "{file}");
                    assert!(
                        r["attributes"]["ApproximateReceiveCount"].is_string(),
                        "{file}"
                    );
                    let arn = r["eventSourceARN"].as_str().unwrap();
                    assert!(
                        arn.starts_with("arn:aws:sqs:") && arn.contains(queues[consumer]),
                        "{file}: {arn} is not the {} queue",
                        queues[consumer]
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_order_api_binary_gets_its_events_should_answer_each_as_the_api_does() {
    let t = TestStack::start_paused().await;
    let mut f = Function::start(&t, "OrderApiFunction").await;

    let (status, _, body) = f.http("api-put-product.json").await;
    let product = json!({"productId": "p-event-1", "name": "Event widget", "priceCents": 1250, "quantity": 100});
    assert_eq!((status, &body), (200, &product));
    let (status, _, body) = f.http("api-get-product.json").await;
    assert_eq!((status, &body), (200, &product));
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
        &t,
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
    // Alice's list: her three orders, newest first; bob's order does not show.
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
    let mut expected_stock = vec![reserve(&order_id), reserve(&keyed_id)];
    expected_stock.sort_by_key(|m| m.to_string());
    let mut expected_payment = vec![charge(&order_id), charge(&keyed_id)];
    expected_payment.sort_by_key(|m| m.to_string());
    assert_eq!(messages(&t, "StockQueue").await, expected_stock);
    assert_eq!(messages(&t, "PaymentQueue").await, expected_payment);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_stock_binary_gets_its_batches_should_reserve_once_and_fail_only_the_malformed_record()
 {
    let t = TestStack::start_paused().await;
    t.put_product("p-event-1", 1250, 100).await;
    t.put_product("p-event-scarce", 900, 1).await;
    let mut f = Function::start(&t, "StockFunction").await;
    let reserved = |id: &str| json!({"type": "StockReserved", "orderId": id});

    assert_eq!(
        f.batch("sqs-stock-reserve.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-1").await, 98);
    assert_eq!(
        messages(&t, "CoordinatorQueue").await,
        [reserved("o-event-stock-1")]
    );

    // Redelivered: nothing reserved twice, the recorded result published again.
    assert_eq!(
        f.batch("sqs-stock-reserve-duplicate.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-1").await, 98);
    assert_eq!(
        messages(&t, "CoordinatorQueue").await,
        [reserved("o-event-stock-1")]
    );

    // Not enough stock: a business outcome, so the record succeeds.
    assert_eq!(
        f.batch("sqs-stock-reserve-rejected.json").await,
        Vec::<String>::new()
    );
    assert_eq!(t.product_quantity("p-event-scarce").await, 1);
    assert_eq!(
        messages(&t, "CoordinatorQueue").await,
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
        messages(&t, "CoordinatorQueue").await,
        [json!({"type": "StockReleased", "orderId": "o-event-stock-1"})]
    );

    let file = "sqs-stock-batch-with-malformed.json";
    assert_eq!(f.batch(file).await, [malformed_record_id(file)]);
    assert_eq!(t.product_quantity("p-event-1").await, 98);
    assert_eq!(
        messages(&t, "CoordinatorQueue").await,
        [reserved("o-event-stock-3"), reserved("o-event-stock-4")]
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_payment_binary_gets_its_batches_should_charge_once_and_fail_only_the_malformed_record()
 {
    let t = TestStack::start_paused().await;
    let mut f = Function::start(&t, "PaymentFunction").await;

    assert_eq!(
        f.batch("sqs-payment-charge.json").await,
        Vec::<String>::new()
    );
    let first = messages(&t, "CoordinatorQueue").await;
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
    assert_eq!(messages(&t, "CoordinatorQueue").await, first);
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
        messages(&t, "CoordinatorQueue").await,
        [json!({"type": "PaymentDeclined", "orderId": "o-event-pay-2", "reason": "CARD_DECLINED"})]
    );

    assert_eq!(
        f.batch("sqs-payment-refund.json").await,
        Vec::<String>::new()
    );
    assert_eq!(
        messages(&t, "CoordinatorQueue").await,
        [
            json!({"type": "PaymentRefunded", "orderId": "o-event-pay-1", "paymentId": "ch_event0001"})
        ]
    );
    assert!(
        t.ledger()
            .await
            .iter()
            .any(|(k, o, _)| k == "REFUND" && o == "o-event-pay-1")
    );

    let file = "sqs-payment-batch-with-malformed.json";
    assert_eq!(f.batch(file).await, [malformed_record_id(file)]);
    let results = messages(&t, "CoordinatorQueue").await;
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
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_coordinator_binary_gets_its_batches_should_move_each_order_on_and_fail_only_the_malformed_record()
 {
    let t = TestStack::start_paused().await;
    let created = now_ms();
    seed_order(
        &t,
        order("o-event-coord-1", "PENDING", "PENDING", None, created),
    )
    .await;
    seed_order(
        &t,
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
        &t,
        order("o-event-coord-3", "PENDING", "PENDING", None, created),
    )
    .await;
    seed_order(
        &t,
        order("o-event-coord-4", "PENDING", "PENDING", None, created),
    )
    .await;
    // Created before the OrderTimedOut event's cutoff.
    seed_order(
        &t,
        order(
            "o-event-coord-5",
            "PENDING",
            "PENDING",
            None,
            EVENT_TIME_MS - 600_000,
        ),
    )
    .await;
    let mut f = Function::start(&t, "CoordinatorFunction").await;

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
        messages(&t, "PaymentQueue").await,
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

    let file = "sqs-coordinator-batch-with-malformed.json";
    assert_eq!(f.batch(file).await, [malformed_record_id(file)]);
    assert_eq!(t.order("o-event-coord-3").await["stockStatus"], "RESERVED");
    let o = t.order("o-event-coord-4").await;
    assert_eq!(
        (o["status"].as_str(), o["cancelReason"].as_str()),
        (Some("CANCELLED"), Some("PAYMENT_DECLINED")),
        "{o}"
    );

    // Nothing was reserved for the cancelled orders, so there is nothing to release.
    assert_eq!(messages(&t, "StockQueue").await, Vec::<Value>::new());
    assert_eq!(messages(&t, "PaymentQueue").await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_sweeper_binary_gets_its_schedule_should_hand_over_exactly_the_stale_pending_orders()
 {
    let t = TestStack::start_paused().await;
    let now = now_ms();
    let hour_ago = now - 3_600_000;
    seed_order(
        &t,
        order("o-event-sweep-1", "PENDING", "PENDING", None, hour_ago),
    )
    .await;
    seed_order(
        &t,
        order("o-event-sweep-2", "RESERVED", "PENDING", None, hour_ago),
    )
    .await;
    // Too recent to time out.
    seed_order(
        &t,
        order("o-event-sweep-3", "PENDING", "PENDING", None, now),
    )
    .await;
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
    seed_order(&t, confirmed).await;
    let mut f = Function::start(&t, "SweeperFunction").await;

    let summary = f.invoke("scheduled-sweep.json").await;
    assert_eq!(summary["timedOut"], 2, "{summary}");
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
        messages(&t, "CoordinatorQueue").await,
        [
            json!({"type": "OrderTimedOut", "orderId": "o-event-sweep-1", "cutoffMs": cutoff}),
            json!({"type": "OrderTimedOut", "orderId": "o-event-sweep-2", "cutoffMs": cutoff}),
        ]
    );
    t.stop().await;
}

/// `sam build`: every function of the template gets an arm64 Linux `bootstrap` (an ELF
/// executable for AArch64). About 4 minutes on 2 cores from nothing; seconds when Cargo finds
/// everything fresh.
#[test]
fn when_sam_builds_the_template_should_produce_an_arm64_bootstrap_for_every_function() {
    for tool in ["sam", "cargo-lambda"] {
        assert!(
            venv_bin().join(tool).exists(),
            "{tool} is missing from .venv: run `make setup-tools` (infra/scripts/setup.sh tools)"
        );
    }
    let out = std::process::Command::new(venv_bin().join("sam"))
        .arg("build")
        .current_dir(repo())
        .env("PATH", path_with_venv())
        .env("SAM_CLI_TELEMETRY", "0")
        .output()
        .expect("run sam build");
    assert!(
        out.status.success(),
        "sam build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let template = local_runner::template::Template::from_file(repo().join("template.yaml"))
        .expect("template.yaml");
    assert!(!template.functions.is_empty());
    for f in &template.functions {
        assert_eq!(f.architectures, ["arm64"], "{}", f.logical_id);
        let path = repo()
            .join(".aws-sam/build")
            .join(&f.logical_id)
            .join("bootstrap");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // ELF, 64-bit, little-endian, e_machine (offset 18) = EM_AARCH64 (183).
        assert_eq!(
            &bytes[..4],
            b"\x7fELF",
            "{} is not an ELF file",
            path.display()
        );
        assert_eq!(
            (bytes[4], bytes[5]),
            (2, 1),
            "{}: not 64-bit little-endian",
            path.display()
        );
        assert_eq!(
            u16::from_le_bytes([bytes[18], bytes[19]]),
            183,
            "{} is not built for AArch64",
            path.display()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", path.display());
    }
}
