//! SQS functions: one trait for the handlers, and processing a batch record by record with
//! partial batch responses.
//!
//! Each record is parsed on its own and processed concurrently with the others; a failing or
//! panicking record is reported in `batchItemFailures` and nothing else is held back. Three
//! kinds of outcome:
//! - a business outcome (out of stock, declined, already done) is `Ok`: the message is done;
//! - a transient fault is [`RecordError::Transient`]: SQS retries the message;
//! - a permanent fault (a body that is not a message of this queue, a key reused with another
//!   payload) is [`RecordError::Permanent`]: it is retried too and, after `maxReceiveCount`,
//!   lands in the queue's DLQ, where an alarm sees it.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures::FutureExt;
use lambda_runtime::LambdaEvent;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use tracing::Instrument;

use crate::adapters::dynamo::StoreError;
use crate::adapters::payment::ProviderError;
use crate::adapters::sqs::PublishError;
use crate::faults::Crash;
use crate::idempotency::ReplayError;

/// How long an invocation without a deadline (a hand-made event) may hold an idempotency key.
pub const DEFAULT_DEADLINE_MS: i64 = 15_000;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("permanent: {0}")]
    Permanent(String),
    #[error("transient: {0}")]
    Transient(String),
    /// An injected crash (tests only): the record is abandoned with no clean-up.
    #[cfg(feature = "fault-injection")]
    #[error(transparent)]
    Crash(Crash),
}

impl RecordError {
    /// Whether this is an injected crash, after which nothing may be cleaned up.
    pub fn is_crash(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return matches!(self, RecordError::Crash(_));
        #[cfg(not(feature = "fault-injection"))]
        false
    }
}

impl From<Crash> for RecordError {
    fn from(crash: Crash) -> Self {
        #[cfg(feature = "fault-injection")]
        return RecordError::Crash(crash);
        #[cfg(not(feature = "fault-injection"))]
        match crash {}
    }
}

impl From<StoreError> for RecordError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(_) => RecordError::Permanent(e.to_string()),
            StoreError::Sdk { .. } => RecordError::Transient(e.to_string()),
        }
    }
}

impl From<PublishError> for RecordError {
    fn from(e: PublishError) -> Self {
        RecordError::Transient(e.to_string())
    }
}

impl From<ProviderError> for RecordError {
    fn from(e: ProviderError) -> Self {
        RecordError::Transient(e.to_string())
    }
}

impl From<ReplayError> for RecordError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::InProgress(_) => RecordError::Transient(e.to_string()),
            ReplayError::PayloadMismatch(_) | ReplayError::Unreadable(..) => {
                RecordError::Permanent(e.to_string())
            }
        }
    }
}

impl From<crate::messages::ParseError> for RecordError {
    fn from(e: crate::messages::ParseError) -> Self {
        RecordError::Permanent(e.to_string())
    }
}

/// A function fed by an SQS queue: the stock, payment and coordinator handlers. Lambda
/// ([`crate::lambda::run_sqs`]) and the local runner both call [`handle`] with it.
pub trait SqsHandler: Send + Sync {
    /// Processes one record, before `deadline_ms` (epoch ms, the invocation's deadline).
    fn process(
        &self,
        record: &SqsMessage,
        deadline_ms: i64,
    ) -> impl Future<Output = Result<(), RecordError>> + Send;

    /// Handles one invocation: every record of the batch, and the ones that failed reported.
    fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> impl Future<Output = Result<SqsBatchResponse, MissingMessageId>> + Send {
        async move {
            let deadline = crate::time::deadline_ms(event.context.deadline, DEFAULT_DEADLINE_MS);
            process_batch(&event.payload, |record| self.process(record, deadline)).await
        }
    }
}

/// A record without a message id cannot be reported as failed, and Lambda never sends one;
/// the whole invocation fails instead, so that nothing is acknowledged by mistake.
#[derive(Debug, thiserror::Error)]
#[error("SQS record {0} has no messageId")]
pub struct MissingMessageId(usize);

/// Runs `process` on every record and reports the ones that failed.
pub async fn process_batch<'a, F, Fut>(
    event: &'a SqsEvent,
    process: F,
) -> Result<SqsBatchResponse, MissingMessageId>
where
    F: Fn(&'a SqsMessage) -> Fut,
    Fut: Future<Output = Result<(), RecordError>> + 'a,
{
    let mut ids = Vec::with_capacity(event.records.len());
    for (i, record) in event.records.iter().enumerate() {
        match record.message_id.as_deref() {
            Some(id) if !id.is_empty() => ids.push(id),
            _ => return Err(MissingMessageId(i)),
        }
    }
    let process = &process;
    let runs = event.records.iter().zip(&ids).map(|(record, id)| {
        let span = tracing::info_span!("record", message_id = %id);
        let receive_count = record
            .attributes
            .get("ApproximateReceiveCount")
            .cloned()
            .unwrap_or_default();
        async move {
            let outcome = AssertUnwindSafe(process(record)).catch_unwind().await;
            let failed = match outcome {
                Ok(Ok(())) => false,
                #[cfg(feature = "fault-injection")]
                Ok(Err(RecordError::Crash(crash))) => {
                    crate::metrics::record_failed("crash");
                    tracing::warn!(%crash, "record aborted");
                    true
                }
                Ok(Err(RecordError::Transient(e))) => {
                    crate::metrics::record_failed("transient");
                    tracing::warn!(error = %e, receive_count, "transient failure; SQS will retry");
                    true
                }
                Ok(Err(RecordError::Permanent(e))) => {
                    crate::metrics::record_failed("permanent");
                    tracing::error!(error = %e, receive_count, "message cannot be processed; it goes to the DLQ after maxReceiveCount");
                    true
                }
                Err(_) => {
                    crate::metrics::record_failed("panic");
                    tracing::error!(receive_count, "panic while processing record");
                    true
                }
            };
            failed.then(|| id.to_string())
        }
        .instrument(span)
    });
    let failures = futures::future::join_all(runs).await;
    let mut response = SqsBatchResponse::default();
    response.set_failures(failures.into_iter().flatten());
    Ok(response)
}
