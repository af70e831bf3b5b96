//! What Lambda's SQS event source mapping does, for the local runner: long-poll the queue,
//! hand a batch to the function as an `SqsEvent`, delete the records that succeeded, and
//! leave the `batchItemFailures` (or the whole batch, if the function failed or timed out)
//! to come back after the visibility timeout and, after `maxReceiveCount`, to land in the
//! queue's DLQ by the queue's own redrive policy.
//!
//! Like Lambda's, it degrades instead of amplifying when things slow down ([`crate::pacing`]):
//! pollers back off exponentially when a receive fails, half of them stand down after an
//! error, a time-out or a slow SQS call, and the function timeout (and with it the visibility
//! timeout each receive asks for) follows how long invocations have been taking when the
//! stack runs with shortened timeouts.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName};
use futures::future::BoxFuture;
use lambda_runtime::{Context, LambdaEvent};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pacing::{self, FunctionTimeout, Governor};

/// An SQS call slower than this means the SQS stand-in is struggling: fewer pollers.
const SLOW_SQS_CALL: Duration = Duration::from_secs(2);

/// A function that takes SQS batches.
pub type SqsFunction = Arc<
    dyn Fn(
            LambdaEvent<SqsEvent>,
        ) -> BoxFuture<'static, Result<SqsBatchResponse, lambda_runtime::Error>>
        + Send
        + Sync,
>;

/// One event source mapping, as the template describes it.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub function: String,
    pub queue_url: String,
    pub queue_arn: String,
    pub batch_size: i32,
    pub batching_window: Duration,
    /// Whether a batch keeps gathering until its window ends, as Lambda's does ([`receive`]).
    pub fill_window: bool,
    /// The shortest visibility timeout a receive asks for (the queue's, or a test's override).
    pub visibility_floor: i32,
    /// The longest: the queue's own visibility timeout.
    pub visibility_ceiling: i32,
    /// The mapping's MaximumConcurrency: at most this many pollers at once.
    pub concurrency: usize,
    pub function_timeout: Arc<FunctionTimeout>,
    /// Share of successfully processed messages delivered a second time (at-least-once).
    pub duplicate_rate: f64,
    pub wait_seconds: i32,
    pub region: String,
    /// Records queue waits and invocation times (the load benchmark); `None` otherwise.
    pub probe: Option<crate::timing::Probe>,
}

/// Starts `mapping.concurrency` pollers. They stop when `shutdown` turns true and idle while
/// `paused` is true.
pub fn spawn(
    mapping: Mapping,
    sqs: aws_sdk_sqs::Client,
    function: SqsFunction,
    paused: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mapping = Arc::new(mapping);
    let governor = Arc::new(Governor::new(mapping.concurrency));
    (0..mapping.concurrency.max(1))
        .map(|index| {
            let poller = Poller {
                index,
                m: mapping.clone(),
                sqs: sqs.clone(),
                function: function.clone(),
                governor: governor.clone(),
            };
            let (p, s) = (paused.clone(), shutdown.clone());
            tokio::spawn(async move { poller.run(p, s).await })
        })
        .collect()
}

/// One of a mapping's pollers.
struct Poller {
    index: usize,
    m: Arc<Mapping>,
    sqs: aws_sdk_sqs::Client,
    function: SqsFunction,
    governor: Arc<Governor>,
}

/// How an invocation went, for the pacing.
enum Outcome {
    /// Every record succeeded or was reported as a failure, in time.
    Completed,
    /// The function failed, timed out, or an SQS call was slow or failed.
    Congested,
}

