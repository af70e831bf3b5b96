//! `saga-bench`: measures the design budgets (run by `make bench`).
//!
//! ```text
//! saga-bench cold-start [--runs N] [--json F] BINARY...   process start -> first GET .../invocation/next
//! saga-bench sizes [--json F] FUNCTION...                 the arm64 artifacts' sizes
//! saga-bench calls [--json F]                             AWS calls made for one confirmed order
//! saga-bench peers [--rounds N] [--warm N] ...            the stock function beside its Node.js and Python peers
//! saga-bench load [--rates 5,10,25,...] [--seconds 20] ... the whole saga under open-loop load, and the emulators' ceiling
//! saga-bench report [--dir D] [--no-budgets]              report.md and its plots; every budget checked
//! ```
//! Each measurement can write its samples as JSON (with the command that made them) for the
//! report. Exits non-zero when a budget is missed, naming it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use local_runner::bench::load::{self, LoadOptions};
use local_runner::bench::peers::{self, PeersOptions, Runtime};
use local_runner::bench::report::{
    self, CallsRun, ColdStartRun, FunctionColdStart, OrderCalls, SizesRun,
};
use local_runner::counting::{Call, CallCounter};
use local_runner::services::{self, ServiceOptions};
use local_runner::stack::{Stack, StackOptions, local_clients};

const COLD_START_BUDGET_MS: f64 = report::COLD_START_BUDGET_MS;

/// Measures the design budgets (`make bench` runs it); exits non-zero when one is exceeded.
#[derive(Parser, Debug)]
#[command(name = "saga-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Process start -> first GET .../invocation/next of each Lambda binary (budget: a median
    /// of 10 ms)
    ColdStart {
        /// Starts per binary
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Also write the samples here (for `report`)
        #[arg(long)]
        json: Option<PathBuf>,
        /// The functions' release binaries
        binaries: Vec<String>,
    },
    /// Sizes of the arm64 artifacts (`ARTIFACTS/NAME/bootstrap`; budget 5 MB) and, for
    /// reference, of the host's release binaries (`HOST/NAME`)
    Sizes {
        #[arg(long, default_value = "target/lambda")]
        artifacts: PathBuf,
        #[arg(long, default_value = "target/release")]
        host: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
        /// The functions
        functions: Vec<String>,
    },
    /// AWS calls made for one confirmed order, against the local stack (run from the
    /// repository)
    Calls {
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The stock function beside its peers (bench/peers), on a fake Runtime API, against the
    /// local DynamoDB Local and moto (run from the repository)
    Peers {
        /// The stock function's binary
        #[arg(long, default_value = "target/release/stock")]
        stock: PathBuf,
        #[arg(long, default_value = "bench/peers")]
        peers_dir: PathBuf,
        /// Which runtimes, in order: rust, node, python-boto3, python-powertools
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "rust,node,python-boto3,python-powertools"
        )]
        runtimes: Vec<String>,
        /// Starts of each runtime (interleaved)
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Warm events after each start's first
        #[arg(long, default_value_t = 25)]
        warm: usize,
        #[arg(long, default_value = "target/bench/peers.json")]
        json: PathBuf,
        /// Each process's output goes here
        #[arg(long, default_value = "target/bench/logs")]
        logs: PathBuf,
    },
    /// The whole saga under open-loop load against the stack of `make run` (run from the
    /// repository): the emulators' ceiling, rate steps until the stack saturates, and
    /// batching window settings side by side
    Load {
        /// Offered rates, orders per second, stepped up in order until one saturates
        #[arg(long, value_delimiter = ',', default_value = "5,10,25,50,100,200,400")]
        rates: Vec<f64>,
        /// Seconds each rate is offered
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Batching windows to compare, seconds (`template` for the template's setting)
        #[arg(long, value_delimiter = ',', default_value = "0,template")]
        windows: Vec<String>,
        /// Rates at which the batching windows are compared
        #[arg(long, value_delimiter = ',', default_value = "5,10")]
        window_rates: Vec<f64>,
        /// Seconds each rate is offered in the batching comparison
        #[arg(long, default_value_t = 10.0)]
        window_seconds: f64,
        /// Concurrency of the emulators' client loops (the best is their ceiling)
        #[arg(long, value_delimiter = ',', default_value = "4,16")]
        ceiling_concurrency: Vec<usize>,
        /// Seconds of each client loop
        #[arg(long, default_value_t = 4.0)]
        ceiling_seconds: f64,
        /// Products in the catalogue
        #[arg(long, default_value_t = 20)]
        products: usize,
        /// Lines (distinct products, one unit each) per order
        #[arg(long, default_value_t = 2)]
        lines: usize,
        /// The payment simulator's random decline rate (`make run`'s default)
        #[arg(long, default_value_t = 0.1)]
        payment_failure_rate: f64,
        /// Seconds of warm-up on every new stack (5 orders/s, not counted)
        #[arg(long, default_value_t = 2.0)]
        warm_up_seconds: f64,
        #[arg(long, default_value = "target/bench/load.json")]
        json: PathBuf,
    },
    /// Writes DIR/report.md and its plots from the JSON files in DIR, and checks every budget
    Report {
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Write the report from what is there without checking the budgets
        #[arg(long)]
        no_budgets: bool,
    },
}

