//! Moving messages from a dead-letter queue back to its source queue.
//!
//! By receive, send and delete, which works everywhere (moto has no `StartMessageMoveTask`);
//! on AWS, [`start_move_task`] asks SQS to do it instead. A redriven message gets a new message
//! id, which is fine: every consumer deduplicates by business key, never by message id.

use aws_sdk_sqs::types::{MessageSystemAttributeName, SendMessageBatchRequestEntry};

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("SQS {op} failed: {message}")]
    Sqs { op: &'static str, message: String },
}

fn sqs_error<E: std::error::Error + 'static>(op: &'static str) -> impl Fn(E) -> RedriveError {
    move |e| RedriveError::Sqs {
        op,
        message: aws_sdk_sqs::error::DisplayErrorContext(e).to_string(),
    }
}

/// Moves up to `max` messages (all, if `None`) from `dlq_url` to `target_url`. Each message is
/// deleted from the DLQ only after it was sent; a message whose send failed stays in the DLQ.
/// Returns how many were moved.
pub async fn redrive(
    sqs: &aws_sdk_sqs::Client,
    dlq_url: &str,
    target_url: &str,
    max: Option<usize>,
) -> Result<usize, RedriveError> {
    let mut moved = 0usize;
    loop {
        let want = max.map(|m| m.saturating_sub(moved)).unwrap_or(10).min(10);
        if want == 0 {
            return Ok(moved);
        }
        let out = sqs
            .receive_message()
            .queue_url(dlq_url)
            .max_number_of_messages(want as i32)
            .wait_time_seconds(1)
            .visibility_timeout(60)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(sqs_error("ReceiveMessage"))?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return Ok(moved);
        }
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(m.body.clone().unwrap_or_default())
                    .set_message_attributes(m.message_attributes.clone())
                    .build()
                    .expect("id and body are set")
            })
            .collect::<Vec<_>>();
        let sent = sqs
            .send_message_batch()
            .queue_url(target_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(sqs_error("SendMessageBatch"))?;
        for ok in sent.successful {
            let Ok(i) = ok.id.parse::<usize>() else {
                continue;
            };
            let Some(handle) = messages.get(i).and_then(|m| m.receipt_handle.clone()) else {
                continue;
            };
            sqs.delete_message()
                .queue_url(dlq_url)
                .receipt_handle(handle)
                .send()
                .await
                .map_err(sqs_error("DeleteMessage"))?;
            moved += 1;
        }
        for failed in sent.failed {
            tracing::error!(
                id = failed.id,
                code = failed.code,
                "message could not be sent back; it stays in the DLQ"
            );
        }
    }
}

/// Asks SQS (on AWS) to move every message of the DLQ back to its source queue. Returns the
/// task handle. moto answers this with an error; use [`redrive`] there.
pub async fn start_move_task(
    sqs: &aws_sdk_sqs::Client,
    dlq_arn: &str,
) -> Result<String, RedriveError> {
    let out = sqs
        .start_message_move_task()
        .source_arn(dlq_arn)
        .send()
        .await
        .map_err(sqs_error("StartMessageMoveTask"))?;
    Ok(out.task_handle.unwrap_or_default())
}