impl Poller {
    async fn run(self, paused: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        let m = &self.m;
        let new_backoff = || pacing::backoff(Duration::from_millis(200), Duration::from_secs(10));
        let mut backoff = new_backoff();
        loop {
            if *shutdown.borrow() {
                return;
            }
            if *paused.borrow() || !self.governor.admits(self.index) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // One timeout for the whole batch: the visibility its receive asks for covers it.
            let timeout = m.function_timeout.current();
            let batch = tokio::select! {
                b = receive(m, &self.sqs, timeout) => b,
                _ = shutdown.changed() => return,
            };
            let messages = match batch {
                Ok(messages) => messages,
                Err(e) => {
                    let limit = self.governor.congested();
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(function = %m.function, error = %e, pollers = limit, ?delay, "receive failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
            };
            backoff = new_backoff();
            if messages.is_empty() {
                continue;
            }
            match invoke(m, &self.sqs, &self.function, messages, timeout).await {
                Outcome::Completed => self.governor.healthy(),
                Outcome::Congested => {
                    let limit = self.governor.congested();
                    tracing::info!(function = %m.function, pollers = limit, "fewer pollers until batches go through cleanly again");
                }
            }
        }
    }
}

/// Receives up to `batch_size` messages, waiting up to the batching window to fill the batch.
/// The visibility timeout asked for covers the window and an invocation that runs to its
/// timeout, so that a slow but healthy invocation does not see its messages delivered again.
///
/// Two ways to use the window, once the first messages are in:
/// - by default (`make run`, the tests) the batch is handed over at the first receive that
///   comes back empty: light traffic is not held back, and the tests stay quick;
/// - with `fill_window` (the load benchmark), as Lambda does: the batch keeps gathering until
///   the window ends or the batch is full. After the first receive, the rest of the window is
///   waited out in one sleep, then what arrived meanwhile is received: two receives per batch,
///   not a poll loop that would load the emulator.
async fn receive(
    m: &Mapping,
    sqs: &aws_sdk_sqs::Client,
    timeout: Duration,
) -> Result<Vec<Message>, String> {
    let mut messages = Vec::new();
    let started = tokio::time::Instant::now();
    let mut waited_out = false;
    let visibility = pacing::visibility_for(
        timeout,
        m.batching_window,
        m.visibility_floor,
        m.visibility_ceiling,
    );
    loop {
        let want = (m.batch_size as usize - messages.len()).min(10) as i32;
        let wait = if messages.is_empty() {
            m.wait_seconds
        } else {
            0
        };
        let out = sqs
            .receive_message()
            .queue_url(&m.queue_url)
            .max_number_of_messages(want)
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())?;
        let got = out.messages.unwrap_or_default();
        let empty = got.is_empty();
        messages.extend(got);
        if messages.is_empty()
            || messages.len() >= m.batch_size as usize
            || started.elapsed() >= m.batching_window
        {
            return Ok(messages);
        }
        if m.fill_window {
            if waited_out {
                return Ok(messages);
            }
            // Wait out the window, then take what arrived meanwhile (one more receive).
            tokio::time::sleep(m.batching_window.saturating_sub(started.elapsed())).await;
            waited_out = true;
        } else if empty {
            return Ok(messages);
        }
    }
}

/// The `SqsEvent` Lambda would deliver for these messages (built as AWS's JSON, then parsed).
pub fn sqs_event(m: &Mapping, messages: &[Message]) -> SqsEvent {
    let records = messages
        .iter()
        .map(|msg| {
            let attributes: HashMap<String, String> = msg
                .attributes
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect();
            let message_attributes: serde_json::Map<String, serde_json::Value> = msg
                .message_attributes
                .iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!({
                            "stringValue": v.string_value,
                            "stringListValues": [],
                            "binaryListValues": [],
                            "dataType": v.data_type,
                        }),
                    )
                })
                .collect();
            json!({
                "messageId": msg.message_id,
                "receiptHandle": msg.receipt_handle,
                "body": msg.body,
                "attributes": attributes,
                "messageAttributes": message_attributes,
                "md5OfBody": msg.md5_of_body,
                "eventSource": "aws:sqs",
                "eventSourceARN": m.queue_arn,
                "awsRegion": m.region,
            })
        })
        .collect::<Vec<_>>();
    serde_json::from_value(json!({ "Records": records })).expect("an SQS event in AWS's shape")
}

fn context(m: &Mapping, timeout: Duration) -> Context {
    let mut ctx = Context::default();
    ctx.request_id = uuid::Uuid::new_v4().to_string();
    ctx.deadline = (saga_core::time::now_ms() + timeout.as_millis() as i64) as u64;
    ctx.invoked_function_arn = format!(
        "arn:aws:lambda:{}:000000000000:function:{}",
        m.region, m.function
    );
    ctx
}

