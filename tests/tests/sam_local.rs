//! Every file under `events/` through SAM's local invoke path: `sam local start-lambda` runs
//! each function's arm64 `bootstrap`, as `sam build` built it for deployment, in a Lambda
//! container (arm64 under qemu on an x86_64 machine), against DynamoDB Local and moto. The
//! invoke client is the Lambda Invoke API (`POST /2015-03-31/functions/{name}/invocations`,
//! what `aws lambda invoke --endpoint-url` sends); start-lambda serves it through the same
//! code as `sam local invoke`, warm containers saving a container start per event.
//!
//! The assertions are the scenarios of tests/src/events.rs, the ones binaries.rs runs on the
//! release binaries: status codes and bodies, exact batchItemFailures, and the tables and
//! queues each invocation leaves. Each function gets a paused stack of its own (its own table
//! and queue names); the `--env-vars` file gives every function the environment
//! template.yaml declares, resolved to its stack and to addresses the container reaches
//! (`local_runner::sam`), and the template SAM runs is the built one with the endpoint
//! variables declared (SAM passes a function only the variables its template declares).
//!
//! `infra/scripts/sam-local.sh up` sets up Docker (its own dockerd under .local/docker when no
//! daemon answers), qemu's binfmt handler, the base image (a stand-in offline) and the relay
//! from the Docker bridge to moto; the test stops the dockerd and relay it started, SAM and
//! every container SAM started, also when it fails. `sam build` is shared with binaries.rs
//! (`saga_tests::sam::ensure_sam_build`): built once, when a source changed.
//!
//! Also: the events keep the shapes `sam local generate-event` gives for their sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use saga_tests::TestStack;
use saga_tests::events::{self, EVENTS, Invoke, event_path, read_event};
use saga_tests::local_runner::sam::{
    Endpoints, container_environment, env_vars_file, local_template,
};
use serde_json::Value;
use tokio::process::{Child, Command};

/// How long one invocation may take: a container start under qemu on a busy 2-core machine
/// is seconds; this only catches a hang.
const INVOKE_DEADLINE: Duration = Duration::from_secs(180);
/// How long `sam local start-lambda` may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    saga_tests::repo_root()
}

fn venv_bin() -> PathBuf {
    repo().join(".venv/bin")
}

fn path_with_venv() -> String {
    format!(
        "{}:{}",
        venv_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn script() -> PathBuf {
    repo().join("infra/scripts/sam-local.sh")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What `sam-local.sh up` set up, and what of it this test started (and so stops).
struct Docker {
    host: String,
    started: Vec<&'static str>,
}

impl Docker {
    fn up() -> Docker {
        let out = std::process::Command::new(script())
            .arg("up")
            .env("SAGA_LOCAL", saga_tests::saga_local_binary())
            .env("PATH", path_with_venv())
            .stdin(Stdio::null())
            .output()
            .expect("run infra/scripts/sam-local.sh up");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sam-local.sh up failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .to_string()
        };
        let mut started = Vec::new();
        if field("STARTED_RELAY") == "1" {
            started.push("sam-relay");
        }
        if field("STARTED_DOCKERD") == "1" {
            started.push("dockerd");
        }
        Docker {
            host: field("DOCKER_HOST"),
            started,
        }
    }

    fn docker(&self, args: &[&str]) -> String {
        let mut cmd = std::process::Command::new("docker");
        cmd.args(args);
        if !self.host.is_empty() {
            cmd.env("DOCKER_HOST", &self.host);
        }
        let out = cmd.output().expect("run docker");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ids of the containers SAM runs functions in.
    fn lambda_containers(&self) -> BTreeSet<String> {
        self.docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            "label=sam.cli.container.type=lambda",
        ])
        .split_whitespace()
        .map(String::from)
        .collect()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if self.started.is_empty() {
            return;
        }
        let status = std::process::Command::new(script())
            .arg("down")
            .args(&self.started)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("sam-local.sh down {:?} failed: {status:?}", self.started);
        }
    }
}

/// `sam local start-lambda` and the containers it started; both stopped on drop.
struct StartLambda<'d> {
    docker: &'d Docker,
    child: Child,
    port: u16,
    log: PathBuf,
    before: BTreeSet<String>,
}

