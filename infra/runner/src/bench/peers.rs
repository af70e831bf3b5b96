//! One function, side by side: the stock function and its peers (Node.js with SDK v3, Python
//! with boto3, Python with Powertools' idempotency utility) each run as a process on a
//! [`FakeRuntimeApi`], against the same DynamoDB Local tables and moto queue, rounds
//! interleaved (round r starts with runtime r mod n) so that a noisy neighbour hits every
//! runtime alike.
//!
//! Per start of a runtime: init (process start -> first `GET .../invocation/next`), the first
//! event's duration, `warm` more events' durations, and the process's peak RSS (`VmHWM`) after
//! them. Every event is a fresh ReserveStock of two lines; every answer must carry no
//! `batchItemFailures`, and at the end the products' stock must have gone down by exactly the
//! number of events, so each runtime is seen doing the work.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue as A;
use serde::{Deserialize, Serialize};

use super::runtime_api::FakeRuntimeApi;
use super::{Machine, stats};
use crate::provision;
use crate::stack::local_clients;
use crate::template::Template;

/// Stock each benchmark product starts with (never runs out).
const START_STOCK: i64 = 10_000_000;
const PRODUCTS: [&str; 2] = ["p-bench-1", "p-bench-2"];
const INIT_TIMEOUT: Duration = Duration::from_secs(60);
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start one runtime.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Short name used in the report (`rust`, `node`, `python-boto3`, `python-powertools`).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// Extra environment on top of what every runtime gets.
    pub env: Vec<(String, String)>,
}

/// The runtimes `make bench` compares.
pub const BUILTIN: [&str; 4] = ["rust", "node", "python-boto3", "python-powertools"];

impl Runtime {
    /// A built-in runtime by name: `rust` is the stock binary; the peers live in `peers_dir`
    /// (`bench/peers`) as `bench/peers/install.sh` installs them.
    pub fn builtin(name: &str, stock_binary: &Path, peers_dir: &Path) -> Option<Self> {
        let python = peers_dir.join(".venv/bin/python");
        let ric = |dir: &str| Runtime {
            name: name.into(),
            program: python.clone(),
            args: vec![
                "-m".into(),
                "awslambdaric".into(),
                "handler.lambda_handler".into(),
            ],
            cwd: peers_dir.join(dir),
            env: vec![
                ("_HANDLER".into(), "handler.lambda_handler".into()),
                ("AWS_EXECUTION_ENV".into(), "AWS_Lambda_python3.11".into()),
            ],
        };
        Some(match name {
            "rust" => Self::rust(name, stock_binary),
            "node" => Runtime {
                name: name.into(),
                program: "node".into(),
                args: vec!["runtime.mjs".into()],
                cwd: peers_dir.join("node"),
                env: vec![
                    ("_HANDLER".into(), "index.handler".into()),
                    ("AWS_EXECUTION_ENV".into(), "AWS_Lambda_nodejs20.x".into()),
                    ("NODE_ENV".into(), "production".into()),
                ],
            },
            "python-boto3" => ric("python-boto3"),
            "python-powertools" => ric("python-powertools"),
            _ => return None,
        })
    }

    /// The stock function's binary, with the template's log level.
    pub fn rust(name: &str, stock_binary: &Path) -> Self {
        Runtime {
            name: name.into(),
            program: stock_binary.to_path_buf(),
            args: Vec::new(),
            cwd: stock_binary
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            env: vec![("RUST_LOG".into(), "info".into())],
        }
    }