/// Runs the function once on `event` with `timeout`, and records how long it took.
async fn call(
    m: &Mapping,
    function: &SqsFunction,
    event: SqsEvent,
    timeout: Duration,
) -> Result<Result<SqsBatchResponse, lambda_runtime::Error>, Duration> {
    let records = event.records.len();
    let started = Instant::now();
    match tokio::time::timeout(
        timeout,
        function(LambdaEvent::new(event, context(m, timeout))),
    )
    .await
    {
        Ok(outcome) => {
            m.function_timeout.observe(started.elapsed());
            if let Some(p) = &m.probe {
                p.invoked(&m.function, records, started.elapsed());
            }
            Ok(outcome)
        }
        Err(_) => {
            m.function_timeout.timed_out(timeout);
            Err(timeout)
        }
    }
}

async fn invoke(
    m: &Mapping,
    sqs: &aws_sdk_sqs::Client,
    function: &SqsFunction,
    messages: Vec<Message>,
    timeout: Duration,
) -> Outcome {
    if let Some(p) = &m.probe {
        p.delivered(&m.function, &messages);
    }
    let event = sqs_event(m, &messages);
    let failed: HashSet<String> = match call(m, function, event, timeout).await {
        Ok(Ok(response)) => {
            let ids: HashSet<String> = messages
                .iter()
                .filter_map(|x| x.message_id.clone())
                .collect();
            let failed: HashSet<String> = response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.clone())
                .collect();
            // As in Lambda: an empty or unknown identifier fails the whole batch.
            if failed.iter().any(|id| !ids.contains(id)) {
                tracing::error!(function = %m.function, "batch response names an unknown record; whole batch fails");
                return Outcome::Congested;
            }
            failed
        }
        Ok(Err(e)) => {
            tracing::error!(function = %m.function, error = %e, "function failed; whole batch will be retried");
            return Outcome::Congested;
        }
        Err(timeout) => {
            tracing::error!(function = %m.function, ?timeout, "function timed out; whole batch will be retried");
            return Outcome::Congested;
        }
    };
    let done: Vec<&Message> = messages
        .iter()
        .filter(|x| x.message_id.as_ref().is_some_and(|id| !failed.contains(id)))
        .collect();
    if done.is_empty() {
        return Outcome::Completed;
    }
    let entries = done
        .iter()
        .enumerate()
        .map(|(i, x)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(x.receipt_handle.clone().unwrap_or_default())
                .build()
                .expect("id and receipt handle are set")
        })
        .collect::<Vec<_>>();
    let started = Instant::now();
    let deleted = sqs
        .delete_message_batch()
        .queue_url(&m.queue_url)
        .set_entries(Some(entries))
        .send()
        .await;
    let slow = started.elapsed() > SLOW_SQS_CALL;
    let mut outcome = if slow {
        tracing::info!(function = %m.function, took = ?started.elapsed(), "SQS is slow to answer");
        Outcome::Congested
    } else {
        Outcome::Completed
    };
    match deleted {
        Ok(out) if !out.failed.is_empty() => {
            // Not deleted means delivered again: safe, since every consumer is idempotent.
            tracing::warn!(function = %m.function, failed = out.failed.len(), "some deletes failed; those messages will be delivered again");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(function = %m.function, error = %aws_sdk_sqs::error::DisplayErrorContext(e), "delete failed; messages will be delivered again");
            outcome = Outcome::Congested;
        }
    }
    // At-least-once delivery: some successfully processed messages are delivered again, after
    // the first delivery was acknowledged (so the copy cannot hold the original's visibility).
    if m.duplicate_rate > 0.0 {
        let again: Vec<Message> = done
            .iter()
            .filter(|_| fastrand::f64() < m.duplicate_rate)
            .map(|x| (*x).clone())
            .collect();
        if !again.is_empty() {
            tracing::info!(function = %m.function, count = again.len(), "delivering messages a second time");
            // The second delivery is judged by its effects (there must be none), but its
            // failure is still worth seeing.
            let timeout = m.function_timeout.current();
            match call(m, function, sqs_event(m, &again), timeout).await {
                Ok(Ok(r)) if r.batch_item_failures.is_empty() => {}
                Ok(Ok(r)) => {
                    tracing::warn!(function = %m.function, failed = r.batch_item_failures.len(), "second delivery reported failures")
                }
                Ok(Err(e)) => {
                    tracing::warn!(function = %m.function, error = %e, "second delivery failed")
                }
                Err(_) => tracing::warn!(function = %m.function, "second delivery timed out"),
            }
        }
    }
    outcome
}
