//! The report's section on the whole saga under load (`load.json`), its two plots, its
//! budget, and the per-function durations the AWS projection takes from it.

use std::fmt::Write as _;
use std::path::Path;

use super::load::{LoadRun, Step, ceiling_of, needs_per_order};
use super::svg::{self, Axis, Level, Series};

/// Budget: the saga's best achieved throughput is at least this share of the emulators'
/// ceiling.
pub const CEILING_FRACTION_BUDGET: f64 = 0.5;

/// The functions that run on SQS (their invocations are the ones batching saves).
fn is_sqs_function(hop: &super::load::Hop) -> bool {
    hop.queue_wait_ms.n > 0
}

/// The saga's best step and the ceiling: (best achieved, the step's offered rate, ceiling in
/// orders/s, what bounds it).
pub fn throughput_vs_ceiling(run: &LoadRun) -> Option<(f64, f64, f64, String)> {
    let ceiling = ceiling_of(&run.ceiling, &needs_per_order(&run.steps))?;
    let best = run
        .steps
        .iter()
        .max_by(|a, b| a.achieved_per_s.total_cmp(&b.achieved_per_s))?;
    Some((
        best.achieved_per_s,
        best.offered_per_s,
        ceiling.orders_per_s,
        ceiling.bound_by,
    ))
}

/// The step the projection takes its durations from: the fastest step that kept up, or the
/// first if none did.
pub fn reference_step(run: &LoadRun) -> Option<&Step> {
    run.steps
        .iter()
        .filter(|s| !s.saturated)
        .max_by(|a, b| a.offered_per_s.total_cmp(&b.offered_per_s))
        .or(run.steps.first())
}