    pub fn command_line(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What was measured for one runtime, every sample kept.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuntimeSamples {
    pub name: String,
    /// How the process was started (in its folder).
    pub command: String,
    pub cwd: String,
    pub init_ms: Vec<f64>,
    pub first_ms: Vec<f64>,
    pub warm_ms: Vec<f64>,
    pub peak_rss_kib: Vec<u64>,
}

/// The whole side-by-side run, as written to `peers.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeersRun {
    /// The command that measured it.
    pub command: String,
    pub machine: Machine,
    pub rounds: usize,
    pub warm_per_round: usize,
    pub seconds: f64,
    pub runtimes: Vec<RuntimeSamples>,
}

pub struct PeersOptions {
    pub repo_root: PathBuf,
    pub runtimes: Vec<Runtime>,
    pub rounds: usize,
    pub warm: usize,
    pub dynamodb_endpoint: String,
    pub sqs_endpoint: String,
    /// Each process's stdout and stderr go to `logs_dir/<runtime>-<round>.log`.
    pub logs_dir: PathBuf,
    pub command: String,
    /// Print a line per round.
    pub progress: bool,
}

struct Target {
    products_table: String,
    idempotency_table: String,
    coordinator_queue_url: String,
}

/// Runs the comparison. Creates its own tables and queues (a unique prefix) and deletes them
/// afterwards, whatever happens.
pub async fn measure(opts: &PeersOptions) -> Result<PeersRun, String> {
    let started = Instant::now();
    let template = Template::from_file(opts.repo_root.join("template.yaml"))
        .map_err(|e| format!("template.yaml: {e}"))?;
    let clients = local_clients(&opts.dynamodb_endpoint, &opts.sqs_endpoint, "us-east-1").await;
    let prefix = format!(
        "benchpeers{}-",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let names = provision::provision(&template, &prefix, &clients.dynamodb, &clients.sqs)
        .await
        .map_err(|e| format!("provisioning {prefix}*: {e}"))?;
    let result = async {
        let lookup = |m: &std::collections::BTreeMap<String, String>, k: &str| {
            m.get(k)
                .cloned()
                .ok_or_else(|| format!("template.yaml has no {k}"))
        };
        let target = Target {
            products_table: lookup(&names.tables, "ProductsTable")?,
            idempotency_table: lookup(&names.tables, "IdempotencyTable")?,
            coordinator_queue_url: lookup(&names.queue_urls, "CoordinatorQueue")?,
        };
        for p in PRODUCTS {
            clients
                .dynamodb
                .put_item()
                .table_name(&target.products_table)
                .item("productId", A::S(p.into()))
                .item("name", A::S(p.into()))
                .item("priceCents", A::N("100".into()))
                .item("quantity", A::N(START_STOCK.to_string()))
                .send()
                .await
                .map_err(|e| format!("seeding {p}: {e:?}"))?;
        }
        // The emulators' own warm-up (a new table's first transactions, a new queue's first
        // sends) is paid here, by the harness, not by whichever runtime comes first.
        warm_up_emulators(&clients, &target).await?;
        std::fs::create_dir_all(&opts.logs_dir)
            .map_err(|e| format!("{}: {e}", opts.logs_dir.display()))?;
        let mut samples: Vec<RuntimeSamples> = opts
            .runtimes
            .iter()
            .map(|r| RuntimeSamples {
                name: r.name.clone(),
                command: relative(&r.command_line(), &opts.repo_root),
                cwd: relative(&r.cwd.display().to_string(), &opts.repo_root),
                ..Default::default()
            })
            .collect();
        let n = opts.runtimes.len();
        for round in 0..opts.rounds {
            let mut line = format!("  round {}/{}:", round + 1, opts.rounds);
            for k in 0..n {
                let i = (round + k) % n;
                let runtime = &opts.runtimes[i];
                let one = run_once(runtime, round, opts, &target).await?;
                line.push_str(&format!(
                    " {} init {:.1} ms, warm p50 {:.1} ms;",
                    runtime.name,
                    one.init_ms,
                    stats::percentile(&one.warm_ms, 0.5)
                ));
                let s = &mut samples[i];
                s.init_ms.push(one.init_ms);
                s.first_ms.push(one.first_ms);
                s.warm_ms.extend(one.warm_ms);
                s.peak_rss_kib.push(one.peak_rss_kib);
            }
            if opts.progress {
                println!("{}", line.trim_end_matches(';'));
            }
        }
        // Every event took one unit of each product, in every runtime.
        let events = (opts.rounds * (opts.warm + 1) * n) as i64;
        for p in PRODUCTS {
            let item = clients
                .dynamodb
                .get_item()
                .table_name(&target.products_table)
                .key("productId", A::S(p.into()))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| format!("reading {p}: {e:?}"))?;
            let left: i64 = item
                .item
                .as_ref()
                .and_then(|i| i.get("quantity"))
                .and_then(|q| q.as_n().ok())
                .and_then(|q| q.parse().ok())
                .unwrap_or(-1);
            if left != START_STOCK - events {
                return Err(format!(
                    "{p}: {left} left after {events} reservations of one unit from {START_STOCK}: a runtime did not do the work"
                ));
            }
        }
        Ok(samples)
    }
    .await;
    let _ = provision::delete_prefixed(&template, &prefix, &clients.dynamodb, &clients.sqs).await;
    Ok(PeersRun {
        command: opts.command.clone(),
        machine: Machine::describe(&opts.repo_root),
        rounds: opts.rounds,
        warm_per_round: opts.warm,
        seconds: started.elapsed().as_secs_f64(),
        runtimes: result?,
    })
}

/// Warm-up: transactions of the same shape on a product of their own, and sends to the queue.
async fn warm_up_emulators(
    clients: &saga_core::aws::AwsClients,
    target: &Target,
) -> Result<(), String> {
    use aws_sdk_dynamodb::types::{Put, TransactWriteItem, Update};
    let product = "p-bench-warm-up";
    clients
        .dynamodb
        .put_item()
        .table_name(&target.products_table)
        .item("productId", A::S(product.into()))
        .item("quantity", A::N(START_STOCK.to_string()))
        .send()
        .await
        .map_err(|e| format!("warm-up: {e:?}"))?;
    for i in 0..20 {
        let record = Put::builder()
            .table_name(&target.idempotency_table)
            .item(
                "id",
                A::S(format!(
                    "warm-up-{i}-{}#reserve",
                    uuid::Uuid::new_v4().simple()
                )),
            )
            .item("status", A::S("COMPLETED".into()))
            .condition_expression("attribute_not_exists(id)")
            .build()
            .map_err(|e| e.to_string())?;
        let update = Update::builder()
            .table_name(&target.products_table)
            .key("productId", A::S(product.into()))
            .update_expression("SET quantity = quantity - :n")
            .condition_expression("quantity >= :n")
            .expression_attribute_values(":n", A::N("1".into()))
            .build()
            .map_err(|e| e.to_string())?;
        clients
            .dynamodb
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(record).build())
            .transact_items(TransactWriteItem::builder().update(update).build())
            .send()
            .await
            .map_err(|e| format!("warm-up transaction: {e:?}"))?;
        clients
            .sqs
            .send_message()
            .queue_url(&target.coordinator_queue_url)
            .message_body(r#"{"type":"StockReserved","orderId":"warm-up"}"#)
            .send()
            .await
            .map_err(|e| format!("warm-up send: {e:?}"))?;
    }
    Ok(())
}

struct OneStart {
    init_ms: f64,
    first_ms: f64,
    warm_ms: Vec<f64>,
    peak_rss_kib: u64,
}

/// A ReserveStock command as the stock queue's event source mapping delivers it.
pub fn reserve_event(order_id: &str) -> String {
    let body = serde_json::json!({
        "type": "ReserveStock",
        "orderId": order_id,
        "items": PRODUCTS.iter().map(|p| serde_json::json!({"productId": p, "quantity": 1})).collect::<Vec<_>>(),
    })
    .to_string();
    serde_json::json!({"Records": [{
        "messageId": format!("m-{order_id}"),
        "receiptHandle": "bench",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1767225600000",
            "SenderId": "AROA2EXAMPLEROLEID:bench",
            "ApproximateFirstReceiveTimestamp": "1767225601000"
        },
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:StockQueue",
        "awsRegion": "us-east-1"
    }]})
    .to_string()
}

