//! The report: `report.md` and its plots, from the JSON the measurements wrote beside it, and
//! the budgets checked against the same numbers.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::load::LoadRun;
use super::load_report::{self, CEILING_FRACTION_BUDGET};
use super::peers::{PeersRun, RuntimeSamples};
use super::stats::{median, percentile};
use super::svg::{self, Bar};

pub const COLD_START_BUDGET_MS: f64 = 10.0;
pub const SIZE_BUDGET_BYTES: u64 = 5_000_000;
pub const CALLS_BUDGET: usize = 13;
pub const INIT_SPEEDUP_BUDGET: f64 = 20.0;
pub const RSS_FRACTION_BUDGET: f64 = 0.25;
/// The runtime the new budgets compare with.
pub const REFERENCE_PEER: &str = "node";
pub const BASELINE: &str = "rust";

/// `cold-start.json`: every function's release binary, start to first `/next`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ColdStartRun {
    pub command: String,
    pub functions: Vec<FunctionColdStart>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionColdStart {
    pub name: String,
    pub samples_ms: Vec<f64>,
}

/// `sizes.json`: the arm64 artifacts (and, for reference, the host's release binaries).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SizesRun {
    pub command: String,
    pub artifacts: Vec<(String, u64)>,
    pub host: Vec<(String, u64)>,
}

/// `calls.json`: AWS calls for one confirmed order, by kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallsRun {
    pub command: String,
    pub orders: Vec<OrderCalls>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderCalls {
    pub label: String,
    pub by_operation: std::collections::BTreeMap<String, usize>,
    pub writes: usize,
    pub batch_reads: usize,
    pub other_reads: usize,
    pub sends: usize,
    pub other: usize,
    pub provider_writes: usize,
    pub total: usize,
    /// DynamoDB write request units (on-demand): 1 per item written by a plain write, 2 per
    /// item of a transaction (condition checks included); items of at most 1 KB.
    pub write_units: f64,
    /// Read request units: 1 per item read (items of at most 4 KB, strongly consistent: an
    /// upper bound).
    pub read_units: f64,
    pub within_budget: bool,
}

/// One budget's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub budget: String,
    pub measured: String,
    pub met: bool,
}

fn read<T: for<'de> Deserialize<'de>>(dir: &Path, file: &str) -> Option<T> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("{}: {e}", dir.join(file).display());
            None
        }
    }
}

/// What a run measured, as read back from `dir`.
pub struct Inputs {
    pub peers: Option<PeersRun>,
    pub cold_start: Option<ColdStartRun>,
    pub sizes: Option<SizesRun>,
    pub calls: Option<CallsRun>,
    pub load: Option<LoadRun>,
}

impl Inputs {
    pub fn read(dir: &Path) -> Self {
        Inputs {
            peers: read(dir, "peers.json"),
            cold_start: read(dir, "cold-start.json"),
            sizes: read(dir, "sizes.json"),
            calls: read(dir, "calls.json"),
            load: read(dir, "load.json"),
        }
    }
}

/// Summary of one runtime's samples.
#[derive(Clone, Debug)]
pub struct Summary {
    pub name: String,
    pub init: f64,
    pub init_p10: f64,
    pub init_p90: f64,
    pub first: f64,
    pub warm_p50: f64,
    pub warm_p99: f64,
    pub rss_mib: f64,
    pub rss_max_mib: f64,
    pub starts: usize,
    pub warm_events: usize,
}

impl Summary {
    pub fn of(s: &RuntimeSamples) -> Self {
        let rss: Vec<f64> = s.peak_rss_kib.iter().map(|k| *k as f64 / 1024.0).collect();
        Summary {
            name: s.name.clone(),
            init: median(&s.init_ms),
            init_p10: percentile(&s.init_ms, 0.1),
            init_p90: percentile(&s.init_ms, 0.9),
            first: median(&s.first_ms),
            warm_p50: percentile(&s.warm_ms, 0.5),
            warm_p99: percentile(&s.warm_ms, 0.99),
            rss_mib: median(&rss),
            rss_max_mib: rss.iter().copied().fold(f64::NAN, f64::max),
            starts: s.init_ms.len(),
            warm_events: s.warm_ms.len(),
        }
    }
}

/// List prices (us-east-1, on-demand, no free tier), in dollars.
pub mod prices {
    pub const LAMBDA_ARM_GB_SECOND: f64 = 0.000_013_333_4;
    pub const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    pub const SQS_REQUEST: f64 = 0.40 / 1e6;
    pub const DYNAMODB_WRU: f64 = 0.625 / 1e6;
    pub const DYNAMODB_RRU: f64 = 0.125 / 1e6;
    pub const HTTP_API_REQUEST: f64 = 1.00 / 1e6;
    pub const SFN_STANDARD_TRANSITION: f64 = 0.025 / 1e3;
}