/// The command line that ran, for the report.
fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|p| {
            let cwd = std::env::current_dir().unwrap_or_default();
            Path::new(&p)
                .strip_prefix(&cwd)
                .map(|r| r.display().to_string())
                .unwrap_or(p)
        })
        .unwrap_or_default();
    std::iter::once(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> bool {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        path,
        serde_json::to_string_pretty(value).expect("serializable"),
    ) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            false
        }
    }
}

fn main() -> ExitCode {
    let ok = match Cli::parse().command {
        Cmd::ColdStart {
            runs,
            json,
            binaries,
        } => cold_start(runs, &binaries, json.as_deref()),
        Cmd::Sizes {
            artifacts,
            host,
            json,
            functions,
        } => sizes(&artifacts, &host, &functions, json.as_deref()),
        Cmd::Calls { json } => tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(calls(json.as_deref())),
        Cmd::Peers {
            stock,
            peers_dir,
            runtimes,
            rounds,
            warm,
            json,
            logs,
        } => tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(run_peers(
                stock, peers_dir, runtimes, rounds, warm, json, logs,
            )),
        Cmd::Load {
            rates,
            seconds,
            windows,
            window_rates,
            window_seconds,
            ceiling_concurrency,
            ceiling_seconds,
            products,
            lines,
            payment_failure_rate,
            warm_up_seconds,
            json,
        } => {
            let windows: Result<Vec<Option<u32>>, _> = windows
                .iter()
                .map(|w| match w.as_str() {
                    "template" => Ok(None),
                    n => n.parse().map(Some),
                })
                .collect();
            match windows {
                Ok(windows) => tokio::runtime::Runtime::new()
                    .expect("runtime")
                    .block_on(run_load(
                        LoadOptions {
                            repo_root: std::env::current_dir().expect("cwd"),
                            dynamodb_endpoint: String::new(),
                            sqs_endpoint: String::new(),
                            rates,
                            step_seconds: seconds,
                            windows,
                            window_rates,
                            window_seconds,
                            ceiling_concurrency,
                            ceiling_seconds,
                            products,
                            lines,
                            payment_failure_rate,
                            warm_up_seconds,
                            command: command_line(),
                            progress: true,
                        },
                        json,
                    )),
                Err(e) => {
                    eprintln!("--windows: {e} (whole seconds, or `template`)");
                    false
                }
            }
        }
        Cmd::Report { dir, no_budgets } => write_report(&dir, !no_budgets),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The configuration every function is started with (dummy values: nothing is called before
/// the first event). A test checks that each function's configuration loads from it, so a
/// variable a function starts to require cannot make a benchmark hang or fail later.
const FUNCTION_ENV: &[(&str, &str)] = &[
    ("ORDERS_TABLE", "OrdersTable"),
    ("ORDERS_PENDING_INDEX", "PendingOrdersIndex"),
    ("ORDERS_CUSTOMER_INDEX", "CustomerOrdersIndex"),
    ("PRODUCTS_TABLE", "ProductsTable"),
    ("STOCK_MOVEMENTS_TABLE", "StockMovementsTable"),
    ("IDEMPOTENCY_TABLE", "IdempotencyTable"),
    ("PAYMENT_LEDGER_TABLE", "PaymentLedgerTable"),
    ("STOCK_QUEUE_URL", "http://127.0.0.1:9/q"),
    ("PAYMENT_QUEUE_URL", "http://127.0.0.1:9/q"),
    ("COORDINATOR_QUEUE_URL", "http://127.0.0.1:9/q"),
    ("PAYMENT_FAILURE_RATE", "0"),
    ("ORDER_TIMEOUT_SECONDS", "300"),
    ("RUST_LOG", "warn"),
];

/// Environment a function needs to start: its configuration ([`FUNCTION_ENV`]) and what
/// Lambda sets.
fn lambda_env(cmd: &mut Command, name: &str, runtime_api: &str) {
    for (k, v) in [
        ("AWS_LAMBDA_RUNTIME_API", runtime_api),
        ("AWS_LAMBDA_FUNCTION_NAME", name),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/bench"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "bench"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_SESSION_TOKEN", "bench"),
    ]
    .iter()
    .chain(FUNCTION_ENV)
    {
        cmd.env(k, v);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn sizes(artifacts: &Path, host: &Path, functions: &[String], json: Option<&Path>) -> bool {
    let size = |p: PathBuf| {
        std::fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let mut run = SizesRun {
        command: command_line(),
        artifacts: Vec::new(),
        host: Vec::new(),
    };
    let mut ok = true;
    println!(
        "Lambda artifacts: arm64 bootstrap per function, as sam build makes them (budget {} bytes)",
        report::SIZE_BUDGET_BYTES
    );
    for f in functions {
        match size(artifacts.join(f).join("bootstrap")) {
            Ok(bytes) => {
                let verdict = if bytes <= report::SIZE_BUDGET_BYTES {
                    "ok"
                } else {
                    ok = false;
                    "OVER"
                };
                println!(
                    "  {f:<12} {bytes:>8} bytes  {:>5.2} MiB  {verdict}",
                    bytes as f64 / 1_048_576.0
                );
                run.artifacts.push((f.clone(), bytes));
            }
            Err(e) => {
                eprintln!("  {e}");
                ok = false;
            }
        }
    }
    println!(
        "for reference: the same binaries built for this machine, which the cold-start run uses"
    );
    for f in functions {
        if let Ok(bytes) = size(host.join(f)) {
            println!(
                "  {f:<12} {bytes:>8} bytes  {:>5.2} MiB",
                bytes as f64 / 1_048_576.0
            );
            run.host.push((f.clone(), bytes));
        }
    }
    if let Some(path) = json {
        ok &= write_json(path, &run);
    }
    ok
}

async fn run_peers(
    stock: PathBuf,
    peers_dir: PathBuf,
    names: Vec<String>,
    rounds: usize,
    warm: usize,
    json: PathBuf,
    logs: PathBuf,
) -> bool {
    let root = std::env::current_dir().expect("cwd");
    let mut runtimes = Vec::new();
    for name in &names {
        match Runtime::builtin(name, &root.join(&stock), &root.join(&peers_dir)) {
            Some(r) => runtimes.push(r),
            None => {
                eprintln!(
                    "unknown runtime {name}; known: {}",
                    peers::BUILTIN.join(", ")
                );
                return false;
            }
        }
    }
    let services = match services::ensure_services(&ServiceOptions::new(root.clone())).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return false;
        }
    };
    println!(
        "one function, side by side: {} rounds of {} (order rotating), each start given 1 + {warm} ReserveStock events",
        rounds,
        names.join(", ")
    );
    let opts = PeersOptions {
        repo_root: root.clone(),
        runtimes,
        rounds,
        warm,
        dynamodb_endpoint: services.dynamodb_endpoint(),
        sqs_endpoint: services.sqs_endpoint(),
        logs_dir: root.join(logs),
        command: command_line(),
        progress: true,
    };
    match peers::measure(&opts).await {
        Ok(run) => {
            for r in &run.runtimes {
                let s = report::Summary::of(r);
                println!(
                    "  {:<18} init {:>7.1} ms  first {:>6.1} ms  warm p50 {:>6.2} ms  p99 {:>6.2} ms  peak RSS {:>6.1} MiB",
                    s.name, s.init, s.first, s.warm_p50, s.warm_p99, s.rss_mib
                );
            }
            println!("  ({:.0} s)", run.seconds);
            write_json(&root.join(json), &run)
        }
        Err(e) => {
            eprintln!("side-by-side run failed: {e}");
            false
        }
    }
}

async fn run_load(mut opts: LoadOptions, json: PathBuf) -> bool {
    let services =
        match services::ensure_services(&ServiceOptions::new(opts.repo_root.clone())).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return false;
            }
        };
    opts.dynamodb_endpoint = services.dynamodb_endpoint();
    opts.sqs_endpoint = services.sqs_endpoint();
    match load::measure(&opts).await {
        Ok(run) => {
            println!(
                "  ({:.0} s; load average {} before, {} after)",
                run.seconds, run.load_before, run.load_after
            );
            write_json(&opts.repo_root.join(json), &run)
        }
        Err(e) => {
            eprintln!("load run failed: {e}");
            false
        }
    }
}

fn write_report(dir: &Path, check_budgets: bool) -> bool {
    let root = std::env::current_dir().expect("cwd");
    match report::write(dir, &root, check_budgets) {
        Ok(verdicts) => {
            println!("report: {}", dir.join("report.md").display());
            let missed: Vec<_> = verdicts.iter().filter(|v| !v.met).collect();
            for v in &verdicts {
                println!(
                    "  {:<6} {} ({})",
                    if v.met { "met" } else { "MISSED" },
                    v.budget,
                    v.measured
                );
            }
            if !missed.is_empty() {
                eprintln!(
                    "budgets missed: {}",
                    missed
                        .iter()
                        .map(|v| v.budget.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            missed.is_empty()
        }
        Err(e) => {
            eprintln!("writing the report into {}: {e}", dir.display());
            false
        }
    }
}

fn cold_start(runs: usize, binaries: &[String], json: Option<&Path>) -> bool {
    let mut ok = true;
    let mut run = ColdStartRun {
        command: command_line(),
        functions: Vec::new(),
    };
    println!(
        "cold start: process start -> first GET /2018-06-01/runtime/invocation/next ({runs} runs each; budget {COLD_START_BUDGET_MS} ms)"
    );
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8}",
        "function", "min ms", "median", "p95", "max"
    );
    for binary in binaries {
        let name = Path::new(binary)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let mut cmd = Command::new(binary);
            lambda_env(&mut cmd, &name, &addr);
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            let started = Instant::now();
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
            // A function that exits (a configuration it lacks, say) or never asks for an event
            // fails the run instead of leaving it waiting.
            let stream = match first_connection(&listener, &mut child, Duration::from_secs(30)) {
                Ok(stream) => stream,
                Err(why) => {
                    let _ = child.kill();
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                    }
                    let _ = child.wait();
                    eprintln!("{name}: {why}; its stderr: {}", stderr.trim());
                    ok = false;
                    samples.clear();
                    break;
                }
            };
            let mut line = String::new();
            BufReader::new(stream)
                .read_line(&mut line)
                .expect("request line");
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            assert!(
                line.contains("/runtime/invocation/next"),
                "unexpected first request: {line}"
            );
            let _ = child.kill();
            let _ = child.wait();
            samples.push(elapsed);
        }
        if samples.is_empty() {
            println!("{name:<14} failed: not measured");
            continue;
        }
        samples.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        let median = percentile(&samples, 0.5);
        println!(
            "{name:<14} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            samples[0],
            median,
            percentile(&samples, 0.95),
            samples[samples.len() - 1]
        );
        if median > COLD_START_BUDGET_MS {
            println!("  OVER BUDGET: median {median:.2} ms > {COLD_START_BUDGET_MS} ms");
            ok = false;
        }
        run.functions.push(FunctionColdStart {
            name,
            samples_ms: samples,
        });
    }
    if let Some(path) = json {
        ok &= write_json(path, &run);
    }
    ok
}

