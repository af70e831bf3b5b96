//! Kill: the `saga-local` runner is SIGKILLed while ~100 orders are being placed and processed,
//! then started again on the same prefix and port. Nothing is shut down cleanly: requests die
//! mid-flight, messages are left in flight, idempotency claims are left IN_PROGRESS. Clients
//! whose POST died retry with the same Idempotency-Key; the restarted runner finishes every
//! order, and the saga's invariants hold against the stores.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use saga_tests::{Pacer, TestStack, assert_invariants, repo_root};
use serde_json::{Value, json};

const ORDERS: usize = 100;
const CONCURRENCY: usize = 20;
/// Accepted orders after which the runner is killed.
const KILL_AFTER: usize = 35;
const NATURAL_SETTLE: Duration = Duration::from_secs(40);
/// No order settling for this long means something is stuck for good.
const STALL_LIMIT: Duration = Duration::from_secs(240);
/// Placement waits while the work queues hold this many messages (see [`Pacer`]).
const BACKLOG_BOUND: i64 = 150;
/// Generous bounds for what a slow machine may take.
const ACCEPT_WITHIN: Duration = Duration::from_secs(300);
const READY_WITHIN: Duration = Duration::from_secs(120);

/// The runner as a child process; killed (SIGKILL) when dropped, whatever happened.
struct Runner {
    child: Child,
}

impl Runner {
    fn start(bin: &Path, prefix: &str, port: u16, log: &Path) -> Runner {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("runner log");
        let child = Command::new(bin)
            .args(["run", "--port", &port.to_string(), "--no-seed"])
            .current_dir(repo_root())
            .env("SAGA_PREFIX", prefix)
            .env("SAGA_VISIBILITY_TIMEOUT", "2")
            .env("PAYMENT_FAILURE_RATE", "0.2")
            .env("RUST_LOG", "info")
            .env_remove("SAGA_FAULTS")
            .env_remove("SAGA_DUPLICATE_RATE")
            .env_remove("SAGA_SWEEP_SECONDS")
            .env_remove("ORDER_TIMEOUT_SECONDS")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start saga-local");
        Runner { child }
    }

    /// SIGKILL: no clean-up of any kind.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A plain HTTP client that reports a dead server as an error rather than panicking. It
/// sends a customer's token, or an operator's for `PUT`.
#[derive(Clone)]
struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    customer: String,
    operator: String,
}