/// The template's function memory size (MB), which the projection bills at.
pub fn template_memory_mb(repo_root: &Path) -> u32 {
    std::fs::read_to_string(repo_root.join("template.yaml"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix("MemorySize:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(128)
}

/// Share of invocations assumed to start cold in the projection (their init is billed).
pub const COLD_SHARE: f64 = 0.01;
/// State transitions of one confirmed order in the Step Functions Standard design.
pub const SFN_TRANSITIONS: f64 = 4.0;

/// One design's cost per 1M orders.
#[derive(Clone, Debug)]
pub struct Projection {
    pub design: String,
    pub invocations: f64,
    pub billed_ms: f64,
    pub gb_seconds: f64,
    pub lambda: f64,
    pub sqs: f64,
    pub dynamodb: f64,
    pub api: f64,
    pub sfn: f64,
}

impl Projection {
    pub fn total(&self) -> f64 {
        self.lambda + self.sqs + self.dynamodb + self.api + self.sfn
    }
}

/// What the load run measured of each function: invocations per final order and the median
/// invocation time (ms), at one offered rate.
#[derive(Clone, Debug)]
pub struct MeasuredFunctions {
    pub offered_per_s: f64,
    /// (logical id, invocations per order, p50 ms)
    pub functions: Vec<(String, f64, f64)>,
}

/// The functions the Step Functions design keeps as Lambdas (the API and the charge).
const SFN_FUNCTIONS: [&str; 2] = ["OrderApiFunction", "PaymentFunction"];

/// The three designs, from the counted calls and the functions' durations: each function's
/// own, measured under load, when `measured` is given; else the stock function's warm p50
/// (from the side-by-side run) for every function, at one invocation per message.
pub fn project(
    rust: &Summary,
    node: Option<&Summary>,
    order: &OrderCalls,
    memory_mb: u32,
    measured: Option<&MeasuredFunctions>,
) -> Vec<Projection> {
    let gb = memory_mb as f64 / 1024.0;
    if let Some(m) = measured.filter(|m| !m.functions.is_empty()) {
        return project_measured(rust, node, order, gb, m);
    }
    let messages = order.sends as f64;
    let dynamodb =
        1e6 * (order.write_units * prices::DYNAMODB_WRU + order.read_units * prices::DYNAMODB_RRU);
    let api = 1e6 * prices::HTTP_API_REQUEST;
    let lambda_design = |name: &str, s: &Summary, invocations: f64, sqs_messages: f64| {
        let billed_ms = s.warm_p50.ceil();
        let gb_seconds = invocations * (billed_ms + COLD_SHARE * s.init.ceil()) / 1000.0 * gb;
        Projection {
            design: name.to_string(),
            invocations,
            billed_ms,
            gb_seconds,
            lambda: 1e6
                * (invocations * prices::LAMBDA_REQUEST
                    + gb_seconds * prices::LAMBDA_ARM_GB_SECOND),
            sqs: 1e6 * 3.0 * sqs_messages * prices::SQS_REQUEST,
            dynamodb,
            api,
            sfn: 0.0,
        }
    };
    let mut out = vec![lambda_design(
        "this design (Rust, SQS choreography)",
        rust,
        1.0 + messages,
        messages,
    )];
    if let Some(node) = node {
        out.push(lambda_design(
            "the same design in Node.js",
            node,
            1.0 + messages,
            messages,
        ));
    }
    let mut sfn = lambda_design(
        "Step Functions Standard (Rust Lambdas for the API and the charge)",
        rust,
        2.0,
        0.0,
    );
    sfn.sfn = 1e6 * SFN_TRANSITIONS * prices::SFN_STANDARD_TRANSITION;
    out.push(sfn);
    out
}

fn project_measured(
    rust: &Summary,
    node: Option<&Summary>,
    order: &OrderCalls,
    gb: f64,
    m: &MeasuredFunctions,
) -> Vec<Projection> {
    let messages = order.sends as f64;
    let dynamodb =
        1e6 * (order.write_units * prices::DYNAMODB_WRU + order.read_units * prices::DYNAMODB_RRU);
    let api = 1e6 * prices::HTTP_API_REQUEST;
    // Each function's invocations per order and billed ms, with `extra` ms per invocation.
    let design =
        |name: &str, functions: &[(String, f64, f64)], extra: f64, init: f64, sqs_messages: f64| {
            let invocations: f64 = functions.iter().map(|f| f.1).sum();
            let billed: f64 = functions.iter().map(|f| f.1 * (f.2 + extra).ceil()).sum();
            let gb_seconds = functions
                .iter()
                .map(|f| f.1 * ((f.2 + extra).ceil() + COLD_SHARE * init.ceil()))
                .sum::<f64>()
                / 1000.0
                * gb;
            Projection {
                design: name.to_string(),
                invocations,
                billed_ms: if invocations > 0.0 {
                    billed / invocations
                } else {
                    0.0
                },
                gb_seconds,
                lambda: 1e6
                    * (invocations * prices::LAMBDA_REQUEST
                        + gb_seconds * prices::LAMBDA_ARM_GB_SECOND),
                sqs: 1e6 * 3.0 * sqs_messages * prices::SQS_REQUEST,
                dynamodb,
                api,
                sfn: 0.0,
            }
        };
    let mut out = vec![design(
        "this design (Rust, SQS choreography)",
        &m.functions,
        0.0,
        rust.init,
        messages,
    )];
    if let Some(node) = node {
        out.push(design(
            "the same design in Node.js",
            &m.functions,
            (node.warm_p50 - rust.warm_p50).max(0.0),
            node.init,
            messages,
        ));
    }
    let sfn_functions: Vec<(String, f64, f64)> = SFN_FUNCTIONS
        .iter()
        .map(|id| {
            let ms = m
                .functions
                .iter()
                .find(|f| f.0 == *id)
                .map_or(rust.warm_p50, |f| f.2);
            (id.to_string(), 1.0, ms)
        })
        .collect();
    let mut sfn = design(
        "Step Functions Standard (Rust Lambdas for the API and the charge)",
        &sfn_functions,
        0.0,
        rust.init,
        0.0,
    );
    sfn.sfn = 1e6 * SFN_TRANSITIONS * prices::SFN_STANDARD_TRANSITION;
    out.push(sfn);
    out
}

fn ratio(v: f64, base: f64) -> String {
    if !(v.is_finite() && base.is_finite() && base > 0.0) {
        return "–".into();
    }
    let r = v / base;
    if r >= 10.0 {
        format!("{r:.0}×")
    } else {
        format!("{r:.1}×")
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Checks the budgets against what was measured. With `complete`, a budget whose input is
/// missing is missed ("not measured").
pub fn verdicts(inputs: &Inputs, complete: bool) -> Vec<Verdict> {
    let mut v = Vec::new();
    let missing = |budget: &str, v: &mut Vec<Verdict>| {
        if complete {
            v.push(Verdict {
                budget: budget.into(),
                measured: "not measured".into(),
                met: false,
            });
        }
    };
    let cold_budget = format!("every function ready within {COLD_START_BUDGET_MS} ms (median)");
    match &inputs.cold_start {
        Some(c) => {
            let worst = c
                .functions
                .iter()
                .map(|f| (f.name.as_str(), median(&f.samples_ms)))
                .fold(("", f64::NAN), |a, b| {
                    if a.1.is_nan() || b.1 > a.1 { b } else { a }
                });
            v.push(Verdict {
                budget: cold_budget,
                measured: format!("slowest: {} {} ms", worst.0, num(worst.1)),
                met: worst.1 <= COLD_START_BUDGET_MS,
            });
        }
        None => missing(&cold_budget, &mut v),
    }
    let size_budget = format!("every arm64 artifact at most {SIZE_BUDGET_BYTES} bytes");
    match &inputs.sizes {
        Some(s) => {
            let largest = s.artifacts.iter().max_by_key(|a| a.1);
            v.push(Verdict {
                budget: size_budget,
                measured: largest
                    .map(|(n, b)| format!("largest: {n} {b} bytes"))
                    .unwrap_or_else(|| "no artifact".into()),
                met: largest.is_some_and(|(_, b)| *b <= SIZE_BUDGET_BYTES),
            });
        }
        None => missing(&size_budget, &mut v),
    }
    let calls_budget = format!("a confirmed order costs at most {CALLS_BUDGET} AWS calls");
    match &inputs.calls {
        Some(c) => v.push(Verdict {
            budget: calls_budget,
            measured: c
                .orders
                .iter()
                .map(|o| format!("{}: {}", o.label, o.total))
                .collect::<Vec<_>>()
                .join("; "),
            met: !c.orders.is_empty() && c.orders.iter().all(|o| o.within_budget),
        }),
        None => missing(&calls_budget, &mut v),
    }
    let summaries: Vec<Summary> = inputs
        .peers
        .as_ref()
        .map(|p| p.runtimes.iter().map(Summary::of).collect())
        .unwrap_or_default();
    let rust = summaries.iter().find(|s| s.name == BASELINE);
    let node = summaries.iter().find(|s| s.name == REFERENCE_PEER);
    let init_budget = format!("init at least {INIT_SPEEDUP_BUDGET}× faster than the Node peer");
    let rss_budget = "peak RSS at most ¼ of the Node peer's".to_string();
    match (rust, node) {
        (Some(r), Some(n)) => {
            let speedup = n.init / r.init;
            v.push(Verdict {
                budget: init_budget,
                measured: format!("{speedup:.0}× ({} ms vs {} ms)", num(r.init), num(n.init)),
                met: speedup >= INIT_SPEEDUP_BUDGET,
            });
            let fraction = r.rss_mib / n.rss_mib;
            v.push(Verdict {
                budget: rss_budget,
                measured: format!(
                    "{:.2} ({} MiB vs {} MiB)",
                    fraction,
                    num(r.rss_mib),
                    num(n.rss_mib)
                ),
                met: fraction <= RSS_FRACTION_BUDGET,
            });
        }
        _ => {
            missing(&init_budget, &mut v);
            missing(&rss_budget, &mut v);
        }
    }
    let load_budget =
        format!("saga throughput at least {CEILING_FRACTION_BUDGET} of the emulators' ceiling");
    match inputs
        .load
        .as_ref()
        .and_then(load_report::throughput_vs_ceiling)
    {
        Some((best, offered, ceiling, bound)) => v.push(Verdict {
            budget: load_budget,
            measured: format!(
                "{:.2} ({} orders/s at {} offered vs a ceiling of {} orders/s, bound by {bound})",
                best / ceiling,
                num(best),
                num(offered),
                num(ceiling)
            ),
            met: best / ceiling >= CEILING_FRACTION_BUDGET,
        }),
        None => missing(&load_budget, &mut v),
    }
    v
}

/// Writes `report.md`, `cold-start.svg` and `peak-rss.svg` into `dir`; returns the verdicts.
pub fn write(dir: &Path, repo_root: &Path, check_budgets: bool) -> std::io::Result<Vec<Verdict>> {
    let inputs = Inputs::read(dir);
    let verdicts = verdicts(&inputs, check_budgets);
    let memory_mb = template_memory_mb(repo_root);
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark report\n");
    if let Some(p) = &inputs.peers {
        let m = &p.machine;
        let _ = writeln!(
            md,
            "Measured {} at commit `{}` on {} ({} cores, {} GiB, Linux {} {}); {}, {}, {}. \
             Whatever else runs on the machine, the runtimes' runs are interleaved so that its \
             noise hits every runtime alike, and medians are reported; the load section gives \
             the load average before and after its run.\n",
            m.date_utc,
            m.git_commit,
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            m.arch,
            m.node,
            m.python,
            m.rustc
        );
    }
    let _ = writeln!(md, "## Budgets\n");
    if verdicts.is_empty() {
        let _ = writeln!(md, "Not checked in this run.\n");
    } else {
        let _ = writeln!(md, "| budget | measured | verdict |\n|---|---|---|");
        for v in &verdicts {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                v.budget,
                v.measured,
                if v.met { "met" } else { "**MISSED**" }
            );
        }
        md.push('\n');
    }
    let summaries: Vec<Summary> = inputs
        .peers
        .as_ref()
        .map(|p| p.runtimes.iter().map(Summary::of).collect())
        .unwrap_or_default();
    let rust = summaries.iter().find(|s| s.name == BASELINE);
    if let Some(p) = &inputs.peers {
        write_peers(&mut md, dir, p, &summaries, rust)?;
    }
    if let Some(c) = &inputs.cold_start {
        let _ = writeln!(
            md,
            "## Every function: process start to first `/next`\n\nThe release binary of each function, built for this machine, started {} times on a fake Runtime API with dummy configuration (nothing is called before the first event). Budget: median ≤ {COLD_START_BUDGET_MS} ms.\n\n| function | min ms | median | p95 | max |\n|---|---|---|---|---|",
            c.functions.first().map_or(0, |f| f.samples_ms.len())
        );
        for f in &c.functions {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                f.name,
                num(percentile(&f.samples_ms, 0.0)),
                num(median(&f.samples_ms)),
                num(percentile(&f.samples_ms, 0.95)),
                num(percentile(&f.samples_ms, 1.0))
            );
        }
        let _ = writeln!(md, "\nMeasured by: `{}`\n", c.command);
    }
    if let Some(s) = &inputs.sizes {
        let _ = writeln!(
            md,
            "## Artifact sizes\n\nThe arm64 `bootstrap` of each function as `sam build` makes it (budget {SIZE_BUDGET_BYTES} bytes), and for reference the same binaries built for this machine.\n\n| function | arm64 bytes | MiB | host bytes |\n|---|---|---|---|"
        );
        for (name, bytes) in &s.artifacts {
            let host = s
                .host
                .iter()
                .find(|(n, _)| n == name)
                .map_or("–".to_string(), |(_, b)| b.to_string());
            let _ = writeln!(
                md,
                "| {name} | {bytes} | {:.2} | {host} |",
                *bytes as f64 / 1_048_576.0
            );
        }
        let _ = writeln!(md, "\nMeasured by: `{}`\n", s.command);
    }
    if let Some(c) = &inputs.calls {
        write_calls(&mut md, c);
    }
    if let Some(l) = &inputs.load {
        load_report::write(&mut md, dir, l)?;
    }
    if let Some(c) = &inputs.calls
        && let (Some(r), Some(order)) = (rust, c.orders.first())
    {
        let node = summaries.iter().find(|s| s.name == REFERENCE_PEER);
        let measured = inputs.load.as_ref().and_then(|l| {
            load_report::reference_step(l).map(|s| MeasuredFunctions {
                offered_per_s: s.offered_per_s,
                functions: load_report::per_function(s),
            })
        });
        write_projection(&mut md, r, node, order, memory_mb, measured.as_ref());
    }
    let _ = writeln!(
        md,
        "## Reproduce\n\n```\nmake bench          # installs the peers, measures everything, writes target/bench/report.md, exits non-zero on a missed budget\nBENCH_RATES=5,10 BENCH_STEP_SECONDS=10 make bench   # a shorter load phase\n```\n\nThe raw samples are in `peers.json`, `cold-start.json`, `sizes.json`, `calls.json` and `load.json` beside this report; `target/debug/saga-bench report --dir target/bench` rewrites the report from them."
    );
    std::fs::write(dir.join("report.md"), md)?;
    Ok(verdicts)
}

/// Where a plot's whisker runs, from a runtime's summary.
type RangeOf = fn(&Summary) -> (f64, f64);

fn write_peers(
    md: &mut String,
    dir: &Path,
    p: &PeersRun,
    summaries: &[Summary],
    rust: Option<&Summary>,
) -> std::io::Result<()> {
    let _ = writeln!(
        md,
        "## One function, side by side\n\n\
         The stock function's work for one ReserveStock event (two lines): one DynamoDB \
         TransactWriteItems that reserves every line with `quantity >= :n` and records the step, \
         then one SQS SendMessage of the result. Each runtime runs as its own process on the same \
         fake Lambda Runtime API (`infra/runner/src/bench/runtime_api.rs`), against the same \
         DynamoDB Local and moto, with Lambda's environment (128 MB declared; not enforced). \
         {} rounds; in each, every runtime is started once (the order rotates every round), \
         gets one first event and {} warm ones, one at a time as Lambda gives them, and is \
         stopped. Every answer must report no batch item failure, and the products' stock must \
         have gone down by exactly the number of events, or the run fails.\n\n\
         - **init**: process start to its first `GET /2018-06-01/runtime/invocation/next` \
         (median of {} starts; p10–p90 in the plot)\n\
         - **first event**: the first invocation's duration, event handed out to response received (median)\n\
         - **warm p50 / p99**: the other invocations' durations ({} per runtime)\n\
         - **peak RSS**: the process's `VmHWM` after its events (median over starts)\n",
        p.rounds,
        p.warm_per_round,
        p.rounds,
        p.rounds * p.warm_per_round
    );
    let _ = writeln!(
        md,
        "| runtime | init ms | × Rust | first event ms | × Rust | warm p50 ms | × Rust | warm p99 ms | × Rust | peak RSS MiB | × Rust |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in summaries {
        let base = |f: fn(&Summary) -> f64| rust.map_or(f64::NAN, f);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            num(s.init),
            ratio(s.init, base(|r| r.init)),
            num(s.first),
            ratio(s.first, base(|r| r.first)),
            num(s.warm_p50),
            ratio(s.warm_p50, base(|r| r.warm_p50)),
            num(s.warm_p99),
            ratio(s.warm_p99, base(|r| r.warm_p99)),
            num(s.rss_mib),
            ratio(s.rss_mib, base(|r| r.rss_mib)),
        );
    }
    let _ = writeln!(
        md,
        "\n![Init per runtime](cold-start.svg)\n\n![Peak RSS per runtime](peak-rss.svg)\n\n\
         The durations include the calls to DynamoDB Local and moto on this machine, which take \
         most of each event; on AWS the services answer in single-digit milliseconds and a \
         128 MB function gets a fraction of a vCPU, so the runtimes' own CPU time weighs more \
         there than here.\n\nHow each runtime was started (in its folder):\n"
    );
    for r in &p.runtimes {
        let _ = writeln!(md, "- {}: `{}` (in `{}`)", r.name, r.command, r.cwd);
    }
    let _ = writeln!(md, "\nMeasured by: `{}` ({:.0} s)\n", p.command, p.seconds);
    let bars = |value: fn(&Summary) -> f64, range: Option<RangeOf>, unit: &str| {
        summaries
            .iter()
            .map(|s| Bar {
                label: s.name.clone(),
                value: value(s),
                range: range.map(|f| f(s)),
                text: format!(
                    "{} {unit}{}",
                    num(value(s)),
                    match rust {
                        Some(r) if r.name != s.name => format!(" ({})", ratio(value(s), value(r))),
                        _ => String::new(),
                    }
                ),
                highlight: s.name == BASELINE,
            })
            .collect::<Vec<_>>()
    };
    std::fs::write(
        dir.join("cold-start.svg"),
        svg::bar_chart(
            "Init: process start to first /next (median, p10–p90)",
            "milliseconds",
            &bars(|s| s.init, Some(|s| (s.init_p10, s.init_p90)), "ms"),
        ),
    )?;
    std::fs::write(
        dir.join("peak-rss.svg"),
        svg::bar_chart(
            "Peak RSS after the events (median over starts)",
            "MiB",
            &bars(|s| s.rss_mib, None, "MiB"),
        ),
    )?;
    Ok(())
}

fn write_calls(md: &mut String, c: &CallsRun) {
    let _ = writeln!(
        md,
        "## AWS calls per confirmed order\n\nEvery AWS call the saga makes for one order of two items on the local stack, counted by an SDK interceptor (the event source mapping's own receives and deletes are Lambda's, not the functions'; the payment simulator's ledger write stands for a provider's HTTPS call). Budget: at most {CALLS_BUDGET} calls.\n"
    );
    for o in &c.orders {
        let _ = writeln!(
            md,
            "**{}**: {} calls = {} DynamoDB writes + {} batch read + {} other reads + {} SQS sends + {} other ({} write units, {} read units); + {} simulator ledger write(s).\n\n| operation | calls |\n|---|---|",
            o.label,
            o.total,
            o.writes,
            o.batch_reads,
            o.other_reads,
            o.sends,
            o.other,
            o.write_units,
            o.read_units,
            o.provider_writes
        );
        for (op, n) in &o.by_operation {
            let _ = writeln!(md, "| {op} | {n} |");
        }
        md.push('\n');
    }
    let _ = writeln!(md, "Measured by: `{}`\n", c.command);
}

fn write_projection(
    md: &mut String,
    rust: &Summary,
    node: Option<&Summary>,
    order: &OrderCalls,
    memory_mb: u32,
    measured: Option<&MeasuredFunctions>,
) {
    let projections = project(rust, node, order, memory_mb, measured);
    let messages = order.sends;
    let measured = measured.filter(|m| !m.functions.is_empty());
    let durations = match measured {
        Some(m) => format!(
            "each function's invocations per order and median invocation time as measured under load at {} orders/s (the fastest rate step that kept up; below)",
            num(m.offered_per_s)
        ),
        None => "the stock function's measured warm p50 per runtime".to_string(),
    };
    let (invocations_formula, billed_formula) = match measured {
        Some(_) => (
            "- invocations = Σ over functions of the invocations per order measured under load (one per API request; one per SQS batch, so batching shows)"
                .to_string(),
            "- billed ms of a function = ⌈its p50 invocation time under load⌉ (Lambda bills whole milliseconds; a batch's invocation is billed once); GB-seconds = Σ over functions of invocations × (billed ms + {COLD} × ⌈init ms⌉) / 1000 × {MEM} MB / 1024. The Node.js design adds, to every invocation, how much longer the Node peer's warm p50 was than the Rust stock function's in the side-by-side run, and bills the Node peer's init"
                .to_string(),
        ),
        None => (
            format!(
                "- invocations = 1 (order API) + {messages} (one per SQS message, at batch size 1: the worst case; the template's batching window lets up to 10 messages share one invocation under load)"
            ),
            "- billed ms = ⌈warm p50⌉ (Lambda bills whole milliseconds); every function is taken to last as long as the measured stock function (each is one or two DynamoDB writes and one SQS send); GB-seconds = invocations × (billed ms + {COLD} × ⌈init ms⌉) / 1000 × {MEM} MB / 1024"
                .to_string(),
        ),
    };
    let billed_formula = billed_formula
        .replace("{COLD}", &COLD_SHARE.to_string())
        .replace("{MEM}", &memory_mb.to_string());
    let _ = writeln!(
        md,
        "## AWS projection\n\n\
         What one million confirmed orders would cost on AWS at list prices (us-east-1, \
         on-demand, arm64, no free tier), from the numbers above: the calls of an order \
         without `Idempotency-Key` ({} calls, {} SQS messages, {} write units, {} read units) \
         and {durations}.\n\n\
         Prices: Lambda ${:.10} per GB-second (arm64) and $0.20 per million requests; SQS $0.40 \
         per million requests; DynamoDB on-demand $0.625 per million write request units and \
         $0.125 per million read request units; API Gateway HTTP API $1.00 per million requests; \
         Step Functions Standard $0.025 per 1,000 state transitions.\n\n\
         Formulas, per order:\n\n\
         {invocations_formula}\n\
         {billed_formula} (the template's MemorySize; {:.0}% of invocations assumed cold, their \
         init billed as Lambda has billed init since August 2025)\n\
         - Lambda $ = invocations × $0.20/1M + GB-seconds × GB-second price\n\
         - SQS $ = 3 requests (send, receive, delete) × messages × $0.40/1M (empty long polls \
         not counted)\n\
         - DynamoDB $ = write units × $0.625/1M + read units × $0.125/1M\n\
         - Step Functions Standard: the same saga as a state machine (ReserveStock as a \
         DynamoDB TransactWriteItems task, ChargePayment as a Lambda task, ConfirmOrder as a \
         DynamoDB UpdateItem task, then Succeed): {SFN_TRANSITIONS} transitions per confirmed \
         order × $0.025/1,000, no SQS, 2 Lambda invocations (order API, charge{}), and the same \
         DynamoDB writes and API Gateway request.\n",
        order.total,
        messages,
        order.write_units,
        order.read_units,
        prices::LAMBDA_ARM_GB_SECOND,
        COLD_SHARE * 100.0,
        if measured.is_some() {
            ", each at its function's measured p50"
        } else {
            ""
        }
    );
    if let Some(m) = measured {
        let _ = writeln!(
            md,
            "Per function, under load at {} orders/s:\n\n| function | invocations per order | p50 invocation ms | billed ms |\n|---|---|---|---|",
            num(m.offered_per_s)
        );
        for (f, inv, p50) in &m.functions {
            let _ = writeln!(
                md,
                "| {f} | {} | {} | {} |",
                num(*inv),
                num(*p50),
                p50.ceil()
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "| design | invocations | billed ms each | GB-s per order | Lambda | SQS | DynamoDB | API Gateway | Step Functions | total per 1M orders |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &projections {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.6} | ${:.2} | ${:.2} | ${:.2} | ${:.2} | ${:.2} | **${:.2}** |",
            p.design,
            num(p.invocations),
            num(p.billed_ms),
            p.gb_seconds,
            p.lambda,
            p.sqs,
            p.dynamodb,
            p.api,
            p.sfn,
            p.total()
        );
    }
    if let Some(n) = node
        && n.rss_max_mib > memory_mb as f64
    {
        let _ = writeln!(
            md,
            "\nThe Node peer's peak RSS ({} MiB) is above {memory_mb} MB: it would need a larger memory size on Lambda, which this projection does not charge for.",
            num(n.rss_max_mib)
        );
    }
    let _ = writeln!(
        md,
        "\nComputed from what the commands under \"AWS calls per confirmed order\", \"One function, side by side\"{} measured.",
        if measured.is_some() {
            " and \"The whole saga under open-loop load\""
        } else {
            ""
        }
    );
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(name: &str, init: f64, warm: f64, rss_kib: u64) -> RuntimeSamples {
        RuntimeSamples {
            name: name.into(),
            init_ms: vec![init; 3],
            first_ms: vec![warm * 2.0; 3],
            warm_ms: vec![warm; 10],
            peak_rss_kib: vec![rss_kib; 3],
            ..Default::default()
        }
    }

    fn order() -> OrderCalls {
        OrderCalls {
            label: "without Idempotency-Key".into(),
            by_operation: Default::default(),
            writes: 7,
            batch_reads: 1,
            other_reads: 0,
            sends: 4,
            other: 0,
            provider_writes: 1,
            total: 12,
            write_units: 20.0,
            read_units: 2.0,
            within_budget: true,
        }
    }

    #[test]
    fn when_rust_is_not_20x_faster_or_a_quarter_the_memory_should_miss_those_budgets() {
        let peers = |node_init: f64, node_rss: u64| PeersRun {
            command: "x".into(),
            machine: Default::default(),
            rounds: 3,
            warm_per_round: 10,
            seconds: 1.0,
            runtimes: vec![
                samples("rust", 5.0, 4.0, 10_240),
                samples("node", node_init, 8.0, node_rss),
            ],
        };
        let inputs = |p| Inputs {
            peers: Some(p),
            cold_start: None,
            sizes: None,
            calls: None,
            load: None,
        };
        let v = verdicts(&inputs(peers(250.0, 81_920)), false);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|v| v.met), "{v:?}");
        let v = verdicts(&inputs(peers(50.0, 30_000)), false);
        assert!(v.iter().all(|v| !v.met), "{v:?}");
        // Checking every budget: what was not measured is missed.
        let v = verdicts(&inputs(peers(250.0, 81_920)), true);
        assert_eq!(v.iter().filter(|v| !v.met).count(), 4, "{v:?}");
        assert!(
            v.iter()
                .filter(|v| !v.met)
                .all(|v| v.measured == "not measured")
        );
    }

    #[test]
    fn projection_follows_its_formulas() {
        let rust = Summary::of(&samples("rust", 5.0, 3.2, 10_240));
        let node = Summary::of(&samples("node", 250.0, 7.5, 81_920));
        let p = project(&rust, Some(&node), &order(), 128, None);
        assert_eq!(p.len(), 3);
        // 5 invocations of ⌈3.2⌉ = 4 ms, plus 1% of a 5 ms init, at 0.125 GB.
        let gbs = 5.0 * (4.0 + 0.01 * 5.0) / 1000.0 * 0.125;
        assert!((p[0].gb_seconds - gbs).abs() < 1e-12);
        let lambda = 1e6 * (5.0 * 0.2e-6 + gbs * prices::LAMBDA_ARM_GB_SECOND);
        assert!((p[0].lambda - lambda).abs() < 1e-9);
        assert!((p[0].sqs - 1e6 * 12.0 * 0.4e-6).abs() < 1e-9);
        assert!((p[0].dynamodb - (20.0 * 0.625 + 2.0 * 0.125)).abs() < 1e-9);
        assert_eq!(p[1].billed_ms, 8.0);
        assert!(p[1].lambda > p[0].lambda);
        assert!((p[2].sfn - 100.0).abs() < 1e-9);
        assert_eq!(p[2].sqs, 0.0);
        assert_eq!(p[2].invocations, 2.0);
    }

    #[test]
    fn when_functions_were_measured_under_load_the_projection_bills_each_its_own() {
        let rust = Summary::of(&samples("rust", 5.0, 3.2, 10_240));
        let node = Summary::of(&samples("node", 250.0, 7.5, 81_920));
        let measured = MeasuredFunctions {
            offered_per_s: 50.0,
            functions: vec![
                ("OrderApiFunction".into(), 1.0, 11.2),
                ("StockFunction".into(), 0.5, 20.0),
                ("PaymentFunction".into(), 0.5, 30.5),
                ("CoordinatorFunction".into(), 1.0, 9.0),
            ],
        };
        let p = project(&rust, Some(&node), &order(), 128, Some(&measured));
        assert_eq!(p[0].invocations, 3.0);
        // 1 × ⌈11.2⌉ + 0.5 × 20 + 0.5 × ⌈30.5⌉ + 1 × 9 = 12 + 10 + 15.5 + 9, plus 1% of a 5 ms
        // init per invocation.
        let gbs = (46.5 + 3.0 * 0.01 * 5.0) / 1000.0 * 0.125;
        assert!((p[0].gb_seconds - gbs).abs() < 1e-12, "{:?}", p[0]);
        assert!((p[0].billed_ms - 46.5 / 3.0).abs() < 1e-9);
        // Node: every invocation 7.5 - 3.2 = 4.3 ms longer, and its own init.
        let node_gbs = (1.0 * 16.0 + 0.5 * 25.0 + 0.5 * 35.0 + 1.0 * 14.0 + 3.0 * 0.01 * 250.0)
            / 1000.0
            * 0.125;
        assert!((p[1].gb_seconds - node_gbs).abs() < 1e-12, "{:?}", p[1]);
        // Step Functions: the API and the charge, each once, at their own p50.
        assert_eq!(p[2].invocations, 2.0);
        assert!((p[2].billed_ms - (12.0 + 31.0) / 2.0).abs() < 1e-9);
    }
}
