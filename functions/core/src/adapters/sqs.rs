//! Sending saga messages to SQS.

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
#[error("SQS {op} to {queue_url} failed: {code}: {message}")]
pub struct PublishError {
    pub op: &'static str,
    pub queue_url: String,
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct Publisher {
    client: aws_sdk_sqs::Client,
}

impl Publisher {
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        Self { client }
    }

    /// Sends one message. An error is returned, never swallowed: the caller's record then
    /// fails and SQS retries it, and the step's idempotency record makes the retry re-publish.
    pub async fn send(
        &self,
        queue_url: &str,
        message: &impl Serialize,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_string(message).expect("saga messages always serialize");
        self.client
            .send_message()
            .queue_url(queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| {
                let e = e.into_service_error();
                PublishError {
                    op: "SendMessage",
                    queue_url: queue_url.into(),
                    code: e.code().unwrap_or("Unknown").into(),
                    message: e.message().unwrap_or_default().into(),
                }
            })?;
        Ok(())
    }

    /// Sends many messages, ten to a `SendMessageBatch` call. Fails if any entry failed.
    pub async fn send_all<M: Serialize>(
        &self,
        queue_url: &str,
        messages: &[M],
    ) -> Result<(), PublishError> {
        for chunk in messages.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(
                            serde_json::to_string(m).expect("saga messages always serialize"),
                        )
                        .build()
                        .expect("id and body are set")
                })
                .collect::<Vec<_>>();
            let out = self
                .client
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    let e = e.into_service_error();
                    PublishError {
                        op: "SendMessageBatch",
                        queue_url: queue_url.into(),
                        code: e.code().unwrap_or("Unknown").into(),
                        message: e.message().unwrap_or_default().into(),
                    }
                })?;
            if let Some(failed) = out.failed.first() {
                return Err(PublishError {
                    op: "SendMessageBatch",
                    queue_url: queue_url.into(),
                    code: failed.code.clone(),
                    message: failed.message.clone().unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}