impl Http {
    fn new(port: u16, customer: String, operator: String) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            customer,
            operator,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", "application/json");
        let token = if method == "PUT" {
            &self.operator
        } else {
            &self.customer
        };
        req = req.header("authorization", format!("Bearer {token}"));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req.body(Full::new(Bytes::from(bytes))).expect("request");
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    async fn wait_ready(&self, runner: &mut Runner) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok((404, _)) = self.call("GET", "/products/not-there", None, None).await {
                return;
            }
            if let Ok(Some(status)) = runner.child.try_wait() {
                panic!("saga-local exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "saga-local did not answer within {READY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[derive(Default, Debug)]
struct Placement {
    accepted: AtomicUsize,
    attempts: AtomicUsize,
    connection_errors: AtomicUsize,
    in_progress: AtomicUsize,
    server_errors: AtomicUsize,
    /// Orders whose first POST got no 202: the client did not know whether they existed.
    in_doubt: AtomicUsize,
}

/// POSTs one order with an Idempotency-Key until it is accepted (through the kill and the
/// restart). Returns every order id an answer named.
async fn place_until_accepted(
    http: &Http,
    pacer: &Pacer<'_>,
    body: Value,
    p: &Placement,
) -> HashSet<String> {
    pacer.admit().await;
    let key = uuid::Uuid::new_v4().to_string();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + ACCEPT_WITHIN;
    let mut first = true;
    loop {
        p.attempts.fetch_add(1, Ordering::Relaxed);
        match http.call("POST", "/orders", Some(&body), Some(&key)).await {
            Ok((status, answer)) => {
                if let Some(id) = answer["orderId"].as_str() {
                    ids.insert(id.to_string());
                }
                match status {
                    202 => {
                        p.accepted.fetch_add(1, Ordering::Relaxed);
                        return ids;
                    }
                    409 => p.in_progress.fetch_add(1, Ordering::Relaxed),
                    500 | 502 | 503 => p.server_errors.fetch_add(1, Ordering::Relaxed),
                    other => panic!("placing an order answered {other}: {answer}"),
                };
            }
            Err(_) => {
                p.connection_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if first {
            first = false;
            p.in_doubt.fetch_add(1, Ordering::Relaxed);
        }
        assert!(
            Instant::now() < deadline,
            "key {key} got no 202 within {ACCEPT_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_runner_is_killed_mid_saga_and_restarted_should_finish_every_order_and_keep_every_invariant()
 {
    saga_tests::services().await;
    let bin = saga_tests::saga_local_binary();
    let prefix = format!("k{}-", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // A reader on the same prefix: consumers paused, so only the child processes messages. It
    // provisions the tables and queues first (provisioning is idempotent); its sweeper runs
    // only when called, with a short cut-off for stragglers.
    let reader = TestStack::start_with(|o| {
        o.prefix = prefix.clone();
        o.paused = vec![
            "StockFunction".into(),
            "PaymentFunction".into(),
            "CoordinatorFunction".into(),
        ];
        o.env_overrides
            .insert("ORDER_TIMEOUT_SECONDS".into(), "20".into());
    })
    .await;

    let port = free_port();
    let logs = [1, 2].map(|n| std::env::temp_dir().join(format!("saga-kill-{prefix}{n}.log")));
    let mut runner = Runner::start(&bin, &prefix, port, &logs[0]);
    // The runner verifies tokens of the pool the reader provisioned on the same prefix.
    let http = Http::new(
        port,
        reader.token(saga_tests::CUSTOMER, false).await,
        reader.token(saga_tests::OPERATOR, true).await,
    );
    http.wait_ready(&mut runner).await;

    let products = saga_tests::catalogue("p-kill", 4, 20, 10);
    for (id, qty) in &products {
        let (status, body) = http
            .call(
                "PUT",
                &format!("/products/{id}"),
                Some(&json!({"name": id, "priceCents": 300, "quantity": qty})),
                None,
            )
            .await
            .expect("put product");
        assert_eq!(status, 201, "{body}");
    }
    let initial: HashMap<String, i64> = products.iter().cloned().collect();

    let placement = Arc::new(Placement::default());
    let started = Instant::now();
    let bodies: Vec<Value> = (0..ORDERS)
        .map(|_| saga_tests::order_request(&saga_tests::random_basket(&products)))
        .collect();
    let pacer = Pacer::new(&reader, BACKLOG_BOUND);
    let placing = {
        use futures::StreamExt;
        let (http, pacer, p) = (&http, &pacer, &placement);
        futures::stream::iter(bodies)
            .map(|body| place_until_accepted(http, pacer, body, p))
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
    };

    // Kill it in the middle: requests in flight, messages being processed.
    let kill_and_restart = async {
        let deadline = Instant::now() + ACCEPT_WITHIN;
        while placement.accepted.load(Ordering::Relaxed) < KILL_AFTER {
            assert!(
                Instant::now() < deadline,
                "fewer than {KILL_AFTER} orders accepted within {ACCEPT_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ...and once the coordinator is at work too, so that every consumer has work in
        // flight (if it takes long, the kill comes anyway: what it interrupts varies).
        let deadline = Instant::now() + Duration::from_secs(15);
        while count_lines(&logs[0], "order confirmed") < 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        runner.kill();
        let accepted_at_kill = placement.accepted.load(Ordering::Relaxed);
        let killed_at = started.elapsed();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let mut runner = Runner::start(&bin, &prefix, port, &logs[1]);
        http.wait_ready(&mut runner).await;
        (runner, accepted_at_kill, killed_at)
    };
    let (answers, (mut runner, accepted_at_kill, killed_at)) =
        tokio::join!(placing, kill_and_restart);
    let placed_in = started.elapsed();
    for ids in &answers {
        assert_eq!(ids.len(), 1, "one key named several orders: {ids:?}");
    }
    let ids: Vec<String> = answers.iter().flat_map(|s| s.iter().cloned()).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ORDERS);

    // Settle; redrive dead letters and sweep stragglers if the saga does not settle alone;
    // then let every message still around be processed before checking.
    let recovery = reader
        .settle_with_recovery(&ids, "kill", NATURAL_SETTLE, STALL_LIMIT)
        .await;
    let settled_in = started.elapsed();

    assert_eq!(
        reader.all_orders().await.len(),
        ORDERS,
        "the table holds orders no answer named"
    );
    let orders = reader.wait_all_settled(&ids, Duration::from_secs(10)).await;
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    let reason = |r: &str| orders.iter().filter(|o| o["cancelReason"] == r).count();
    let count = |needle: &str| logs.iter().map(|l| count_lines(l, needle)).sum::<usize>();
    eprintln!(
        "kill: killed at {killed_at:?} with {accepted_at_kill} of {ORDERS} accepted; all placed \
         after {placed_in:?}, settled after {settled_in:?}: {confirmed} confirmed, {} declined, \
         {} short of stock, {} timed out; placement: {placement:?}; runner logs: {} API takeovers, \
         {} steps replayed, {} transient record failures, {} permanent record failures, \
         {} invocations timed out; dead letters redriven: {}; swept: {}; logs: {}",
        reason("PAYMENT_DECLINED"),
        reason("INSUFFICIENT_STOCK"),
        reason("TIMEOUT"),
        count("taking over an abandoned request"),
        count("step already done"),
        count("transient failure"),
        count("message cannot be processed"),
        count("function timed out"),
        recovery.redriven,
        recovery.swept,
        logs.iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    let before_kill = |needle: &str| count_lines(&logs[0], needle);
    eprintln!(
        "kill: the first runner had logged {} orders placed, {} reservations, {} charges, \
         {} confirmations when it was killed",
        before_kill("order placed"),
        before_kill("stock reserved"),
        before_kill("\"charge\""),
        before_kill("order confirmed"),
    );
    assert!(confirmed > 0, "nothing confirmed");
    assert_invariants(&reader, &orders, &initial).await;

    runner.kill();
    reader.stop().await;
    // The logs are left in the temp dir for a look at what the kill interrupted.
}
