//! A smoke of the benchmark harness (`make bench`), cheap enough for `make test`: the side-by-
//! side run with the stock function's binary under two names (1 start each, 1 + 3
//! events) on the fake Runtime API against DynamoDB Local and moto, then the report written
//! from it, plots included; and the load phase at a tiny scale (a few orders at one rate and
//! one batching window, the emulators' ceiling for a moment), its report section and plots.
//! It checks that the harness runs, every order ends and the report is produced, never how
//! fast anything was (no budget is checked here; `make bench` checks them).
//!
//! The Node.js and Python peers are not installed or run here: installing them (npm ci plus a
//! venv with boto3, awslambdaric and Powertools) takes 25 s or more and runs them for a second
//! each, which is `make bench`'s work. Their sources are checked for syntax, which costs
//! nothing and catches a broken peer before `make bench` does.

use std::process::Command;

use local_runner::bench::load::{self, LoadOptions};
use local_runner::bench::peers::{self, PeersOptions, Runtime};
use local_runner::bench::report;
use saga_tests::{repo_root, services};

#[tokio::test]
async fn when_the_harness_runs_should_write_the_report_with_its_plots() {
    let (dynamodb_endpoint, sqs_endpoint) = services().await;
    let root = repo_root();
    // The debug build (seconds on top of the test build): the smoke checks the harness, not the
    // binary's speed, which `make bench` measures on the release build.
    let stock = saga_tests::workspace_binary("stock");
    let dir = root.join(format!(
        "target/bench-smoke/{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = PeersOptions {
        repo_root: root.clone(),
        runtimes: vec![
            Runtime::rust("rust", &stock),
            Runtime::rust("rust-again", &stock),
        ],
        rounds: 1,
        warm: 3,
        dynamodb_endpoint,
        sqs_endpoint,
        logs_dir: dir.join("logs"),
        command: "bench_smoke".into(),
        progress: false,
    };
    let run = peers::measure(&opts).await.expect("the side-by-side run");
    assert_eq!(run.runtimes.len(), 2);
    for r in &run.runtimes {
        assert_eq!(
            (r.init_ms.len(), r.first_ms.len(), r.warm_ms.len()),
            (1, 1, 3),
            "{r:?}"
        );
        assert!(r.peak_rss_kib[0] > 0, "{r:?}");
    }
    std::fs::write(dir.join("peers.json"), serde_json::to_string(&run).unwrap()).unwrap();

    let verdicts = report::write(&dir, &root, false).expect("the report");
    assert!(verdicts.is_empty(), "no budget is checked: {verdicts:?}");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("## One function, side by side"), "{md}");
    assert!(
        md.contains("| rust | ") && md.contains("| rust-again | "),
        "{md}"
    );
    assert!(md.contains("![Init per runtime](cold-start.svg)"), "{md}");
    assert!(md.contains("Measured by: `bench_smoke`"), "{md}");
    for plot in ["cold-start.svg", "peak-rss.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{plot}"
        );
        assert!(svg.trim_end().ends_with("</svg>"), "{plot}");
        assert!(svg.contains(">rust-again</text>"), "{plot}: {svg}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_peers_sources_parse() {
    let peers = repo_root().join("bench/peers");
    for file in ["node/index.mjs", "node/runtime.mjs"] {
        let out = Command::new("node")
            .arg("--check")
            .arg(peers.join(file))
            .output();
        match out {
            Ok(o) => assert!(
                o.status.success(),
                "{file}: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("node not found ({e}): {file} not checked"),
        }
    }
    for file in ["python-boto3/handler.py", "python-powertools/handler.py"] {
        let out = Command::new("python3")
            .args([
                "-c",
                "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])",
            ])
            .arg(peers.join(file))
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The load phase at a tiny scale: the emulators' ceiling for a moment, one rate step of a
/// handful of orders on the stack of `make run`, and one batching window setting; then the
/// report's section and its plots. It checks that every order ends and the section and plots
/// are written, never how fast anything was.
#[tokio::test]
async fn when_the_load_phase_runs_should_end_every_order_and_write_its_section_and_plots() {
    let (dynamodb_endpoint, sqs_endpoint) = services().await;
    let root = repo_root();
    let dir = root.join(format!(
        "target/bench-smoke/{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = LoadOptions {
        repo_root: root.clone(),
        dynamodb_endpoint,
        sqs_endpoint,
        rates: vec![4.0],
        step_seconds: 1.5,
        windows: vec![Some(0)],
        window_rates: vec![4.0],
        window_seconds: 1.0,
        ceiling_concurrency: vec![2],
        ceiling_seconds: 0.3,
        products: 4,
        lines: 2,
        payment_failure_rate: 0.1,
        warm_up_seconds: 0.0,
        command: "bench_smoke load".into(),
        progress: false,
    };
    let run = load::measure(&opts).await.expect("the load run");
    assert_eq!(run.ceiling.len(), 4, "{:?}", run.ceiling);
    assert!(run.ceiling.iter().all(|c| c.calls > 0), "{:?}", run.ceiling);
    for step in run.steps.iter().chain(&run.windows) {
        assert!(step.sent > 0, "{step:?}");
        assert_eq!(step.accepted, step.sent, "every order accepted: {step:?}");
        assert_eq!(step.unfinished, 0, "every order final: {step:?}");
        assert_eq!(step.confirmed + step.cancelled, step.accepted, "{step:?}");
        assert_eq!(
            step.final_in_table, step.accepted,
            "the orders table agrees: {step:?}"
        );
        assert_eq!(step.latency_ms.len(), step.accepted);
        assert!(
            step.hops.iter().any(|h| h.function == "StockFunction"
                && h.invocations > 0
                && h.queue_wait_ms.n > 0),
            "{:?}",
            step.hops
        );
    }
    assert_eq!((run.steps.len(), run.windows.len()), (1, 1));
    std::fs::write(dir.join("load.json"), serde_json::to_string(&run).unwrap()).unwrap();

    // The throughput budget's verdict comes with the section; whether it is met is not this
    // test's business.
    report::write(&dir, &root, false).expect("the report");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for section in [
        "## The whole saga under open-loop load",
        "### The emulators' ceiling",
        "### Rate steps",
        "### Where the time goes",
        "### The batching window",
        "Measured by: `bench_smoke load`",
        "![Order-to-final latency CDF per offered rate](latency-cdf.svg)",
    ] {
        assert!(md.contains(section), "{section}: {md}");
    }
    for plot in ["latency-cdf.svg", "throughput.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{plot}"
        );
        assert!(svg.trim_end().ends_with("</svg>"), "{plot}");
        assert!(svg.contains("<polyline"), "{plot}: {svg}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