/// Each function's invocations per final order and median invocation time (ms) in `step`.
pub fn per_function(step: &Step) -> Vec<(String, f64, f64)> {
    let finals = step.finals().max(1) as f64;
    step.hops
        .iter()
        .filter(|h| h.invocations > 0)
        .map(|h| {
            (
                h.function.clone(),
                h.invocations as f64 / finals,
                h.handler_ms.p50,
            )
        })
        .collect()
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

/// Up to `n` points of a sorted sample's empirical CDF.
fn cdf(sorted: &[f64], n: usize) -> Vec<(f64, f64)> {
    if sorted.is_empty() {
        return Vec::new();
    }
    let len = sorted.len();
    let every = len.div_ceil(n).max(1);
    let mut pts: Vec<(f64, f64)> = (0..len)
        .filter(|i| i % every == 0 || *i == len - 1)
        .map(|i| (sorted[i], (i + 1) as f64 / len as f64))
        .collect();
    pts.dedup_by(|a, b| a.0 == b.0 && a.1 <= b.1);
    pts
}

/// Writes the section and its plots (`latency-cdf.svg`, `throughput.svg`).
pub fn write(md: &mut String, dir: &Path, run: &LoadRun) -> std::io::Result<()> {
    let _ = writeln!(
        md,
        "## The whole saga under open-loop load\n\n\
         The stack of `make run`, in the benchmark's process: tables, queues and user pool from \
         `template.yaml` (under a prefix of their own), the HTTP API with its JWT authorizer, \
         every SQS function on its event source mapping with the template's settings (batch \
         size {}, batching window {} s, MaximumConcurrency {}, 20 s long polls; unlike `make run`, \
         a batch keeps gathering until its window ends or it is full, as Lambda's does), the sweeper on \
         its schedule, the payment simulator declining {:.0}% of charges at random (`make run`'s \
         default). An operator seeds {} products through the API (`PUT /products/{{id}}`); a \
         signed-in customer's orders (`POST /orders` with a bearer token, {} distinct products \
         of one unit each, picked at random) are issued on a fixed schedule: order i at i / rate \
         seconds, whatever the answers, each on its own task (open loop).\n\n\
         - **latency**: `POST /orders` sent to the moment the order became `CONFIRMED` or \
         `CANCELLED` (the coordinator's `UpdateItem` that returned it so; the orders table keeps \
         no final timestamp of its own)\n\
         - **achieved**: the rate at which orders became final in the step's steady state: the \
         orders that became final during the second half of the sending, per second, at most the \
         offered rate (a stack that keeps up achieves the offered rate whatever its latency; a \
         saturated one, what it serves while the load is offered, not the faster drain after \
         it)\n\
         - a step is **saturated** when it achieved less than 90% of the offered rate, left an \
         order unfinished, or had more than 10 s of offered orders outstanding (it then stops \
         sending); the rates above it are not run\n\
         - **where the time goes**, from a probe in the stack (`infra/runner/src/timing.rs`): \
         each message's queue wait (`SentTimestamp` to the mapping's first receive) and batching \
         wait (that receive to the invocation), each invocation's handler time, and every AWS \
         call each function's clients make, timed by an SDK interceptor\n\n\
         Load average (1, 5, 15 min) when the run started: {}; when it ended: {}.\n",
        run.template_batch_size,
        num(run.template_window_s),
        run.template_concurrency,
        run.payment_failure_rate * 100.0,
        run.products,
        run.lines,
        run.load_before,
        run.load_after
    );
    write_ceiling(md, run);
    write_steps(md, run);
    write_hops(md, run);
    write_windows(md, run);
    let _ = writeln!(
        md,
        "Measured by: `{}` ({:.0} s)\n",
        run.command, run.seconds
    );
    plots(dir, run)
}

fn write_ceiling(md: &mut String, run: &LoadRun) {
    let _ = writeln!(
        md,
        "### The emulators' ceiling\n\n\
         DynamoDB Local and moto driven by client loops alone, before the rate steps: the stock \
         function's reservation transaction itself (`DynamoStock::reserve`: the \
         `{{orderId}}#reserve` record and a `quantity >= :n` update per line, {} lines from the \
         same {} products), `SendMessage` of a saga-sized message, `ReceiveMessage` of 10 at a \
         time (what was sent), `DeleteMessageBatch` of 10 (what was received), each from N \
         concurrent tasks.\n\n\
         | operation | tasks | calls/s | items/s | call p50 ms | call p99 ms | failed |\n|---|---|---|---|---|---|---|",
        run.lines, run.products
    );
    for r in &run.ceiling {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.operation,
            r.concurrency,
            num(r.calls_per_s),
            num(r.items_per_s),
            num(r.call_ms.p50),
            num(r.call_ms.p99),
            r.failed
        );
    }
    let needs = needs_per_order(&run.steps);
    if let Some(c) = ceiling_of(&run.ceiling, &needs) {
        let _ = writeln!(
            md,
            "\nIn orders per second: each operation's best rate divided by what one order needed \
             of it in the rate steps (transactions and `SendMessage` calls counted by the probe, \
             messages received and deleted = messages handed to functions). moto serves all \
             three SQS operations from one Python process, so an order's sends, receives and \
             deletes share it: their bound together is 1 / Σ (needed per order / best rate). The \
             ceiling is the tightest bound. It is an estimate: client loops of a few seconds on \
             a machine where the emulators' speed moves by a fifth from run to run, receiving \
             and deleting 10 messages a call where the saga's batches are often smaller, and \
             leaving out the saga's other DynamoDB writes (the order, the payment steps, the \
             coordinator's updates) and the CPU the stack and DynamoDB Local take from moto.\n\n\
             | operation | best items/s | per order | orders/s it allows |\n|---|---|---|---|"
        );
        for (op, best, per, allows) in &c.bounds {
            let cell = |v: f64| {
                if v.is_finite() {
                    num(v)
                } else {
                    "–".to_string()
                }
            };
            let _ = writeln!(
                md,
                "| {op} | {} | {} | {} |",
                cell(*best),
                cell(*per),
                num(*allows)
            );
        }
        if let Some((best, offered, ceiling, bound)) = throughput_vs_ceiling(run) {
            let _ = writeln!(
                md,
                "\n**Ceiling: {} orders/s** (bound by {bound}). The saga's best: {} orders/s \
                 (offered {}/s) = **{:.2} of the ceiling** (budget ≥ {CEILING_FRACTION_BUDGET}).\n",
                num(ceiling),
                num(best),
                num(offered),
                best / ceiling
            );
        }
    } else {
        md.push('\n');
    }
}