async fn run_once(
    runtime: &Runtime,
    round: usize,
    opts: &PeersOptions,
    target: &Target,
) -> Result<OneStart, String> {
    let mut api = FakeRuntimeApi::start()
        .await
        .map_err(|e| format!("runtime API: {e}"))?;
    let log_path = opts.logs_dir.join(format!("{}-{round}.log", runtime.name));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(&runtime.program);
    cmd.args(&runtime.args)
        .current_dir(&runtime.cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true);
    for k in ["PATH", "HOME", "LANG", "TZ"] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
    let memory = "128";
    for (k, v) in [
        ("AWS_LAMBDA_RUNTIME_API", api.addr.to_string().as_str()),
        ("AWS_LAMBDA_FUNCTION_NAME", "stock-bench"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/stock-bench"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "bench"),
        ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
        ("LAMBDA_TASK_ROOT", &runtime.cwd.display().to_string()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        // Letters and digits only: DynamoDB Local refuses others.
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_SESSION_TOKEN", "bench"),
        // As in Lambda: no shared config or credentials files.
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
        ("AWS_ENDPOINT_URL_DYNAMODB", &opts.dynamodb_endpoint),
        ("AWS_ENDPOINT_URL_SQS", &opts.sqs_endpoint),
        ("PRODUCTS_TABLE", &target.products_table),
        ("IDEMPOTENCY_TABLE", &target.idempotency_table),
        ("COORDINATOR_QUEUE_URL", &target.coordinator_queue_url),
    ] {
        cmd.env(k, v);
    }
    cmd.envs(runtime.env.iter().map(|(k, v)| (k, v)));
    let fail = |what: String| {
        format!(
            "{} (round {}): {what}; its output is in {}",
            runtime.name,
            round + 1,
            log_path.display()
        )
    };
    let spawned = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", runtime.command_line())))?;
    let pid = child.id().unwrap_or_default();
    let first = tokio::select! {
        at = api.first_next() => at.ok_or_else(|| fail("init error reported to /init/error".into()))?,
        status = child.wait() => return Err(fail(format!("exited before asking for an event: {status:?}"))),
        _ = tokio::time::sleep(INIT_TIMEOUT) => return Err(fail("never asked for an event".into())),
    };
    let init_ms = ms(first.saturating_duration_since(spawned));
    let mut durations = Vec::with_capacity(opts.warm + 1);
    for i in 0..=opts.warm {
        let order = format!(
            "o-{}-{round}-{i}-{}",
            runtime.name,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let done = tokio::select! {
            done = api.invoke(reserve_event(&order)) => done.ok_or_else(|| fail("runtime API closed".into()))?,
            status = child.wait() => return Err(fail(format!("exited during event {i}: {status:?}"))),
            _ = tokio::time::sleep(EVENT_TIMEOUT) => return Err(fail(format!("no answer to event {i}"))),
        };
        let answer: serde_json::Value = serde_json::from_str(&done.body).unwrap_or_default();
        let failures = answer["batchItemFailures"].as_array().map(Vec::len);
        if !done.ok || failures != Some(0) {
            return Err(fail(format!("event {i} answered {}", done.body)));
        }
        durations.push(ms(done.duration));
    }
    let peak_rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(OneStart {
        init_ms,
        first_ms: durations[0],
        warm_ms: durations[1..].to_vec(),
        peak_rss_kib,
    })
}

/// `text` with the repository's path made relative (the report is committed).
fn relative(text: &str, root: &Path) -> String {
    let root = root.display().to_string();
    let root = root.trim_end_matches('/');
    text.replace(&format!("{root}/"), "").replace(root, ".")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The process's peak resident set (`VmHWM` in `/proc/PID/status`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
