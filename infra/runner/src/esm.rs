//! What Lambda's SQS event source mapping does, for the local runner: long-poll the queue,
//! hand a batch to the function as an `SqsEvent`, delete the records that succeeded, and
//! leave the `batchItemFailures` (or the whole batch, if the function failed or timed out)
//! to come back after the visibility timeout and, after `maxReceiveCount`, to land in the
//! queue's DLQ by the queue's own redrive policy.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName};
use futures::future::BoxFuture;
use lambda_runtime::{Context, LambdaEvent};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    pub visibility_timeout: i32,
    pub concurrency: usize,
    pub function_timeout: Duration,
    /// Share of successfully processed messages delivered a second time (at-least-once).
    pub duplicate_rate: f64,
    pub wait_seconds: i32,
    pub region: String,
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
    (0..mapping.concurrency.max(1))
        .map(|_| {
            let (m, sqs, f, p, s) = (
                mapping.clone(),
                sqs.clone(),
                function.clone(),
                paused.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move { poll(m, sqs, f, p, s).await })
        })
        .collect()
}

async fn poll(
    m: Arc<Mapping>,
    sqs: aws_sdk_sqs::Client,
    function: SqsFunction,
    paused: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        if *paused.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let batch = tokio::select! {
            b = receive(&m, &sqs) => b,
            _ = shutdown.changed() => return,
        };
        let messages = match batch {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(function = %m.function, error = %e, "receive failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        invoke(&m, &sqs, &function, messages).await;
    }
}

/// Receives up to `batch_size` messages, waiting up to the batching window to fill the batch.
async fn receive(m: &Mapping, sqs: &aws_sdk_sqs::Client) -> Result<Vec<Message>, String> {
    let mut messages = Vec::new();
    let started = tokio::time::Instant::now();
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
            .visibility_timeout(m.visibility_timeout)
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
            || empty
            || started.elapsed() >= m.batching_window
        {
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

fn context(m: &Mapping) -> Context {
    let mut ctx = Context::default();
    ctx.request_id = uuid::Uuid::new_v4().to_string();
    ctx.deadline = (saga_core::time::now_ms() + m.function_timeout.as_millis() as i64) as u64;
    ctx.invoked_function_arn = format!(
        "arn:aws:lambda:{}:000000000000:function:{}",
        m.region, m.function
    );
    ctx
}

async fn invoke(
    m: &Mapping,
    sqs: &aws_sdk_sqs::Client,
    function: &SqsFunction,
    messages: Vec<Message>,
) {
    let event = sqs_event(m, &messages);
    let outcome = tokio::time::timeout(
        m.function_timeout,
        function(LambdaEvent::new(event.clone(), context(m))),
    )
    .await;
    let failed: HashSet<String> = match outcome {
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
                return;
            }
            failed
        }
        Ok(Err(e)) => {
            tracing::error!(function = %m.function, error = %e, "function failed; whole batch will be retried");
            return;
        }
        Err(_) => {
            tracing::error!(function = %m.function, timeout = ?m.function_timeout, "function timed out; whole batch will be retried");
            return;
        }
    };
    let done: Vec<&Message> = messages
        .iter()
        .filter(|x| x.message_id.as_ref().is_some_and(|id| !failed.contains(id)))
        .collect();
    // At-least-once delivery: some successfully processed messages are delivered again.
    if m.duplicate_rate > 0.0 {
        let again: Vec<Message> = done
            .iter()
            .filter(|_| fastrand::f64() < m.duplicate_rate)
            .map(|x| (*x).clone())
            .collect();
        if !again.is_empty() {
            tracing::info!(function = %m.function, count = again.len(), "delivering messages a second time");
            let event = sqs_event(m, &again);
            // The first delivery already decided what is deleted; the second one is judged by
            // its effects (there must be none), but its failure is still worth seeing.
            match tokio::time::timeout(
                m.function_timeout,
                function(LambdaEvent::new(event, context(m))),
            )
            .await
            {
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
    if done.is_empty() {
        return;
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
    if let Err(e) = sqs
        .delete_message_batch()
        .queue_url(&m.queue_url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        // Not deleted means delivered again: safe, since every consumer is idempotent.
        tracing::warn!(function = %m.function, error = %aws_sdk_sqs::error::DisplayErrorContext(e), "delete failed; messages will be delivered again");
    }
}