fn write_steps(md: &mut String, run: &LoadRun) {
    let ceiling = ceiling_of(&run.ceiling, &needs_per_order(&run.steps)).map(|c| c.orders_per_s);
    let _ = writeln!(
        md,
        "### Rate steps\n\n\
         | offered/s | s | sent | achieved/s | of ceiling | confirmed | cancelled | unfinished | refused | p50 ms | p95 ms | p99 ms | POST p50 ms | invocations per order | note |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &run.steps {
        let l = s.latency();
        let mut note = Vec::new();
        if s.saturated {
            note.push("saturated".to_string());
        }
        if let Some(e) = &s.stopped_early {
            note.push(format!("stopped: {e}"));
        }
        if s.final_in_table < s.finals() {
            note.push(format!("{} final in the table", s.final_in_table));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(s.offered_per_s),
            num(s.planned_seconds),
            s.sent,
            num(s.achieved_per_s),
            ceiling.map_or("–".into(), |c| format!("{:.2}", s.achieved_per_s / c)),
            s.confirmed,
            s.cancelled,
            s.unfinished,
            s.refused.values().sum::<usize>(),
            num(l.p50),
            num(l.p95),
            num(l.p99),
            num(s.post_ms.p50),
            num(s.invocations_per_order),
            note.join("; ")
        );
    }
    if !run.skipped_rates.is_empty() {
        let _ = writeln!(
            md,
            "\nNot run (a lower rate saturated): {} orders/s.",
            run.skipped_rates
                .iter()
                .map(|r| num(*r))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\n![Order-to-final latency CDF per offered rate](latency-cdf.svg)\n\n\
         ![Achieved against offered throughput, with the emulators' ceiling](throughput.svg)\n"
    );
}

fn write_hops(md: &mut String, run: &LoadRun) {
    let _ = writeln!(
        md,
        "### Where the time goes\n\n\
         Per function and step: messages' queue and batching waits (first deliveries), \
         invocations' handler time, and the handler's own AWS calls (per record handled, and \
         each call's time; the records of a batch run concurrently, so call times can add up \
         to more than the handler's). The mapping's receive and delete are Lambda's calls, not \
         the function's: listed apart (a receive's time includes its long poll's wait for a \
         message). All times in ms, p50 / p95.\n\n\
         | offered/s | function | invocations | records per invocation | queue wait | batching wait | handler | DynamoDB calls per record | DynamoDB call | SQS sends per record | SQS send | mapping receive / delete p50 |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let pair = |q: &super::load::Quantiles| {
        if q.n == 0 {
            "–".to_string()
        } else {
            format!("{} / {}", num(q.p50), num(q.p95))
        }
    };
    for s in &run.steps {
        for h in s.hops.iter().filter(|h| h.invocations > 0) {
            let handler_calls = |service: &str| {
                let calls: Vec<&super::load::CallStats> = h
                    .calls
                    .iter()
                    .filter(|c| c.service == service && !c.mapping)
                    .collect();
                let n: usize = calls.iter().map(|c| c.calls).sum();
                // The p50 of the busiest operation stands for the service.
                let busiest = calls.iter().max_by_key(|c| c.calls);
                (
                    n as f64 / h.records.max(1) as f64,
                    busiest.map_or("–".into(), |c| {
                        format!("{} / {} ({})", num(c.ms.p50), num(c.ms.p95), c.operation)
                    }),
                )
            };
            let (ddb_n, ddb) = handler_calls("DynamoDB");
            let (sqs_n, sqs) = handler_calls("SQS");
            let mapping = |op: &str| {
                h.calls
                    .iter()
                    .find(|c| c.operation == op)
                    .map_or("–".into(), |c| num(c.ms.p50))
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(s.offered_per_s),
                h.function,
                h.invocations,
                num(h.records as f64 / h.invocations.max(1) as f64),
                pair(&h.queue_wait_ms),
                pair(&h.batching_wait_ms),
                pair(&h.handler_ms),
                num(ddb_n),
                ddb,
                num(sqs_n),
                sqs,
                if is_sqs_function(h) {
                    format!(
                        "{} / {}",
                        mapping("ReceiveMessage"),
                        mapping("DeleteMessageBatch")
                    )
                } else {
                    "–".into()
                }
            );
        }
    }
    if let Some(step) = reference_step(run) {
        let _ = writeln!(
            md,
            "\nEvery AWS call at {} orders/s, per final order (ms: p50 / p95 / p99; the sweeper's \
             schedule included):\n\n| function | call | per order | p50 | p95 | p99 | failed |\n|---|---|---|---|---|---|---|",
            num(step.offered_per_s)
        );
        let finals = step.finals().max(1) as f64;
        for h in &step.hops {
            for c in &h.calls {
                let _ = writeln!(
                    md,
                    "| {} | {} {}{} | {} | {} | {} | {} | {} |",
                    h.function,
                    c.service,
                    c.operation,
                    if c.mapping { " (mapping)" } else { "" },
                    num(c.calls as f64 / finals),
                    num(c.ms.p50),
                    num(c.ms.p95),
                    num(c.ms.p99),
                    c.failed
                );
            }
        }
        md.push('\n');
    }
}

fn write_windows(md: &mut String, run: &LoadRun) {
    if run.windows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### The batching window\n\n\
         The same load on stacks whose SQS event sources all use one `MaximumBatchingWindowInSeconds` \
         (everything else as above). Invocations count the three SQS functions' (the order \
         API's one per order is left out).\n\n\
         | window s | offered/s | achieved/s | SQS invocations per order | records per invocation | batching wait p50 ms (slowest function) | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|"
    );
    let sqs = |s: &Step| {
        let finals = s.finals().max(1) as f64;
        let hops: Vec<&super::load::Hop> = s.hops.iter().filter(|h| is_sqs_function(h)).collect();
        let inv: usize = hops.iter().map(|h| h.invocations).sum();
        let rec: usize = hops.iter().map(|h| h.records).sum();
        let waits: Vec<f64> = hops
            .iter()
            .filter(|h| h.batching_wait_ms.n > 0)
            .map(|h| h.batching_wait_ms.p50)
            .collect();
        (
            inv as f64 / finals,
            rec as f64 / inv.max(1) as f64,
            waits.iter().copied().fold(0.0_f64, f64::max),
        )
    };
    let mut windows = run.windows.clone();
    windows.sort_by(|a, b| {
        a.offered_per_s
            .total_cmp(&b.offered_per_s)
            .then(a.batching_window_s.total_cmp(&b.batching_window_s))
    });
    for s in &windows {
        let (inv, rec, wait) = sqs(s);
        let l = s.latency();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(s.batching_window_s),
            num(s.offered_per_s),
            num(s.achieved_per_s),
            num(inv),
            num(rec),
            num(wait),
            num(l.p50),
            num(l.p95),
            num(l.p99)
        );
    }
    // The template's setting against no window, rate by rate.
    let mut lines = Vec::new();
    let mut last = None;
    for s in windows
        .iter()
        .filter(|s| s.batching_window_s == run.template_window_s && s.batching_window_s > 0.0)
    {
        let Some(zero) = windows
            .iter()
            .find(|z| z.batching_window_s == 0.0 && z.offered_per_s == s.offered_per_s)
        else {
            continue;
        };
        let (inv, _, _) = sqs(s);
        let (inv0, _, _) = sqs(zero);
        let saved = if inv0 > 0.0 { 1.0 - inv / inv0 } else { 0.0 };
        let cost = s.latency().p50 - zero.latency().p50;
        lines.push(format!(
            "at {} orders/s the {} s window costs {} ms at p50 and {} ms at p99, and {} of \
             the SQS functions' invocations ({} instead of {} per order)",
            num(s.offered_per_s),
            num(s.batching_window_s),
            signed(cost),
            signed(s.latency().p99 - zero.latency().p99),
            if saved > 0.0 {
                format!("saves {:.0}%", saved * 100.0)
            } else {
                format!("saves none ({}%)", signed(saved * 100.0))
            },
            num(inv),
            num(inv0)
        ));
        last = Some((s.offered_per_s, saved, cost, s.saturated || zero.saturated));
    }
    let Some((rate, saved, cost, saturated)) = last else {
        md.push('\n');
        return;
    };
    let verdict = if saturated {
        format!(
            "At {} orders/s the stack was saturated, so latency there is queueing, not the \
             window; the comparison that counts is at the rates that kept up.",
            num(rate)
        )
    } else if saved >= WINDOW_SAVING_THRESHOLD {
        format!(
            "At {} orders/s the window saves {:.0}% of the invocations for {} ms at p50: by this \
             report's rule (a window is worth it when it saves at least 20% of the SQS \
             functions' invocations at a rate the stack keeps up with) the numbers support the \
             template's setting once traffic fills batches.",
            num(rate),
            saved * 100.0,
            signed(cost)
        )
    } else {
        format!(
            "At {} orders/s the window saves only {:.0}% of the invocations (for {} ms at \
             p50): by this report's rule (a window is worth it when it saves at least 20% of the \
             SQS functions' invocations at a rate the stack keeps up with) this run does not \
             justify the template's setting; it pays off only at rates where batches fill.",
            num(rate),
            saved * 100.0,
            signed(cost)
        )
    };
    let _ = writeln!(
        md,
        "\nThe template's setting against none: {}.\n\n{verdict}\n\n\
         How far this carries to AWS: here, as on Lambda, a batch gathers until its window \
         ends or it holds 10 messages (`infra/runner/src/esm.rs`: the rest of the window is \
         waited out, then what arrived is received), so at light traffic each SQS hop on an \
         order's path (stock and payment in parallel, then the coordinator: two in a row) waits \
         up to a whole window, as measured above. `make run` and the tests hand a batch over at \
         the first empty receive instead, so they do not pay that wait.\n",
        lines.join("; ")
    );
}

