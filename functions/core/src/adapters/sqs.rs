//! Sending saga messages to SQS: the [`Publish`] port on `SendMessage` and
//! `SendMessageBatch`.

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use crate::ports::Publish;

#[derive(Debug, thiserror::Error)]
#[error("SQS {op} to {queue_url} failed: {code}: {message}")]
pub struct PublishError {
    pub op: &'static str,
    pub queue_url: String,
    pub code: String,
    pub message: String,
}

impl PublishError {
    fn sdk(op: &'static str, queue_url: &str, e: impl ProvideErrorMetadata) -> Self {
        PublishError {
            op,
            queue_url: queue_url.into(),
            code: e.code().unwrap_or("Unknown").into(),
            message: e.message().unwrap_or_default().into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SqsPublisher {
    client: aws_sdk_sqs::Client,
}

impl SqsPublisher {
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        Self { client }
    }
}

impl Publish for SqsPublisher {
    async fn send_body(&self, queue_url: &str, body: String) -> Result<(), PublishError> {
        self.client
            .send_message()
            .queue_url(queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| PublishError::sdk("SendMessage", queue_url, e.into_service_error()))?;
        Ok(())
    }

    /// Ten to a `SendMessageBatch` call.
    async fn send_bodies(&self, queue_url: &str, bodies: Vec<String>) -> Result<(), PublishError> {
        for chunk in bodies.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body)
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
                    PublishError::sdk("SendMessageBatch", queue_url, e.into_service_error())
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
