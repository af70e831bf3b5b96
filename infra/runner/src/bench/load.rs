//! The whole saga under open-loop load (`saga-bench load`, part of `make bench`).
//!
//! Three measurements, each on stacks of its own (a unique prefix, deleted afterwards):
//!
//! 1. **The emulators' ceiling**: what DynamoDB Local and moto do when nothing but a client
//!    loop drives them. DynamoDB Local: the stock function's reservation transaction itself
//!    (`saga_core`'s `DynamoStock::reserve`: the `{orderId}#reserve` record plus a
//!    `quantity >= :n` update per line, on the same products), from N concurrent tasks. moto:
//!    `SendMessage` of a saga-sized message, then `ReceiveMessage` (10 at a time) of what was
//!    sent, then `DeleteMessageBatch` of what was received, each from N concurrent tasks.
//! 2. **Rate steps**: the stack as `make run` runs it (template settings, 20 s long polls, the
//!    payment simulator's default decline rate), products seeded through the API by an
//!    operator, then orders POSTed on a fixed schedule (order i at i / rate seconds, whatever
//!    the answers) for each offered rate in turn. Every order's latency is POST sent to the
//!    moment the coordinator's update made it `CONFIRMED` or `CANCELLED`
//!    ([`crate::timing`]); where the time went comes from the same probe. A step that cannot
//!    keep up (achieved below [`SATURATED`] of offered, orders left unfinished, or a backlog
//!    of more than [`BACKLOG_SECONDS`] of offered orders, which stops it early) ends the steps.
//! 3. **The batching window**: the same load at a few rates on stacks whose event source
//!    mappings use each window setting (0 and the template's), for invocations per order and
//!    latency.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue as A;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use super::{Machine, stats};
use crate::stack::{Stack, StackOptions, local_clients};
use crate::template::Template;
use crate::timing::{Probe, Samples};

/// A step whose achieved rate is below this share of the offered one is saturated.
pub const SATURATED: f64 = 0.9;
/// A step stops early when more than this many seconds of offered orders are outstanding.
pub const BACKLOG_SECONDS: f64 = 10.0;
/// Draining a step gives up when no order has become final for this long.
pub const STALL: Duration = Duration::from_secs(60);
/// The warm-up's rate on every new stack, before any step, orders/s.
pub const WARM_UP_RATE: f64 = 5.0;
/// The stock every load product starts with (never runs out).
const START_STOCK: u64 = 1_000_000_000;

/// What to measure.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub repo_root: PathBuf,
    pub dynamodb_endpoint: String,
    pub sqs_endpoint: String,
    /// Offered rates of the steps, orders per second, in order.
    pub rates: Vec<f64>,
    pub step_seconds: f64,
    /// Batching windows to compare, seconds; `None` is the template's.
    pub windows: Vec<Option<u32>>,
    pub window_rates: Vec<f64>,
    pub window_seconds: f64,
    /// Concurrency levels of the emulators' client loops (the best one is the ceiling).
    pub ceiling_concurrency: Vec<usize>,
    pub ceiling_seconds: f64,
    /// Products in the catalogue; each order takes `lines` distinct ones at random.
    pub products: usize,
    pub lines: usize,
    pub payment_failure_rate: f64,
    /// Seconds of warm-up on every new stack, at [`WARM_UP_RATE`], that no step counts.
    pub warm_up_seconds: f64,
    pub command: String,
    pub progress: bool,
}

/// Order statistics of some samples, ms.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Quantiles {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    pub fn of(samples: &[f64]) -> Self {
        let s = stats::sorted(samples);
        if s.is_empty() {
            return Self::default();
        }
        Quantiles {
            n: s.len(),
            mean: s.iter().sum::<f64>() / s.len() as f64,
            p50: stats::percentile(&s, 0.5),
            p95: stats::percentile(&s, 0.95),
            p99: stats::percentile(&s, 0.99),
            max: s[s.len() - 1],
        }
    }
}

/// One kind of AWS call one function made during a step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallStats {
    pub service: String,
    pub operation: String,
    /// Made by the event source mapping (receive, delete), not the handler.
    pub mapping: bool,
    pub calls: usize,
    pub failed: usize,
    pub ms: Quantiles,
}

/// One function (one hop of the saga) during a step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hop {
    pub function: String,
    pub invocations: usize,
    pub records: usize,
    /// Per message, first deliveries: sent to first received.
    pub queue_wait_ms: Quantiles,
    /// Per message, first deliveries: first received to handed to the function.
    pub batching_wait_ms: Quantiles,
    /// Per invocation.
    pub handler_ms: Quantiles,
    pub calls: Vec<CallStats>,
}

impl Hop {
    /// The handler's calls to `service` (`DynamoDB`, `SQS`): calls per record and their
    /// latencies, all operations together.
    pub fn handler_calls(&self, service: &str, samples: &Samples) -> (f64, Quantiles) {
        let ms: Vec<f64> = samples
            .calls
            .iter()
            .filter(|c| {
                c.function == self.function
                    && c.service == service
                    && !MAPPING_OPS.contains(&c.operation.as_str())
            })
            .map(|c| c.ms)
            .collect();
        (
            ms.len() as f64 / self.records.max(1) as f64,
            Quantiles::of(&ms),
        )
    }
}

/// What the event source mapping calls on the function's behalf.
pub const MAPPING_OPS: &[&str] = &["ReceiveMessage", "DeleteMessageBatch", "DeleteMessage"];

