//! The payment function: charges an order, and refunds it on compensation.
//!
//! The provider is outside DynamoDB, so the step is claim, act, complete: the claim
//! (`{orderId}#charge` or `#refund`, `IN_PROGRESS` until this invocation's deadline) stops a
//! concurrent duplicate; the provider call carries the same key, so a retry after a crash in
//! the middle of the call gets the first result; the completed record replays that result.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::LambdaEvent;

use super::batch::{deadline_ms, process_batch, RecordError};
use super::stock::{replay, to_json};
use crate::adapters::payment::{
    ChargeOutcome, ChargeRequest, PaymentProvider, RefundRequest, SimulatedProvider,
};
use crate::adapters::sqs::Publisher;
use crate::aws::AwsClients;
use crate::config::PaymentConfig;
use crate::faults::{FaultPoint, Faults};
use crate::idempotency::{self, Claim, ClaimRequest, IdempotencyStore};
use crate::messages::{self, PaymentCommand, SagaEvent};

pub struct PaymentHandler<P: PaymentProvider = SimulatedProvider> {
    idempotency: IdempotencyStore,
    provider: P,
    publisher: Publisher,
    coordinator_queue_url: String,
    faults: Faults,
}

impl PaymentHandler<SimulatedProvider> {
    pub fn new(clients: &AwsClients, config: PaymentConfig, faults: Faults) -> Self {
        let provider = SimulatedProvider::new(
            clients.dynamodb.clone(),
            &config.ledger_table,
            config.failure_rate,
        );
        Self::with_provider(clients, config, provider, faults)
    }
}

impl<P: PaymentProvider> PaymentHandler<P> {
    pub fn with_provider(
        clients: &AwsClients,
        config: PaymentConfig,
        provider: P,
        faults: Faults,
    ) -> Self {
        Self {
            idempotency: IdempotencyStore::new(clients.dynamodb.clone(), config.idempotency_table),
            provider,
            publisher: Publisher::new(clients.sqs.clone()),
            coordinator_queue_url: config.coordinator_queue_url,
            faults,
        }
    }

    pub async fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, lambda_runtime::Error> {
        let deadline = deadline_ms(&event.context, 15_000);
        Ok(process_batch(&event.payload, |record| self.process(record, deadline)).await?)
    }

    async fn process(&self, record: &SqsMessage, deadline: i64) -> Result<(), RecordError> {
        let command = messages::parse(record.body.as_deref(), "payment", PaymentCommand::order_id)?;
        let order_id = command.order_id().to_string();
        let key = match &command {
            PaymentCommand::ChargePayment { .. } => format!("{order_id}#charge"),
            PaymentCommand::RefundPayment { .. } => format!("{order_id}#refund"),
        };
        let hash = idempotency::payload_hash(&command);
        let now = crate::time::now_ms();
        let claim = ClaimRequest {
            key: &key,
            payload_hash: &hash,
            in_progress_until_ms: deadline,
            ttl: idempotency::STEP_RECORD_TTL,
            take_over_expired: true,
            order_id: Some(&order_id),
        };
        let result = match self.idempotency.claim(&claim, now).await? {
            Claim::Existing(record) => replay(&record, &hash, now)?,
            Claim::Acquired => {
                let result = match self.call_provider(&key, &command).await {
                    Ok(result) => result,
                    Err(RecordError::Crash(c)) => return Err(c.into()),
                    Err(e) => {
                        // A failed call gives up its claim so that the retry runs.
                        self.idempotency.release(&key).await?;
                        return Err(e);
                    }
                };
                self.idempotency.complete(&key, &to_json(&result)).await?;
                self.faults.hit(FaultPoint::AfterWrite)?;
                result
            }
        };
        self.publisher
            .send(&self.coordinator_queue_url, &result)
            .await?;
        self.faults.hit(FaultPoint::AfterPublish)?;
        Ok(())
    }

    async fn call_provider(
        &self,
        key: &str,
        command: &PaymentCommand,
    ) -> Result<SagaEvent, RecordError> {
        let result = match command {
            PaymentCommand::ChargePayment {
                order_id,
                customer_id,
                amount_cents,
                payment_method,
            } => {
                let outcome = self
                    .provider
                    .charge(ChargeRequest {
                        idempotency_key: key,
                        order_id,
                        customer_id,
                        amount_cents: *amount_cents,
                        payment_method,
                    })
                    .await?;
                tracing::info!(order_id, ?outcome, "charge");
                match outcome {
                    ChargeOutcome::Approved { payment_id } => SagaEvent::PaymentCharged {
                        order_id: order_id.clone(),
                        payment_id,
                    },
                    ChargeOutcome::Declined { reason } => SagaEvent::PaymentDeclined {
                        order_id: order_id.clone(),
                        reason,
                    },
                }
            }
            PaymentCommand::RefundPayment {
                order_id,
                payment_id,
                amount_cents,
            } => {
                let outcome = self
                    .provider
                    .refund(RefundRequest {
                        idempotency_key: key,
                        order_id,
                        payment_id,
                        amount_cents: *amount_cents,
                    })
                    .await?;
                crate::metrics::compensation("refund");
                tracing::info!(order_id, refund_id = %outcome.refund_id, "refund");
                SagaEvent::PaymentRefunded {
                    order_id: order_id.clone(),
                    payment_id: payment_id.clone(),
                }
            }
        };
        // The provider has acted; dying here is the crash "in the middle of the payment call".
        self.faults.hit(FaultPoint::InPayment)?;
        Ok(result)
    }
}