/// A window that saves less than this share of the invocations is not worth its latency.
const WINDOW_SAVING_THRESHOLD: f64 = 0.2;

fn signed(v: f64) -> String {
    if v >= 0.0 {
        format!("+{}", num(v))
    } else {
        format!("−{}", num(-v))
    }
}

fn plots(dir: &Path, run: &LoadRun) -> std::io::Result<()> {
    let series: Vec<Series> = run
        .steps
        .iter()
        .map(|s| Series {
            label: format!("{} orders/s", num(s.offered_per_s)),
            points: cdf(&s.latency_ms, 200),
            dashed: false,
            markers: false,
        })
        .collect();
    std::fs::write(
        dir.join("latency-cdf.svg"),
        svg::line_chart(
            "Order-to-final latency, CDF per offered rate",
            "POST /orders to CONFIRMED or CANCELLED, ms (log scale)",
            "share of orders",
            Axis::Log,
            Some(1.0),
            &series,
            &[],
        ),
    )?;
    let achieved = Series {
        label: "achieved".into(),
        points: run
            .steps
            .iter()
            .map(|s| (s.offered_per_s, s.achieved_per_s))
            .collect(),
        dashed: false,
        markers: true,
    };
    let top = run
        .steps
        .iter()
        .map(|s| s.offered_per_s)
        .fold(0.0_f64, f64::max);
    let offered = Series {
        label: "offered".into(),
        points: vec![(0.0, 0.0), (top, top)],
        dashed: true,
        markers: false,
    };
    let levels: Vec<Level> = ceiling_of(&run.ceiling, &needs_per_order(&run.steps))
        .map(|c| Level {
            label: format!("ceiling {}/s", num(c.orders_per_s)),
            y: c.orders_per_s,
        })
        .into_iter()
        .collect();
    std::fs::write(
        dir.join("throughput.svg"),
        svg::line_chart(
            "Throughput against offered rate",
            "offered, orders/s",
            "achieved, orders/s",
            Axis::Linear,
            None,
            &[achieved, offered],
            &levels,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cdf_ends_at_one_and_keeps_at_most_n_points() {
        let s: Vec<f64> = (1..=1000).map(f64::from).collect();
        let c = cdf(&s, 100);
        assert!(c.len() <= 101, "{}", c.len());
        assert_eq!(c.last(), Some(&(1000.0, 1.0)));
        assert_eq!(c[0], (1.0, 0.001));
        assert!(cdf(&[], 10).is_empty());
    }
}