/// One offered rate, run for a while.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Step {
    pub offered_per_s: f64,
    /// The event source mappings' batching window, seconds.
    pub batching_window_s: f64,
    pub planned_seconds: f64,
    /// POSTs issued, and how many were answered 202.
    pub sent: usize,
    pub accepted: usize,
    /// Answers other than 202 (or no answer), by status ("error" for none).
    pub refused: BTreeMap<String, usize>,
    pub confirmed: usize,
    pub cancelled: usize,
    /// Accepted but not final when the drain gave up.
    pub unfinished: usize,
    /// Orders the orders table shows final after the step (read back from it).
    pub final_in_table: usize,
    /// First POST to last POST sent, s.
    pub send_seconds: f64,
    /// First POST to the last order final, s.
    pub seconds: f64,
    /// The rate at which orders became final: (final orders - 1) / (first final to last
    /// final). Unsaturated, it follows the offered rate; saturated, the completions spread
    /// out and it shows what the stack sustains.
    pub achieved_per_s: f64,
    /// How far behind its schedule the generator fell at worst, ms.
    pub generator_lag_ms: f64,
    /// Why the step stopped before its schedule ended, if it did.
    pub stopped_early: Option<String>,
    pub saturated: bool,
    /// Every final order's POST-to-final latency, ms, sorted.
    pub latency_ms: Vec<f64>,
    /// The POSTs' own answer times, ms.
    pub post_ms: Quantiles,
    pub hops: Vec<Hop>,
    /// AWS calls per final order, by `service operation` (the handlers' and the mappings').
    pub calls_per_order: BTreeMap<String, f64>,
    /// SQS messages handed to functions per final order.
    pub messages_per_order: f64,
    /// Invocations per final order, every function (the order API's included).
    pub invocations_per_order: f64,
    /// The accepted orders' ids (for reading them back; not written out).
    #[serde(skip)]
    pub order_ids: Vec<String>,
}

impl Step {
    pub fn latency(&self) -> Quantiles {
        Quantiles::of(&self.latency_ms)
    }

    pub fn finals(&self) -> usize {
        self.confirmed + self.cancelled
    }
}

/// One client loop against an emulator at one concurrency.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CeilingRun {
    /// `DynamoDB TransactWriteItems`, `SQS SendMessage`, `SQS ReceiveMessage`,
    /// `SQS DeleteMessageBatch`.
    pub operation: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub calls: usize,
    pub failed: usize,
    /// Items moved: transactions, messages sent, received or deleted.
    pub items: usize,
    pub calls_per_s: f64,
    pub items_per_s: f64,
    pub call_ms: Quantiles,
}

/// The whole run, as written to `load.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadRun {
    pub command: String,
    pub machine: Machine,
    /// `/proc/loadavg` when the run started and when it ended.
    pub load_before: String,
    pub load_after: String,
    pub seconds: f64,
    pub payment_failure_rate: f64,
    pub products: usize,
    pub lines: usize,
    /// The template's `MaximumBatchingWindowInSeconds`, `BatchSize` and
    /// `MaximumConcurrency` of the SQS event sources (the first one's).
    pub template_window_s: f64,
    pub template_batch_size: u32,
    pub template_concurrency: u32,
    pub ceiling: Vec<CeilingRun>,
    pub steps: Vec<Step>,
    /// Rates not run because an earlier step saturated.
    pub skipped_rates: Vec<f64>,
    pub windows: Vec<Step>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn say(opts: &LoadOptions, line: impl AsRef<str>) {
    if opts.progress {
        println!("{}", line.as_ref());
    }
}

/// Runs every measurement. Each stack's resources are deleted afterwards, whatever happens.
pub async fn measure(opts: &LoadOptions) -> Result<LoadRun, String> {
    let started = Instant::now();
    let template = Template::from_file(opts.repo_root.join("template.yaml"))
        .map_err(|e| format!("template.yaml: {e}"))?;
    let event = template
        .functions
        .iter()
        .flat_map(|f| f.sqs_events.iter())
        .next()
        .ok_or("the template has no SQS event source")?;
    let mut run = LoadRun {
        command: opts.command.clone(),
        machine: Machine::describe(&opts.repo_root),
        load_before: loadavg(),
        payment_failure_rate: opts.payment_failure_rate,
        products: opts.products,
        lines: opts.lines,
        template_window_s: event.batching_window_seconds as f64,
        template_batch_size: event.batch_size,
        template_concurrency: event.maximum_concurrency.unwrap_or(2),
        ..Default::default()
    };
    say(
        opts,
        format!(
            "the emulators' ceiling: client loops at concurrency {:?}, {} s each",
            opts.ceiling_concurrency, opts.ceiling_seconds
        ),
    );
    run.ceiling = ceiling(opts).await?;

    say(
        opts,
        format!(
            "rate steps {:?} orders/s, {} s each, on the stack of make run (batching window {} s)",
            opts.rates, opts.step_seconds, run.template_window_s
        ),
    );
    let mut rig = Box::pin(Rig::start(opts, None)).await?;
    let steps = async {
        let mut steps = Vec::new();
        for (i, &rate) in opts.rates.iter().enumerate() {
            let step = rig.step(opts, rate, opts.step_seconds).await?;
            let saturated = step.saturated;
            steps.push(step);
            if saturated {
                run.skipped_rates = opts.rates[i + 1..].to_vec();
                if !run.skipped_rates.is_empty() {
                    say(
                        opts,
                        format!(
                            "  saturated at {rate} orders/s: {:?} not run",
                            run.skipped_rates
                        ),
                    );
                }
                break;
            }
        }
        rig.check_table(&mut steps).await?;
        Ok::<_, String>(steps)
    }
    .await;
    rig.stop().await;
    run.steps = steps?;

    for window in &opts.windows {
        let seconds = window.map_or(run.template_window_s, f64::from);
        say(
            opts,
            format!(
                "batching window {seconds} s{}: rates {:?}, {} s each",
                if window.is_none() {
                    " (the template's)"
                } else {
                    ""
                },
                opts.window_rates,
                opts.window_seconds
            ),
        );
        let mut rig = Box::pin(Rig::start(opts, *window)).await?;
        let steps = async {
            let mut steps = Vec::new();
            for &rate in &opts.window_rates {
                steps.push(rig.step(opts, rate, opts.window_seconds).await?);
            }
            rig.check_table(&mut steps).await?;
            Ok::<_, String>(steps)
        }
        .await;
        rig.stop().await;
        run.windows.extend(steps?);
    }
    run.load_after = loadavg();
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// Who the load generator is: every request's headers come from here, so the auth scheme
/// lives in one place.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token: String,
}