/// The first connection to `listener`, unless `child` exits first or `limit` passes.
fn first_connection(
    listener: &TcpListener,
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::net::TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accept: {e}")),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited before asking for an event ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("no request within {limit:?}"));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Operations the event source mapping performs on the function's behalf (Lambda's service,
/// not the function's code).
const MAPPING_OPS: &[&str] = &[
    "ReceiveMessage",
    "DeleteMessageBatch",
    "DeleteMessage",
    "ChangeMessageVisibility",
];
const WRITES: &[&str] = &[
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "TransactWriteItems",
    "BatchWriteItem",
];
const READS: &[&str] = &["GetItem", "Query", "Scan", "BatchGetItem"];
const SENDS: &[&str] = &["SendMessage", "SendMessageBatch"];

struct Tally {
    write_units: f64,
    read_units: f64,
    writes: usize,
    provider_writes: usize,
    batch_reads: usize,
    other_reads: usize,
    sends: usize,
    other: usize,
}

fn tally(calls: &[Call], ledger_table: &str) -> Tally {
    let mut t = Tally {
        write_units: 0.0,
        read_units: 0.0,
        writes: 0,
        provider_writes: 0,
        batch_reads: 0,
        other_reads: 0,
        sends: 0,
        other: 0,
    };
    for c in calls
        .iter()
        .filter(|c| !MAPPING_OPS.contains(&c.operation.as_str()))
    {
        let op = c.operation.as_str();
        let provider = c.tables.iter().any(|t| t == ledger_table);
        let items = c.items as f64;
        if !provider {
            match op {
                "TransactWriteItems" => t.write_units += 2.0 * items,
                "TransactGetItems" => t.read_units += 2.0 * items,
                _ if WRITES.contains(&op) => t.write_units += items,
                _ if READS.contains(&op) => t.read_units += items,
                _ => {}
            }
        }
        if WRITES.contains(&op) {
            if provider {
                t.provider_writes += 1;
            } else {
                t.writes += 1;
            }
        } else if op == "BatchGetItem" {
            t.batch_reads += 1;
        } else if READS.contains(&op) {
            t.other_reads += 1;
        } else if SENDS.contains(&op) {
            t.sends += 1;
        } else {
            t.other += 1;
        }
    }
    t
}

async fn calls(json: Option<&Path>) -> bool {
    let root = std::env::current_dir().expect("cwd");
    let services = match services::ensure_services(&ServiceOptions::new(root.clone())).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return false;
        }
    };
    let counter = CallCounter::default();
    let mut opts = StackOptions::new(&root);
    opts.prefix = format!("bench{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    opts.http_addr = ([127, 0, 0, 1], 0).into();
    opts.dynamodb_endpoint = services.dynamodb_endpoint();
    opts.sqs_endpoint = services.sqs_endpoint();
    opts.poll_wait_seconds = 1;
    opts.sweep_every = Some(Duration::ZERO);
    opts.env_overrides
        .insert("PAYMENT_FAILURE_RATE".into(), "0".into());
    opts.call_counter = Some(counter.clone());
    let stack = Stack::start(opts.clone()).await.expect("stack starts");
    // The benchmark's own reads go through clients that are not counted.
    let reader = local_clients(&opts.dynamodb_endpoint, &opts.sqs_endpoint, &opts.region).await;
    let products = stack.table("ProductsTable").to_string();
    let orders = stack.table("OrdersTable").to_string();
    let ledger = stack.table("PaymentLedgerTable").to_string();
    use aws_sdk_dynamodb::types::AttributeValue as A;
    for (id, price) in [("p-bench-1", 1250), ("p-bench-2", 800)] {
        reader
            .dynamodb
            .put_item()
            .table_name(&products)
            .item("productId", A::S(id.into()))
            .item("name", A::S(id.into()))
            .item("priceCents", A::N(price.to_string()))
            .item("quantity", A::N("100".into()))
            .send()
            .await
            .expect("seed");
    }
    let mut ok = true;
    let mut run = CallsRun {
        command: command_line(),
        orders: Vec::new(),
    };
    println!(
        "\nAWS calls for one confirmed order (two items), by operation; budget: at most 13 calls = 8 DynamoDB writes + 1 batch read + 4 SQS sends, no other read"
    );
    // Signed in before counting: the token comes from the user pool, not from the saga.
    let operators = local_runner::cognito::operators_group(&stack.template);
    let token = stack
        .sign_in()
        .expect("the template's user pool")
        .sign_in("bench-customer", &[], &[&operators])
        .await
        .expect("sign in")
        .access_token;
    for (label, key) in [
        ("without Idempotency-Key", None),
        ("with Idempotency-Key", Some("bench-key-1")),
    ] {
        let _ = counter.take();
        let mut cmd = vec![
            "-s".to_string(),
            "-X".into(),
            "POST".into(),
            format!("http://{}/orders", stack.http_addr),
            "-H".into(),
            "content-type: application/json".into(),
            "-H".into(),
            format!("authorization: Bearer {token}"),
            "-d".into(),
            r#"{"items":[{"productId":"p-bench-1","quantity":2},{"productId":"p-bench-2","quantity":1}]}"#.into(),
        ];
        if let Some(k) = key {
            cmd.push("-H".into());
            cmd.push(format!("idempotency-key: {k}"));
        }
        let out = Command::new("curl").args(&cmd).output().expect("curl");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let order_id = body["orderId"].as_str().unwrap_or_default().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let item = reader
                .dynamodb
                .get_item()
                .table_name(&orders)
                .key("orderId", A::S(order_id.clone()))
                .consistent_read(true)
                .send()
                .await
                .expect("get");
            let status = item
                .item
                .and_then(|i| i.get("status").and_then(|s| s.as_s().ok().cloned()))
                .unwrap_or_default();
            if status == "CONFIRMED" {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "order {order_id} not confirmed: {status} {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let anything still in flight finish before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let calls = counter.take();
        let t = tally(&calls, &ledger);
        let function_calls: BTreeMap<String, usize> = CallCounter::summary(
            &calls
                .iter()
                .filter(|c| !MAPPING_OPS.contains(&c.operation.as_str()))
                .cloned()
                .collect::<Vec<_>>(),
        );
        println!("\n  {label}:");
        for (op, n) in &function_calls {
            println!("    {op:<40} {n}");
        }
        let total = t.writes + t.batch_reads + t.other_reads + t.sends + t.other;
        println!(
            "    saga total {total} calls: {} DynamoDB writes, {} batch read, {} other reads, {} SQS sends, {} other",
            t.writes, t.batch_reads, t.other_reads, t.sends, t.other
        );
        println!(
            "    + {} write(s) by the payment simulator to its own ledger (a real provider is an HTTPS call, not AWS)",
            t.provider_writes
        );
        let within = total <= 13
            && t.writes <= 8
            && t.batch_reads <= 1
            && t.other_reads == 0
            && t.sends <= 4;
        let with_provider = total + t.provider_writes <= 13 && t.writes + t.provider_writes <= 8;
        println!(
            "    budget: {} (counting the simulator's ledger write too: {})",
            if within { "within" } else { "OVER" },
            if with_provider { "within" } else { "over" }
        );
        ok &= within;
        run.orders.push(OrderCalls {
            label: label.to_string(),
            by_operation: function_calls,
            writes: t.writes,
            batch_reads: t.batch_reads,
            other_reads: t.other_reads,
            sends: t.sends,
            other: t.other,
            provider_writes: t.provider_writes,
            total,
            write_units: t.write_units,
            read_units: t.read_units,
            within_budget: within,
        });
    }
    if let Some(path) = json {
        ok &= write_json(path, &run);
    }
    stack.stop().await;
    let admin = local_clients(&opts.dynamodb_endpoint, &opts.sqs_endpoint, &opts.region).await;
    let template =
        local_runner::template::Template::from_file(root.join("template.yaml")).expect("template");
    let _ = local_runner::provision::delete_prefixed(
        &template,
        &opts.prefix,
        &admin.dynamodb,
        &admin.sqs,
    )
    .await;
    let cognito = local_runner::stack::local_cognito(&opts.sqs_endpoint, &opts.region);
    let _ = local_runner::cognito::delete_prefixed(&template, &opts.prefix, &cognito).await;
    ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_function_configuration_loads_from_the_bench_environment() {
        use saga_core::config::{
            CoordinatorConfig, OrderApiConfig, PaymentConfig, StockConfig, SweeperConfig,
        };
        let env = |k: &str| {
            FUNCTION_ENV
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        };
        assert!(OrderApiConfig::load(&env).is_ok(), "order-api");
        assert!(StockConfig::load(&env).is_ok(), "stock");
        assert!(PaymentConfig::load(&env).is_ok(), "payment");
        assert!(CoordinatorConfig::load(&env).is_ok(), "coordinator");
        assert!(SweeperConfig::load(&env).is_ok(), "sweeper");
    }

    use super::*;
    use clap::CommandFactory;

    #[test]
    fn when_a_function_exits_before_asking_for_an_event_should_say_so_instead_of_waiting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let err = first_connection(&listener, &mut child, Duration::from_secs(60)).unwrap_err();
        assert!(err.contains("exited before asking for an event"), "{err}");
    }

    #[test]
    fn parses_both_commands() {
        Cli::command().debug_assert();
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("saga-bench").chain(args.iter().copied()))
        };
        let Cmd::ColdStart { runs, binaries, .. } = parse(&["cold-start", "a", "--runs", "5", "b"])
            .unwrap()
            .command
        else {
            panic!("not cold-start");
        };
        assert_eq!(
            (runs, binaries),
            (5, vec!["a".to_string(), "b".to_string()])
        );
        let Cmd::ColdStart { runs, .. } = parse(&["cold-start", "a"]).unwrap().command else {
            panic!("not cold-start");
        };
        assert_eq!(runs, 30);
        assert!(matches!(
            parse(&["calls"]).unwrap().command,
            Cmd::Calls { json: None }
        ));
        let Cmd::Peers {
            runtimes,
            rounds,
            warm,
            ..
        } = parse(&["peers", "--runtimes", "rust,node"])
            .unwrap()
            .command
        else {
            panic!("not peers");
        };
        assert_eq!(
            (runtimes, rounds, warm),
            (vec!["rust".to_string(), "node".to_string()], 10, 25)
        );
        let Cmd::Load {
            rates,
            seconds,
            windows,
            ..
        } = parse(&["load", "--rates", "1,2.5", "--windows", "0,template"])
            .unwrap()
            .command
        else {
            panic!("not load");
        };
        assert_eq!(
            (rates, seconds, windows),
            (
                vec![1.0, 2.5],
                20.0,
                vec!["0".to_string(), "template".into()]
            )
        );
        assert!(matches!(
            parse(&["report", "--no-budgets"]).unwrap().command,
            Cmd::Report {
                no_budgets: true,
                ..
            }
        ));
        assert!(parse(&[]).is_err());
        assert!(parse(&["cold-start", "--runs", "many", "a"]).is_err());
    }
}
