//! A smoke of the benchmark harness (`make bench`), cheap enough for `make test`: the side-by-
//! side run with the stock function's release binary under two names (1 start each, 1 + 3
//! events) on the fake Runtime API against DynamoDB Local and moto, then the report written
//! from it, plots included. It checks that the harness runs and the report is produced, never
//! how fast anything was (no budget is checked here; `make bench` checks them).
//!
//! The Node.js and Python peers are not installed or run here: installing them (npm ci plus a
//! venv with boto3, awslambdaric and Powertools) takes 25 s or more and runs them for a second
//! each, which is `make bench`'s work. Their sources are checked for syntax, which costs
//! nothing and catches a broken peer before `make bench` does.

use std::path::PathBuf;
use std::process::Command;

use local_runner::bench::peers::{self, PeersOptions, Runtime};
use local_runner::bench::report;
use saga_tests::{repo_root, services};

/// `target/release/stock`, built if missing. Built with the same package set as `make build`,
/// `make bench` and the binaries test: building `-p stock` alone unifies features differently
/// and would relink the binary (minutes with LTO) every time one of them ran in between.
fn stock_binary() -> PathBuf {
    let root = repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "order-api",
            "-p",
            "stock",
            "-p",
            "payment",
            "-p",
            "coordinator",
            "-p",
            "sweeper",
        ])
        .current_dir(&root)
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build --release of the functions failed"
    );
    root.join("target/release/stock")
}

#[tokio::test]
async fn when_the_harness_runs_should_write_the_report_with_its_plots() {
    let (dynamodb_endpoint, sqs_endpoint) = services().await;
    let root = repo_root();
    let stock = stock_binary();
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