impl Caller {
    /// The headers of a request with a JSON `body` (or none).
    pub fn headers(&self, json_body: bool) -> Vec<(&'static str, String)> {
        let mut h = vec![("authorization", format!("Bearer {}", self.token))];
        if json_body {
            h.push(("content-type", "application/json".into()));
        }
        h
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// Sends one request; the status and body, or what went wrong.
async fn request(
    client: &HttpClient,
    caller: &Caller,
    method: &str,
    uri: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let mut req = hyper::Request::builder().method(method).uri(uri);
    for (k, v) in caller.headers(body.is_some()) {
        req = req.header(k, v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// One stack under load, with its customer, its catalogue and its probe.
struct Rig {
    stack: Stack,
    opts: StackOptions,
    probe: Probe,
    client: HttpClient,
    customer: Caller,
    products: Vec<String>,
    window_s: f64,
    /// Orders accepted on this stack so far (the probe's finals are counted against it).
    accepted: Arc<AtomicUsize>,
}

/// An order as the generator placed it.
#[derive(Clone, Debug)]
struct Placed {
    sent: Instant,
    answered: Instant,
    status: Option<u16>,
    order_id: Option<String>,
}

impl Rig {
    async fn start(load: &LoadOptions, window: Option<u32>) -> Result<Rig, String> {
        let probe = Probe::default();
        let mut opts = StackOptions::new(&load.repo_root);
        opts.prefix = format!("load{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        opts.http_addr = ([127, 0, 0, 1], 0).into();
        opts.dynamodb_endpoint = load.dynamodb_endpoint.clone();
        opts.sqs_endpoint = load.sqs_endpoint.clone();
        opts.env_overrides.insert(
            "PAYMENT_FAILURE_RATE".into(),
            load.payment_failure_rate.to_string(),
        );
        opts.probe = Some(probe.clone());
        opts.batching_window = window.map(|s| Duration::from_secs(s.into()));
        // Batches gather for their whole window, as on Lambda, so that what a window costs
        // and saves here is what it would there.
        opts.fill_batching_window = true;
        let stack = Stack::start(opts.clone())
            .await
            .map_err(|e| format!("starting the stack: {e}"))?;
        let window_s = match window {
            Some(s) => s as f64,
            None => stack
                .template
                .functions
                .iter()
                .flat_map(|f| f.sqs_events.iter())
                .map(|e| e.batching_window_seconds as f64)
                .next()
                .unwrap_or(0.0),
        };
        let mut rig = Rig {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .pool_max_idle_per_host(256)
            .build_http(),
            customer: Caller {
                token: String::new(),
            },
            products: (0..load.products)
                .map(|i| format!("p-load-{i:03}"))
                .collect(),
            stack,
            opts,
            probe,
            window_s,
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        if let Err(e) = rig.prepare().await {
            rig.stop().await;
            return Err(e);
        }
        // A warm-up that no step counts: a new table's first transactions, a new queue's first
        // sends, the HTTP client's first connections.
        if load.warm_up_seconds > 0.0 {
            let quiet = LoadOptions {
                progress: false,
                ..load.clone()
            };
            let warm_up = rig.step(&quiet, WARM_UP_RATE, load.warm_up_seconds).await;
            let _ = rig.probe.take();
            if let Err(e) = warm_up {
                rig.stop().await;
                return Err(format!("warm-up: {e}"));
            }
        }
        Ok(rig)
    }

    /// Signs the customer and an operator in, and seeds the catalogue through the API.
    async fn prepare(&mut self) -> Result<(), String> {
        let sign_in = self.stack.sign_in()?;
        let operators = crate::cognito::operators_group(&self.stack.template);
        let operator = Caller {
            token: sign_in
                .sign_in("load-operator", &[&operators], &[&operators])
                .await
                .map_err(|e| e.to_string())?
                .access_token,
        };
        self.customer.token = sign_in
            .sign_in("load-customer", &[], &[&operators])
            .await
            .map_err(|e| e.to_string())?
            .access_token;
        for (i, id) in self.products.iter().enumerate() {
            let uri = format!("http://{}/products/{id}", self.stack.http_addr);
            let body = serde_json::json!({
                "name": format!("Load product {i}"),
                "priceCents": 100 + i,
                "quantity": START_STOCK,
            });
            let (status, text) =
                request(&self.client, &operator, "PUT", &uri, Some(body.to_string())).await?;
            // 201: created with its stock (the products of a run are new, prefixed).
            if status != 201 {
                return Err(format!("seeding {id}: PUT answered {status}: {text}"));
            }
        }
        // The probe starts clean: seeding is not part of any step.
        let _ = self.probe.take();
        Ok(())
    }

    fn order_body(&self, lines: usize) -> String {
        let mut picked: Vec<&String> = Vec::with_capacity(lines);
        while picked.len() < lines.min(self.products.len()) {
            let p = &self.products[fastrand::usize(..self.products.len())];
            if !picked.contains(&p) {
                picked.push(p);
            }
        }
        serde_json::json!({
            "items": picked.iter().map(|p| serde_json::json!({"productId": p, "quantity": 1})).collect::<Vec<_>>(),
            "paymentMethod": "tok_visa",
        })
        .to_string()
    }

    /// Offers `rate` orders per second for `seconds`, then waits for them to end.
    async fn step(&mut self, load: &LoadOptions, rate: f64, seconds: f64) -> Result<Step, String> {
        let total = (rate * seconds).round().max(1.0) as usize;
        let backlog_cap = ((rate * BACKLOG_SECONDS).ceil() as usize).max(50);
        let uri = format!("http://{}/orders", self.stack.http_addr);
        let placed: Arc<Mutex<Vec<Placed>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
        let mut tasks = Vec::with_capacity(total);
        let mut stopped_early = None;
        let mut lag = Duration::ZERO;
        let begin = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut next_progress = begin + Duration::from_secs(5);
        say(
            load,
            format!(
                "  {rate} orders/s for {seconds} s ({total} orders, window {} s)",
                self.window_s
            ),
        );
        for i in 0..total {
            let at = begin + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at).await;
            lag = lag.max(tokio::time::Instant::now().saturating_duration_since(at));
            let outstanding = self
                .accepted
                .load(Ordering::Relaxed)
                .saturating_sub(self.probe.finals_len());
            if outstanding > backlog_cap {
                stopped_early = Some(format!(
                    "{outstanding} orders outstanding after {:.1} s (more than {BACKLOG_SECONDS} s of offered orders)",
                    at.duration_since(begin).as_secs_f64()
                ));
                break;
            }
            if tokio::time::Instant::now() >= next_progress {
                next_progress += Duration::from_secs(5);
                say(
                    load,
                    format!(
                        "    {:.0} s: {} sent, {} final, {outstanding} outstanding",
                        at.duration_since(begin).as_secs_f64(),
                        i,
                        self.probe.finals_len()
                    ),
                );
            }
            let (client, caller, uri, body) = (
                self.client.clone(),
                self.customer.clone(),
                uri.clone(),
                self.order_body(load.lines),
            );
            let (placed, accepted) = (placed.clone(), self.accepted.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let answer = request(&client, &caller, "POST", &uri, Some(body)).await;
                let answered = Instant::now();
                let (status, order_id) = match answer {
                    Ok((202, body)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                        (Some(202), v["orderId"].as_str().map(str::to_string))
                    }
                    Ok((status, _)) => (Some(status), None),
                    Err(_) => (None, None),
                };
                placed.lock().expect("placed").push(Placed {
                    sent,
                    answered,
                    status,
                    order_id,
                });
            }));
        }
        let send_seconds = tokio::time::Instant::now()
            .duration_since(begin)
            .as_secs_f64();
        for t in tasks {
            let _ = t.await;
        }
        let placed = std::mem::take(&mut *placed.lock().expect("placed"));
        // Drain: wait for every accepted order to end, giving up after a stall.
        let ids: Vec<&str> = placed
            .iter()
            .filter_map(|p| p.order_id.as_deref())
            .collect();
        let mut last_progress = (Instant::now(), 0usize);
        let mut next_progress = Instant::now() + Duration::from_secs(5);
        loop {
            let done = ids
                .iter()
                .filter(|id| self.probe.final_of(id).is_some())
                .count();
            if done == ids.len() {
                break;
            }
            if done > last_progress.1 {
                last_progress = (Instant::now(), done);
            } else if last_progress.0.elapsed() > STALL {
                say(
                    load,
                    format!(
                        "    no order ended for {} s: {} of {} left unfinished",
                        STALL.as_secs(),
                        ids.len() - done,
                        ids.len()
                    ),
                );
                break;
            }
            if Instant::now() >= next_progress {
                next_progress += Duration::from_secs(5);
                say(load, format!("    draining: {done} of {} final", ids.len()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Late calls of the last orders (deletes) land in this step's samples.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let samples = self.probe.take();
        let step = summarize(
            rate,
            self.window_s,
            seconds,
            &placed,
            &self.probe,
            &samples,
            send_seconds,
            lag,
            stopped_early,
        );
        let l = step.latency();
        say(
            load,
            format!(
                "    achieved {:.1} orders/s ({} confirmed, {} cancelled, {} unfinished, {} refused); latency p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms; {:.2} invocations per order{}",
                step.achieved_per_s,
                step.confirmed,
                step.cancelled,
                step.unfinished,
                step.refused.values().sum::<usize>(),
                l.p50,
                l.p95,
                l.p99,
                step.invocations_per_order,
                if step.saturated { "; SATURATED" } else { "" }
            ),
        );
        Ok(step)
    }

    /// Reads every order back from the orders table and counts, per step, those final there.
    async fn check_table(&self, steps: &mut [Step]) -> Result<(), String> {
        let mut statuses: HashMap<String, String> = HashMap::new();
        let mut start = None;
        loop {
            let out = self
                .stack
                .clients
                .dynamodb
                .scan()
                .table_name(self.stack.table("OrdersTable"))
                .projection_expression("orderId, #s")
                .expression_attribute_names("#s", "status")
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| format!("reading the orders back: {e:?}"))?;
            for item in out.items.unwrap_or_default() {
                if let (Some(A::S(id)), Some(A::S(status))) =
                    (item.get("orderId"), item.get("status"))
                {
                    statuses.insert(id.clone(), status.clone());
                }
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        for s in steps.iter_mut() {
            s.final_in_table = s
                .order_ids
                .iter()
                .filter(|id| {
                    statuses
                        .get(*id)
                        .is_some_and(|st| st == "CONFIRMED" || st == "CANCELLED")
                })
                .count();
            if s.final_in_table < s.finals() {
                return Err(format!(
                    "at {} orders/s the probe saw {} orders end, the orders table shows {} final",
                    s.offered_per_s,
                    s.finals(),
                    s.final_in_table
                ));
            }
        }
        Ok(())
    }

    async fn stop(self) {
        self.stack.stop().await;
        let admin = local_clients(
            &self.opts.dynamodb_endpoint,
            &self.opts.sqs_endpoint,
            &self.opts.region,
        )
        .await;
        if let Ok(template) = Template::from_file(&self.opts.template_path) {
            let _ = crate::provision::delete_prefixed(
                &template,
                &self.opts.prefix,
                &admin.dynamodb,
                &admin.sqs,
            )
            .await;
            let cognito = crate::stack::local_cognito(&self.opts.sqs_endpoint, &self.opts.region);
            let _ = crate::cognito::delete_prefixed(&template, &self.opts.prefix, &cognito).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    rate: f64,
    window_s: f64,
    planned: f64,
    placed: &[Placed],
    probe: &Probe,
    samples: &Samples,
    send_seconds: f64,
    lag: Duration,
    stopped_early: Option<String>,
) -> Step {
    let mut step = Step {
        offered_per_s: rate,
        batching_window_s: window_s,
        planned_seconds: planned,
        sent: placed.len(),
        send_seconds,
        generator_lag_ms: lag.as_secs_f64() * 1000.0,
        stopped_early,
        ..Default::default()
    };
    let first_sent = placed.iter().map(|p| p.sent).min();
    let last_sent = placed.iter().map(|p| p.sent).max();
    let mut last_final = None;
    // Each final order's (sent, final), seconds after the first order was sent.
    let mut timeline = Vec::new();
    let mut post_ms = Vec::new();
    for p in placed {
        post_ms.push((p.answered - p.sent).as_secs_f64() * 1000.0);
        let Some(id) = &p.order_id else {
            let key = p.status.map_or("error".to_string(), |s| s.to_string());
            *step.refused.entry(key).or_default() += 1;
            continue;
        };
        step.accepted += 1;
        step.order_ids.push(id.clone());
        match probe.final_of(id) {
            Some(f) => {
                if f.confirmed {
                    step.confirmed += 1;
                } else {
                    step.cancelled += 1;
                }
                step.latency_ms
                    .push(f.at.saturating_duration_since(p.sent).as_secs_f64() * 1000.0);
                last_final = last_final.max(Some(f.at));
                if let Some(t0) = first_sent {
                    timeline.push((
                        p.sent.saturating_duration_since(t0).as_secs_f64(),
                        f.at.saturating_duration_since(t0).as_secs_f64(),
                    ));
                }
            }
            None => step.unfinished += 1,
        }
    }
    step.latency_ms = stats::sorted(&step.latency_ms);
    step.post_ms = Quantiles::of(&post_ms);
    if let (Some(a), Some(b)) = (first_sent, last_final) {
        step.seconds = b.saturating_duration_since(a).as_secs_f64();
    }
    if let (Some(a), Some(b)) = (first_sent, last_sent) {
        let offered_s = b.saturating_duration_since(a).as_secs_f64() + 1.0 / rate;
        // A stack that lagged in the first half catches up in the second: it cannot keep
        // finishing orders faster than they come, so that is not more throughput.
        step.achieved_per_s = achieved_rate(&timeline, offered_s).min(rate);
    }
    step.saturated = step.stopped_early.is_some()
        || step.unfinished > 0
        || step.achieved_per_s < SATURATED * rate;
    let finals = step.finals().max(1) as f64;
    let mut functions: Vec<&str> = samples
        .invocations
        .iter()
        .map(|i| i.function.as_str())
        .chain(samples.calls.iter().map(|c| c.function.as_str()))
        .collect();
    functions.sort_unstable();
    functions.dedup();
    for f in functions {
        let invocations: Vec<&crate::timing::Invocation> = samples
            .invocations
            .iter()
            .filter(|i| i.function == f)
            .collect();
        let deliveries = samples
            .deliveries
            .iter()
            .filter(|d| d.function == f && d.first);
        let (queue, batching): (Vec<f64>, Vec<f64>) = deliveries
            .map(|d| (d.queue_wait_ms, d.batching_wait_ms))
            .unzip();
        let mut by_op: BTreeMap<(String, String), (usize, Vec<f64>)> = BTreeMap::new();
        for c in samples.calls.iter().filter(|c| c.function == f) {
            let e = by_op
                .entry((c.service.clone(), c.operation.clone()))
                .or_default();
            e.1.push(c.ms);
            if !c.ok {
                e.0 += 1;
            }
        }
        step.hops.push(Hop {
            function: f.to_string(),
            invocations: invocations.len(),
            records: invocations.iter().map(|i| i.records).sum(),
            queue_wait_ms: Quantiles::of(&queue),
            batching_wait_ms: Quantiles::of(&batching),
            handler_ms: Quantiles::of(&invocations.iter().map(|i| i.ms).collect::<Vec<_>>()),
            calls: by_op
                .into_iter()
                .map(|((service, operation), (failed, ms))| CallStats {
                    mapping: MAPPING_OPS.contains(&operation.as_str()),
                    calls: ms.len(),
                    failed,
                    ms: Quantiles::of(&ms),
                    service,
                    operation,
                })
                .collect(),
        });
    }
    for c in &samples.calls {
        *step
            .calls_per_order
            .entry(format!("{} {}", c.service, c.operation))
            .or_default() += 1.0 / finals;
    }
    step.messages_per_order = samples.deliveries.len() as f64 / finals;
    step.invocations_per_order = samples.invocations.len() as f64 / finals;
    step
}

/// The emulators alone: client loops at each concurrency, on resources of their own.
async fn ceiling(opts: &LoadOptions) -> Result<Vec<CeilingRun>, String> {
    use saga_core::adapters::stock::DynamoStock;
    use saga_core::idempotency::dynamo::DynamoIdempotency;

    let template = Template::from_file(opts.repo_root.join("template.yaml"))
        .map_err(|e| format!("template.yaml: {e}"))?;
    let clients = local_clients(&opts.dynamodb_endpoint, &opts.sqs_endpoint, "us-east-1").await;
    let prefix = format!(
        "loadceil{}-",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let names = crate::provision::provision(&template, &prefix, &clients.dynamodb, &clients.sqs)
        .await
        .map_err(|e| format!("provisioning {prefix}*: {e}"))?;
    let result = async {
        let table = |k: &str| {
            names
                .tables
                .get(k)
                .cloned()
                .ok_or_else(|| format!("template.yaml has no {k}"))
        };
        let products_table = table("ProductsTable")?;
        let stock = DynamoStock::new(
            clients.dynamodb.clone(),
            &products_table,
            DynamoIdempotency::new(clients.dynamodb.clone(), table("IdempotencyTable")?),
        );
        let products: Vec<String> = (0..opts.products)
            .map(|i| format!("p-load-{i:03}"))
            .collect();
        for p in &products {
            clients
                .dynamodb
                .put_item()
                .table_name(&products_table)
                .item("productId", A::S(p.clone()))
                .item("name", A::S(p.clone()))
                .item("priceCents", A::N("100".into()))
                .item("quantity", A::N(START_STOCK.to_string()))
                .send()
                .await
                .map_err(|e| format!("seeding {p}: {e:?}"))?;
        }
        let queue = names
            .queue_urls
            .get("CoordinatorQueue")
            .cloned()
            .ok_or("template.yaml has no CoordinatorQueue")?;
        let seconds = Duration::from_secs_f64(opts.ceiling_seconds);
        let mut runs = Vec::new();
        for &n in &opts.ceiling_concurrency {
            let r = reserve_loop(&stock, &products, opts.lines, n, seconds).await;
            say(opts, ceiling_line(&r));
            runs.push(r);
            let (sent, r) = send_loop(&clients.sqs, &queue, n, seconds).await;
            say(opts, ceiling_line(&r));
            runs.push(r);
            let (handles, r) = receive_loop(&clients.sqs, &queue, n, sent, seconds * 3).await;
            say(opts, ceiling_line(&r));
            runs.push(r);
            let r = delete_loop(&clients.sqs, &queue, n, handles).await;
            say(opts, ceiling_line(&r));
            runs.push(r);
            let _ = clients.sqs.purge_queue().queue_url(&queue).send().await;
        }
        Ok::<_, String>(runs)
    }
    .await;
    let _ = crate::provision::delete_prefixed(&template, &prefix, &clients.dynamodb, &clients.sqs)
        .await;
    result
}

fn ceiling_line(r: &CeilingRun) -> String {
    format!(
        "  {:<28} x{:<3} {:>7.0} calls/s {:>7.0} items/s  (p50 {:.1} ms, p99 {:.1} ms, {} failed)",
        r.operation,
        r.concurrency,
        r.calls_per_s,
        r.items_per_s,
        r.call_ms.p50,
        r.call_ms.p99,
        r.failed
    )
}

/// What one task of a client loop recorded.
#[derive(Default)]
struct Tally {
    ms: Vec<f64>,
    failed: usize,
    items: usize,
}

fn ceiling_run(op: &str, n: usize, took: Duration, tallies: Vec<Tally>) -> CeilingRun {
    let secs = took.as_secs_f64().max(1e-9);
    let ms: Vec<f64> = tallies.iter().flat_map(|t| t.ms.iter().copied()).collect();
    let items: usize = tallies.iter().map(|t| t.items).sum();
    CeilingRun {
        operation: op.to_string(),
        concurrency: n,
        seconds: secs,
        calls: ms.len(),
        failed: tallies.iter().map(|t| t.failed).sum(),
        items,
        calls_per_s: ms.len() as f64 / secs,
        items_per_s: items as f64 / secs,
        call_ms: Quantiles::of(&ms),
    }
}

/// The stock function's reservation transaction, on random lines of the catalogue.
async fn reserve_loop(
    stock: &saga_core::adapters::stock::DynamoStock,
    products: &[String],
    lines: usize,
    n: usize,
    seconds: Duration,
) -> CeilingRun {
    use saga_core::domain::StockLine;
    use saga_core::idempotency::{Completed, Outcome, STEP_RECORD_TTL, StepKey};
    use saga_core::ports::{ReserveOutcome, Stock};
    let started = Instant::now();
    let tallies = futures::future::join_all((0..n).map(|_| async move {
        let mut t = Tally::default();
        while started.elapsed() < seconds {
            let order_id = format!("ceil-{}", uuid::Uuid::new_v4().simple());
            let mut picked: Vec<StockLine> = Vec::new();
            while picked.len() < lines.min(products.len()) {
                let p = &products[fastrand::usize(..products.len())];
                if !picked.iter().any(|l| &l.product_id == p) {
                    picked.push(StockLine {
                        product_id: p.clone(),
                        quantity: 1,
                    });
                }
            }
            let result = format!(r#"{{"type":"StockReserved","orderId":"{order_id}"}}"#);
            let done = Completed {
                key: StepKey::Reserve(&order_id),
                payload_hash: "ceiling",
                result: &result,
                outcome: Some(Outcome::Reserved),
                ttl: STEP_RECORD_TTL,
            };
            let at = Instant::now();
            let outcome = stock
                .reserve(&picked, &done, saga_core::time::now_ms())
                .await;
            t.ms.push(at.elapsed().as_secs_f64() * 1000.0);
            match outcome {
                Ok(ReserveOutcome::Reserved) => t.items += 1,
                _ => t.failed += 1,
            }
        }
        t
    }))
    .await;
    ceiling_run("DynamoDB TransactWriteItems", n, started.elapsed(), tallies)
}

/// A message of the saga's size (a StockReserved result).
fn saga_message(i: usize) -> String {
    serde_json::json!({
        "type": "StockReserved",
        "orderId": format!("{}-{i}", uuid::Uuid::new_v4()),
        "items": [{"productId": "p-load-001", "quantity": 1}, {"productId": "p-load-002", "quantity": 1}],
    })
    .to_string()
}

async fn send_loop(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    n: usize,
    seconds: Duration,
) -> (usize, CeilingRun) {
    let started = Instant::now();
    let tallies = futures::future::join_all((0..n).map(|_| async move {
        let mut t = Tally::default();
        while started.elapsed() < seconds {
            let at = Instant::now();
            let ok = sqs
                .send_message()
                .queue_url(queue)
                .message_body(saga_message(t.ms.len()))
                .send()
                .await
                .is_ok();
            t.ms.push(at.elapsed().as_secs_f64() * 1000.0);
            if ok {
                t.items += 1;
            } else {
                t.failed += 1;
            }
        }
        t
    }))
    .await;
    let run = ceiling_run("SQS SendMessage", n, started.elapsed(), tallies);
    (run.items, run)
}

/// Receives (10 at a time, as the event source mapping asks) until `expected` messages came
/// or `limit` passed.
async fn receive_loop(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    n: usize,
    expected: usize,
    limit: Duration,
) -> (Vec<String>, CeilingRun) {
    let started = Instant::now();
    let got = Arc::new(AtomicUsize::new(0));
    let handles = Arc::new(Mutex::new(Vec::with_capacity(expected)));
    let tallies = futures::future::join_all((0..n).map(|_| {
        let (got, handles) = (got.clone(), handles.clone());
        async move {
            let mut t = Tally::default();
            while got.load(Ordering::Relaxed) < expected && started.elapsed() < limit {
                let at = Instant::now();
                let out = sqs
                    .receive_message()
                    .queue_url(queue)
                    .max_number_of_messages(10)
                    .wait_time_seconds(0)
                    .visibility_timeout(600)
                    .message_system_attribute_names(
                        aws_sdk_sqs::types::MessageSystemAttributeName::All,
                    )
                    .send()
                    .await;
                t.ms.push(at.elapsed().as_secs_f64() * 1000.0);
                match out {
                    Ok(out) => {
                        let msgs = out.messages.unwrap_or_default();
                        t.items += msgs.len();
                        got.fetch_add(msgs.len(), Ordering::Relaxed);
                        handles
                            .lock()
                            .expect("handles")
                            .extend(msgs.into_iter().filter_map(|m| m.receipt_handle));
                    }
                    Err(_) => t.failed += 1,
                }
            }
            t
        }
    }))
    .await;
    let run = ceiling_run("SQS ReceiveMessage", n, started.elapsed(), tallies);
    let handles = std::mem::take(&mut *handles.lock().expect("handles"));
    (handles, run)
}

/// Deletes the received messages, 10 per `DeleteMessageBatch` (as the mapping does).
async fn delete_loop(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    n: usize,
    handles: Vec<String>,
) -> CeilingRun {
    use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
    let chunks: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(
        handles.chunks(10).map(<[String]>::to_vec).collect(),
    ));
    let started = Instant::now();
    let tallies = futures::future::join_all((0..n).map(|_| {
        let chunks = chunks.clone();
        async move {
            let mut t = Tally::default();
            loop {
                let Some(chunk) = chunks.lock().expect("chunks").pop() else {
                    break;
                };
                let entries = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(h)
                            .build()
                            .expect("id and receipt handle are set")
                    })
                    .collect::<Vec<_>>();
                let at = Instant::now();
                let out = sqs
                    .delete_message_batch()
                    .queue_url(queue)
                    .set_entries(Some(entries))
                    .send()
                    .await;
                t.ms.push(at.elapsed().as_secs_f64() * 1000.0);
                match out {
                    Ok(out) => t.items += out.successful.len(),
                    Err(_) => t.failed += 1,
                }
            }
            t
        }
    }))
    .await;
    ceiling_run("SQS DeleteMessageBatch", n, started.elapsed(), tallies)
}

/// The rate at which orders became final in a step, in its steady state: the orders that
/// became final during the second half of the sending (`offered_s` long), per second.
/// `timeline`: each final order's (sent, final) in seconds from the first send.
///
/// A stack that keeps up finishes each order its latency after sending it, so the second half
/// of the sending sees as many orders finish as were offered in a span as long, whatever the
/// latency (a batching window's, say), as long as it is under half the step. A saturated stack
/// is busy through it, serving what it can while the load is still offered. Counting from the
/// first final to the last would stretch the span by the spread of latencies (and call a stack
/// that keeps up saturated); counting after the sending stops would measure the drain, when
/// the emulators no longer serve the order API's sends and the functions' batches are full.
pub fn achieved_rate(timeline: &[(f64, f64)], offered_s: f64) -> f64 {
    if offered_s <= 0.0 {
        return 0.0;
    }
    let half = offered_s / 2.0;
    let within = timeline
        .iter()
        .filter(|(_, done)| *done >= half && *done < offered_s)
        .count();
    within as f64 / half
}

/// The emulators' ceiling in orders per second, and what bounds it: each operation's best
/// measured rate (transactions, messages sent, received, deleted per second) divided by what
/// one order needs of it under load (`per_order`, measured in the rate steps).
#[derive(Clone, Debug, PartialEq)]
pub struct Ceiling {
    /// (operation, best items/s, needed per order, orders/s it allows)
    pub bounds: Vec<(String, f64, f64, f64)>,
    pub orders_per_s: f64,
    pub bound_by: String,
}

/// What one final order needs of each ceiling operation, from the steps: transactions,
/// `SendMessage` calls, and messages received and deleted (one per message handed over).
pub fn needs_per_order(steps: &[Step]) -> BTreeMap<String, f64> {
    let finals: usize = steps.iter().map(Step::finals).sum();
    let mut needs = BTreeMap::new();
    if finals == 0 {
        return needs;
    }
    let total = |key: &str| {
        steps
            .iter()
            .map(|s| s.calls_per_order.get(key).copied().unwrap_or(0.0) * s.finals() as f64)
            .sum::<f64>()
    };
    let messages: f64 = steps
        .iter()
        .map(|s| s.messages_per_order * s.finals() as f64)
        .sum();
    let f = finals as f64;
    needs.insert(
        "DynamoDB TransactWriteItems".to_string(),
        total("DynamoDB TransactWriteItems") / f,
    );
    needs.insert(
        "SQS SendMessage".to_string(),
        (total("SQS SendMessage") + total("SQS SendMessageBatch")) / f,
    );
    needs.insert("SQS ReceiveMessage".to_string(), messages / f);
    needs.insert("SQS DeleteMessageBatch".to_string(), messages / f);
    needs
}

/// The bound of moto's operations together (one process serves them all).
pub const SQS_TOGETHER: &str = "SQS send + receive + delete together (one moto process)";

pub fn ceiling_of(runs: &[CeilingRun], needs: &BTreeMap<String, f64>) -> Option<Ceiling> {
    let mut bounds = Vec::new();
    for (op, per_order) in needs {
        let best = runs
            .iter()
            .filter(|r| &r.operation == op)
            .map(|r| r.items_per_s)
            .fold(f64::NAN, f64::max);
        if best.is_finite() && *per_order > 0.0 {
            bounds.push((op.clone(), best, *per_order, best / per_order));
        }
    }
    // moto serves every SQS operation from one Python process (one core at most): an order's
    // sends, receives and deletes share it, so their times per order add up.
    let sqs: Vec<&(String, f64, f64, f64)> =
        bounds.iter().filter(|b| b.0.starts_with("SQS ")).collect();
    if sqs.len() > 1 {
        let seconds: f64 = sqs.iter().map(|b| b.2 / b.1).sum();
        bounds.push((SQS_TOGETHER.to_string(), f64::NAN, f64::NAN, 1.0 / seconds));
    }
    let (bound_by, orders_per_s) = bounds
        .iter()
        .map(|b| (b.0.clone(), b.3))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    Some(Ceiling {
        bounds,
        orders_per_s,
        bound_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_that_keeps_up_achieves_the_offered_rate_whatever_its_latency() {
        // 10 orders/s for 10 s, each final 1 to 2 s after it was sent (jittered).
        let timeline: Vec<(f64, f64)> = (0..100)
            .map(|i| {
                let sent = i as f64 / 10.0;
                (sent, sent + 1.0 + (i * 7 % 10) as f64 / 10.0)
            })
            .collect();
        let achieved = achieved_rate(&timeline, 10.0);
        assert!((9.0..=10.5).contains(&achieved), "{achieved}");
    }

    #[test]
    fn a_saturated_stack_achieves_what_it_serves() {
        // 50 orders/s offered for 10 s; served at 20/s, one after the other.
        let timeline: Vec<(f64, f64)> = (0..500)
            .map(|i| (i as f64 / 50.0, 0.1 + i as f64 / 20.0))
            .collect();
        let achieved = achieved_rate(&timeline, 10.0);
        assert!((19.0..=21.0).contains(&achieved), "{achieved}");
        assert_eq!(achieved_rate(&[], 10.0), 0.0);
    }

    #[test]
    fn the_callers_headers_carry_its_bearer_token() {
        let c = Caller {
            token: "t0k".into(),
        };
        assert_eq!(
            c.headers(true),
            vec![
                ("authorization", "Bearer t0k".to_string()),
                ("content-type", "application/json".to_string())
            ]
        );
        assert_eq!(c.headers(false).len(), 1);
    }

    fn step(finals: usize, twi: f64, sends: f64, messages: f64) -> Step {
        Step {
            confirmed: finals,
            calls_per_order: [
                ("DynamoDB TransactWriteItems".to_string(), twi),
                ("SQS SendMessage".to_string(), sends),
            ]
            .into(),
            messages_per_order: messages,
            ..Default::default()
        }
    }

    fn run(op: &str, n: usize, items_per_s: f64) -> CeilingRun {
        CeilingRun {
            operation: op.into(),
            concurrency: n,
            seconds: 1.0,
            calls: 1,
            failed: 0,
            items: 1,
            calls_per_s: 1.0,
            items_per_s,
            call_ms: Quantiles::default(),
        }
    }

    #[test]
    fn when_computing_the_ceiling_should_add_up_what_one_moto_serves_and_take_the_tightest() {
        let steps = [step(100, 1.0, 4.0, 4.0), step(300, 1.0, 4.0, 4.0)];
        let needs = needs_per_order(&steps);
        assert_eq!(needs["DynamoDB TransactWriteItems"], 1.0);
        assert_eq!(needs["SQS SendMessage"], 4.0);
        assert_eq!(needs["SQS ReceiveMessage"], 4.0);
        let runs = [
            run("DynamoDB TransactWriteItems", 8, 300.0),
            run("DynamoDB TransactWriteItems", 32, 500.0),
            run("SQS SendMessage", 8, 1200.0),
            run("SQS ReceiveMessage", 8, 4000.0),
            run("SQS DeleteMessageBatch", 8, 8000.0),
        ];
        let c = ceiling_of(&runs, &needs).unwrap();
        // Alone, sends allow 1200 / 4 = 300 orders/s (below 500 transactions/s); but one moto
        // serves sends, receives and deletes: 4/1200 + 4/4000 + 4/8000 s per order.
        let together = 1.0 / (4.0 / 1200.0 + 4.0 / 4000.0 + 4.0 / 8000.0);
        assert_eq!(c.bound_by, SQS_TOGETHER);
        assert!((c.orders_per_s - together).abs() < 1e-9, "{c:?}");
        assert!(together < 300.0);
        assert_eq!(c.bounds.len(), 5);
        assert!(ceiling_of(&runs, &BTreeMap::new()).is_none());
    }

    #[test]
    fn quantiles_of_nothing_are_zero() {
        let q = Quantiles::of(&[]);
        assert_eq!((q.n, q.p50), (0, 0.0));
        let q = Quantiles::of(&[3.0, 1.0, 2.0]);
        assert_eq!((q.n, q.p50, q.max, q.mean), (3, 2.0, 3.0, 2.0));
    }
}