impl<'d> StartLambda<'d> {
    async fn start(docker: &'d Docker, template: &Path, env_vars: &Path, log: PathBuf) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let before = docker.lambda_containers();
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(venv_bin().join("sam"));
        cmd.args(["local", "start-lambda", "--template"])
            .arg(template)
            .arg("--env-vars")
            .arg(env_vars)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--add-host",
                "host.docker.internal:host-gateway",
                "--skip-pull-image",
                "--warm-containers",
                "LAZY",
                "--region",
                "us-east-1",
            ])
            .current_dir(repo())
            .env("PATH", path_with_venv())
            .env("SAM_CLI_TELEMETRY", "0")
            // SAM hands its own credentials and region to the function; no STS retries offline.
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_MAX_ATTEMPTS", "1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true);
        if !docker.host.is_empty() {
            cmd.env("DOCKER_HOST", &docker.host);
        }
        let mut child = cmd.spawn().expect("start sam local start-lambda");
        let deadline = Instant::now() + START_DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "sam local start-lambda exited ({status}):\n{}",
                    tail(&log, 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "sam local start-lambda did not listen within {START_DEADLINE:?}:\n{}",
                tail(&log, 40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        StartLambda {
            docker,
            child,
            port,
            log,
            before,
        }
    }

    fn function(&self, logical_id: &str) -> SamFunction {
        SamFunction {
            url: format!(
                "http://127.0.0.1:{}/2015-03-31/functions/{logical_id}/invocations",
                self.port
            ),
            log: self.log.clone(),
            http: Client::builder(TokioExecutor::new()).build_http(),
            took: Vec::new(),
        }
    }

    /// SIGTERM (SAM then stops its warm containers), then removes any container it left.
    async fn stop(mut self) -> Vec<String> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        self.remove_leftovers()
    }

    /// The containers SAM started and left behind, removed; their ids.
    fn remove_leftovers(&self) -> Vec<String> {
        let left: Vec<String> = self
            .docker
            .lambda_containers()
            .difference(&self.before)
            .cloned()
            .collect();
        for id in &left {
            self.docker.docker(&["rm", "-f", id]);
        }
        left
    }
}

impl Drop for StartLambda<'_> {
    fn drop(&mut self) {
        // On a failed test: kill_on_drop ends SAM; its containers go here.
        let _ = self.child.start_kill();
        self.remove_leftovers();
    }
}

/// One function behind start-lambda's Invoke API.
struct SamFunction {
    url: String,
    log: PathBuf,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// How long each invocation took, in order (the first one starts the container).
    took: Vec<Duration>,
}

impl SamFunction {
    async fn invoke_file(&mut self, file: &str) -> Value {
        let at = Instant::now();
        let body = std::fs::read(event_path(file)).unwrap();
        let request = hyper::Request::post(&self.url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = tokio::time::timeout(INVOKE_DEADLINE, async {
            let r = self.http.request(request).await?;
            let error = r
                .headers()
                .get("x-amz-function-error")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let status = r.status();
            let bytes = r.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, error, bytes))
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: events/{file} got no response in {INVOKE_DEADLINE:?}\nSAM log:\n{}",
                self.url,
                tail(&self.log, 40)
            )
        })
        .unwrap_or_else(|e| panic!("{}: events/{file}: {e}", self.url));
        let (status, error, bytes) = response;
        self.took.push(at.elapsed());
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            status.is_success() && error.is_none(),
            "events/{file}: HTTP {status}, function error {error:?}: {text}\nSAM log:\n{}",
            tail(&self.log, 40)
        );
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("events/{file}: response is not JSON ({e}): {text}"))
    }
}

