//! The Lambda binaries themselves fed every file under `events/` through the Lambda Runtime
//! API, against the local stack (DynamoDB Local and moto).
//!
//! For each function: `cargo lambda watch --only-lambda-apis` serves the Runtime API on a free
//! port of 127.0.0.1; the function's binary runs against it with exactly the environment the
//! template gives the function (resolved to this test's tables and queues) plus what Lambda
//! itself sets; `cargo lambda invoke --data-file events/<file>.json` sends each event and the
//! test asserts the response: status and body for the API, the exact `batchItemFailures` for
//! the queue consumers (the malformed record's id and no other), the sweeper's summary, and
//! what each invocation left in the tables and queues.
//!
//! The binaries are the workspace's debug build (`saga_tests::workspace_binary`: seconds on
//! top of the test build, where a host release build with LTO took five minutes of every
//! `make test`). The artifacts that deploy, `sam build`'s arm64 release `bootstrap`s, go
//! through these same scenarios in sam_local.rs. The binaries are run directly rather than
//! through `cargo lambda watch`'s own `cargo run`, and the local stack's own consumers are
//! paused, so that nothing but the binary handles the events.
//!
//! What each event must do is not written here: the scenarios live in tests/src/events.rs,
//! shared with tests/tests/sam_local.rs, which runs the same events through SAM's local invoke
//! path. A new event goes there once and both tests run it.
//!
//! Last, `sam build` builds what deploys (`cargo lambda build --release --arm64` per function,
//! zig as the cross linker; skipped when its output is newer than every source, see
//! `saga_tests::sam::ensure_sam_build`) and the test checks every function got an arm64
//! `bootstrap`. sam_local.rs runs that same build.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use saga_tests::TestStack;
use saga_tests::events::{self, EVENTS, Invoke, event_path, read_event};
use serde_json::Value;
use tokio::process::{Child, Command};

fn repo() -> PathBuf {
    saga_tests::repo_root()
}

fn venv_bin() -> PathBuf {
    repo().join(".venv/bin")
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

/// One function's binary attached to a `cargo lambda watch` Runtime API.
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
        let binary = saga_tests::workspace_binary(&name);

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
    async fn invoke_file(&mut self, file: &str) -> Value {
        let path = event_path(file);
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
}

impl Invoke for Function {
    fn invoke(&mut self, file: &str) -> impl Future<Output = Value> {
        self.invoke_file(file)
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

// ==========================================================================================

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

/// Starts `function`'s binary on a paused stack of its own and runs its scenario
/// (tests/src/events.rs).
async fn run(function: &str) {
    let t = TestStack::start_paused().await;
    let f = Function::start(&t, function).await;
    events::run_scenario(function, &t, f).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_order_api_binary_gets_its_events_should_answer_each_as_the_api_does() {
    run("OrderApiFunction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_stock_binary_gets_its_batches_should_reserve_once_and_fail_only_the_malformed_record()
 {
    run("StockFunction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_payment_binary_gets_its_batches_should_charge_once_and_fail_only_the_malformed_record()
 {
    run("PaymentFunction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_coordinator_binary_gets_its_batches_should_move_each_order_on_and_fail_only_the_malformed_record()
 {
    run("CoordinatorFunction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_sweeper_binary_gets_its_schedule_should_hand_over_exactly_the_stale_pending_orders()
 {
    run("SweeperFunction").await;
}

#[test]
fn every_function_with_events_has_a_binary_test() {
    // The five tests above, one per function of EVENTS.
    assert_eq!(
        events::functions(),
        [
            "OrderApiFunction",
            "StockFunction",
            "PaymentFunction",
            "CoordinatorFunction",
            "SweeperFunction"
        ]
    );
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
    // The host binaries first: the function tests beside this one need them, and cargo builds
    // one thing at a time in a target dir, so a sam build started first would hold them up
    // for its whole length.
    saga_tests::workspace_binary("stock");
    saga_tests::sam::ensure_sam_build().unwrap_or_else(|e| panic!("{e}"));
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