impl Invoke for SamFunction {
    fn invoke(&mut self, file: &str) -> impl Future<Output = Value> {
        self.invoke_file(file)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_sam_local_invokes_every_event_should_answer_as_the_binaries_do() {
    let started = Instant::now();
    // The build first: nothing to run without it (and it may take minutes from nothing).
    tokio::task::spawn_blocking(saga_tests::sam::ensure_sam_build)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let built = started.elapsed();
    let docker = tokio::task::spawn_blocking(Docker::up).await.unwrap();
    let set_up = started.elapsed();

    let (dynamodb, sqs) = saga_tests::services().await;
    let host = Endpoints { dynamodb, sqs };
    let container = Endpoints::for_container(&host).expect("local endpoints");
    let functions = events::functions();
    let mut stacks = Vec::new();
    let mut environments = BTreeMap::new();
    for function in &functions {
        let t = TestStack::start_paused().await;
        environments.insert(
            function.to_string(),
            container_environment(&t.stack.environments[*function], &host, &container),
        );
        stacks.push(t);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sam-{}", stacks[0].prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let env_path = dir.join("env.json");
    std::fs::write(&env_path, env_vars_file(&environments).to_string()).unwrap();
    let template_path = dir.join("template.yaml");
    let template = local_template(&repo().join(".aws-sam/build")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&template_path, template).unwrap();

    let sam = StartLambda::start(&docker, &template_path, &env_path, dir.join("sam.log")).await;
    let mut per_function = Vec::new();
    let (mut first, mut warm) = (Vec::new(), Vec::new());
    for (function, t) in functions.iter().zip(&stacks) {
        let at = Instant::now();
        let f = events::run_scenario(function, t, sam.function(function)).await;
        per_function.push(format!("{function} {:.1?}", at.elapsed()));
        first.extend(f.took.first().copied());
        warm.extend(f.took.iter().skip(1).copied());
    }
    warm.sort();
    let left = sam.stop().await;
    assert!(
        left.is_empty(),
        "SAM left containers behind (removed): {left:?}"
    );
    for t in stacks {
        t.stop().await;
    }
    // Measurements for the log only: nothing here depends on speed.
    eprintln!(
        "sam local: build check {built:.1?}, set-up {:.1?}, scenarios {}; total {:.1?}",
        set_up - built,
        per_function.join(", "),
        started.elapsed()
    );
    eprintln!(
        "sam local: first invoke of each function (container start) {first:.2?}; \
         warm invokes: {} , median {:.2?}, max {:.2?}",
        warm.len(),
        warm.get(warm.len() / 2).copied().unwrap_or_default(),
        warm.last().copied().unwrap_or_default()
    );
}

// ---- shapes: the events against `sam local generate-event` --------------------------------

/// Objects whose keys are data (header names, parameters, claims), not fields: only their
/// values' types are compared.
const FREE_MAPS: &[&str] = &[
    "headers",
    "queryStringParameters",
    "pathParameters",
    "stageVariables",
    "claims",
    "messageAttributes",
    "detail",
];

/// Fields of a generated event that an event may leave out, with why.
const OPTIONAL: &[&str] = &[
    // HTTP API: present only when the request has them.
    "cookies",
    "queryStringParameters",
    "pathParameters",
    "stageVariables",
    "body",
    // Mutual TLS only.
    "authentication",
    // Only on a route with an authorizer.
    "authorizer",
];

/// Fields AWS sends that the generated samples lack, with why.
const NOT_IN_SAMPLES: &[&str] = &[
    // EventBridge's envelope always carries "version": "0"; SAM's CloudWatch Events sample
    // predates it.
    ".version",
    // SQS adds the sender's X-Ray trace header to a message's system attributes when the
    // sender is traced (every function here has Tracing: Active).
    ".attributes.AWSTraceHeader",
];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences between an event and the generated one of its source, as `path: what`.
fn shape_problems(path: &str, ours: &Value, generated: &Value, out: &mut Vec<String>) {
    if kind(ours) != kind(generated) {
        out.push(format!(
            "{path}: a {} where AWS sends a {}",
            kind(ours),
            kind(generated)
        ));
        return;
    }
    match (ours, generated) {
        (Value::Object(o), Value::Object(g)) => {
            let name = path.rsplit('.').next().unwrap_or_default();
            if FREE_MAPS.contains(&name) {
                for (k, v) in o {
                    if let Some(sample) = g.values().next() {
                        shape_problems(&format!("{path}.{k}"), v, sample, out);
                    }
                }
                return;
            }
            for (k, v) in o {
                match g.get(k) {
                    Some(gv) => shape_problems(&format!("{path}.{k}"), v, gv, out),
                    None if NOT_IN_SAMPLES
                        .iter()
                        .any(|p| format!("{path}.{k}").ends_with(p)) => {}
                    None => out.push(format!("{path}.{k}: not in what AWS sends")),
                }
            }
            for k in g.keys() {
                if !o.contains_key(k) && !OPTIONAL.contains(&k.as_str()) {
                    out.push(format!("{path}.{k}: missing"));
                }
            }
        }
        (Value::Array(o), Value::Array(g)) => {
            if let Some(sample) = g.first() {
                for (i, v) in o.iter().enumerate() {
                    shape_problems(&format!("{path}[{i}]"), v, sample, out);
                }
            }
        }
        _ => {}
    }
}

fn generate_event(service: &str, event: &str) -> Value {
    let out = std::process::Command::new(venv_bin().join("sam"))
        .args(["local", "generate-event", service, event])
        .env("PATH", path_with_venv())
        .env("SAM_CLI_TELEMETRY", "0")
        .output()
        .expect("run sam local generate-event");
    assert!(
        out.status.success(),
        "sam local generate-event {service} {event}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("generated event is JSON")
}

#[test]
fn every_event_should_have_the_shape_sam_local_generate_event_gives_its_source() {
    let generated = BTreeMap::from([
        (
            "OrderApiFunction",
            generate_event("apigateway", "http-api-proxy"),
        ),
        ("StockFunction", generate_event("sqs", "receive-message")),
        (
            "SweeperFunction",
            generate_event("cloudwatch", "scheduled-event"),
        ),
    ]);
    let source = |function: &'static str| match function {
        "PaymentFunction" | "CoordinatorFunction" => "StockFunction",
        other => other,
    };
    let mut problems = Vec::new();
    for (file, function) in EVENTS {
        let sample = generated
            .get(source(function))
            .unwrap_or_else(|| panic!("no generated event for {function}"));
        let mut found = Vec::new();
        shape_problems("", &read_event(file), sample, &mut found);
        problems.extend(found.into_iter().map(|p| format!("events/{file}: {p}")));
    }
    assert!(
        problems.is_empty(),
        "events differ from `sam local generate-event`:\n{}",
        problems.join("\n")
    );
}

#[test]
fn when_an_event_invents_or_drops_a_field_the_shape_check_should_say_which() {
    let generated =
        serde_json::json!({"a": "x", "b": {"c": 1}, "headers": {"h": "v"}, "body": "s"});
    let mut problems = Vec::new();
    shape_problems(
        "",
        &serde_json::json!({"a": 1, "b": {"c": 2, "d": true}, "headers": {"x-y": "z", "n": 3}}),
        &generated,
        &mut problems,
    );
    assert_eq!(
        problems,
        [
            ".a: a number where AWS sends a string",
            ".b.d: not in what AWS sends",
            ".headers.n: a number where AWS sends a string",
        ]
    );
}
