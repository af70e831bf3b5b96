//! The payment function: charges an order, and refunds it on compensation.
//!
//! The provider is outside DynamoDB, so the step is claim, act, complete: the claim
//! (`{orderId}#charge` or `#refund`, `IN_PROGRESS` until this invocation's deadline) stops a
//! concurrent duplicate; the provider call carries the same key, so a retry after a crash in
//! the middle of the call gets the first result; the completed record replays that result.

use aws_lambda_events::event::sqs::SqsMessage;

use super::Function;
use super::batch::{RecordError, SqsHandler};
use crate::adapters::payment::{ChargeOutcome, ChargeRequest, RefundRequest, SimulatedProvider};
use crate::adapters::sqs::SqsPublisher;
use crate::aws::AwsClients;
use crate::config::{ConfigError, Lookup, PaymentConfig};
use crate::faults::{FaultPoint, Faults};
use crate::idempotency::dynamo::DynamoIdempotency;
use crate::idempotency::{
    self, Claim, ClaimRequest, Completed, Idempotency, Outcome, Status, StepKey,
};
use crate::messages::{self, PaymentCommand, SagaEvent};
use crate::ports::{PaymentProvider, Publish, to_json};

pub struct PaymentHandler<I = DynamoIdempotency, V = SimulatedProvider, P = SqsPublisher> {
    idempotency: I,
    provider: V,
    publisher: P,
    coordinator_queue_url: String,
    faults: Faults,
}

impl PaymentHandler {
    /// The handler on DynamoDB and SQS.
    pub fn new(clients: &AwsClients, config: PaymentConfig, faults: Faults) -> Self {
        Self::with_ports(
            DynamoIdempotency::new(clients.dynamodb.clone(), config.idempotency_table),
            SimulatedProvider::new(
                clients.dynamodb.clone(),
                &config.ledger_table,
                config.failure_rate,
            ),
            SqsPublisher::new(clients.sqs.clone()),
            config.coordinator_queue_url,
            faults,
        )
    }
}

impl Function for PaymentHandler {
    fn from_env(
        clients: &AwsClients,
        env: &impl Lookup,
        faults: Faults,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(clients, PaymentConfig::load(env)?, faults))
    }
}

impl<I: Idempotency, V: PaymentProvider, P: Publish> SqsHandler for PaymentHandler<I, V, P> {
    async fn process(&self, record: &SqsMessage, deadline: i64) -> Result<(), RecordError> {
        let command = messages::parse(record.body.as_deref(), "payment", PaymentCommand::order_id)?;
        let now = crate::time::now_ms();
        let command = match command {
            // An order cancelled before its charge was seen: refund the charge if it happened,
            // fence it off if it has not.
            PaymentCommand::RefundPayment {
                order_id,
                payment_id: None,
                amount_cents,
            } => match self.charge_or_fence(&order_id, now).await? {
                Seen::Charged(payment_id) => PaymentCommand::RefundPayment {
                    order_id,
                    payment_id: Some(payment_id),
                    amount_cents,
                },
                Seen::Answer(result) => return self.publish(&result).await,
            },
            command => command,
        };
        let order_id = command.order_id();
        let (key, outcome_of): (_, fn(&SagaEvent) -> Outcome) = match &command {
            PaymentCommand::ChargePayment { .. } => (StepKey::Charge(order_id), charge_outcome),
            PaymentCommand::RefundPayment { .. } => (StepKey::Refund(order_id), refund_outcome),
        };
        let hash = idempotency::payload_hash(&command);
        let claim = ClaimRequest {
            key,
            payload_hash: &hash,
            in_progress_until_ms: deadline,
            ttl: idempotency::STEP_RECORD_TTL,
            take_over_expired: true,
            order_id: Some(order_id),
        };
        let result = match self.idempotency.claim(&claim, now).await? {
            Claim::Existing(record) => idempotency::replay(&record, &hash, now)?,
            Claim::Acquired => {
                let result = match self.call_provider(key, &command).await {
                    Ok(result) => result,
                    Err(e) if e.is_crash() => return Err(e),
                    Err(e) => {
                        // A failed call gives up its claim so that the retry runs.
                        self.idempotency.release(key).await?;
                        return Err(e);
                    }
                };
                (self.idempotency)
                    .complete(key, &to_json(&result), Some(outcome_of(&result)))
                    .await?;
                self.faults.hit(FaultPoint::AfterWrite)?;
                result
            }
        };
        self.publish(&result).await
    }
}

/// What a refund of an order cancelled before its charge was seen finds on the charge's key.
enum Seen {
    /// The order was charged: refund this payment.
    Charged(String),
    /// Nothing to refund; answer the coordinator with this (the fence's `PaymentVoided`, or
    /// the charge's own recorded `PaymentDeclined`).
    Answer(SagaEvent),
}

fn charge_outcome(result: &SagaEvent) -> Outcome {
    match result {
        SagaEvent::PaymentCharged { .. } => Outcome::Charged,
        _ => Outcome::Declined,
    }
}

fn refund_outcome(_: &SagaEvent) -> Outcome {
    Outcome::Refunded
}

impl<I: Idempotency, V: PaymentProvider, P: Publish> PaymentHandler<I, V, P> {
    pub fn with_ports(
        idempotency: I,
        provider: V,
        publisher: P,
        coordinator_queue_url: String,
        faults: Faults,
    ) -> Self {
        Self {
            idempotency,
            provider,
            publisher,
            coordinator_queue_url,
            faults,
        }
    }

    async fn publish(&self, result: &SagaEvent) -> Result<(), RecordError> {
        self.publisher
            .send(&self.coordinator_queue_url, result)
            .await?;
        self.faults.hit(FaultPoint::AfterPublish)?;
        Ok(())
    }

    /// Fences the charge of a cancelled order off unless it already happened: one conditional
    /// put of a completed `VOIDED` record on `{orderId}#charge`. If the key is taken, its record
    /// says what became of the charge. A charge still in progress is waited for (the refund is
    /// retried), since only its end says whether money moved.
    async fn charge_or_fence(&self, order_id: &str, now: i64) -> Result<Seen, RecordError> {
        let voided = SagaEvent::PaymentVoided {
            order_id: order_id.into(),
        };
        let voided_json = to_json(&voided);
        let fence = Completed::fence(StepKey::Charge(order_id), &voided_json);
        match self.idempotency.put_completed(&fence, now).await? {
            Claim::Acquired => {
                crate::metrics::compensation("fence_charge");
                tracing::info!(
                    order_id,
                    "order cancelled before it was charged; the charge is fenced off"
                );
                Ok(Seen::Answer(voided))
            }
            Claim::Existing(record) => {
                if let Some(payment_id) = idempotency::charged_payment_id(&record) {
                    return Ok(Seen::Charged(payment_id));
                }
                match (record.status, record.result.as_deref()) {
                    (Status::Completed, Some(result)) => {
                        serde_json::from_str(result).map(Seen::Answer).map_err(|e| {
                            RecordError::Permanent(format!(
                                "stored result of {} is unreadable: {e}",
                                record.id
                            ))
                        })
                    }
                    _ => Err(RecordError::Transient(format!(
                        "the charge of order {order_id} is in progress; its refund waits for it"
                    ))),
                }
            }
        }
    }

    async fn call_provider(
        &self,
        key: StepKey<'_>,
        command: &PaymentCommand,
    ) -> Result<SagaEvent, RecordError> {
        let key = &key.to_string();
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
                let payment_id = payment_id.as_ref().ok_or_else(|| {
                    RecordError::Permanent(format!("order {order_id}: a refund without a charge"))
                })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryProvider, MemoryQueues, MemoryStore};
    use crate::handlers::testing::{failed, sqs_event};
    use crate::idempotency::Status;
    use serde_json::json;

    const COORDINATOR: &str = "coordinator";

    type Handler = PaymentHandler<MemoryStore, MemoryProvider, MemoryQueues>;

    fn handler() -> (Handler, MemoryStore, MemoryProvider, MemoryQueues) {
        let (store, provider, queues) = Default::default();
        let h = PaymentHandler::with_ports(
            MemoryStore::clone(&store),
            MemoryProvider::clone(&provider),
            MemoryQueues::clone(&queues),
            COORDINATOR.into(),
            Faults::none(),
        );
        (h, store, provider, queues)
    }

    fn charge(order: &str, method: &str) -> serde_json::Value {
        json!({"type": "ChargePayment", "orderId": order, "customerId": "c-1",
               "amountCents": 1200, "paymentMethod": method})
    }

    #[tokio::test]
    async fn when_a_charge_is_delivered_twice_should_charge_once_and_answer_twice() {
        let (h, store, provider, queues) = handler();
        let r = h
            .handle(sqs_event(&[
                charge("o-1", "tok_visa"),
                charge("o-1", "tok_visa"),
            ]))
            .await
            .unwrap();
        // Two copies in one batch: one charges, the other finds the key held and is retried.
        assert!(failed(&r).len() <= 1);
        h.handle(sqs_event(&[charge("o-1", "tok_visa")]))
            .await
            .unwrap();
        assert_eq!(provider.charged(), [("o-1#charge".to_string(), 1200)]);
        let sent = queues.sent(COORDINATOR);
        assert!(sent.len() >= 2);
        let ids: Vec<_> = sent.iter().map(|m| m["paymentId"].clone()).collect();
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "every answer names the one charge"
        );
        assert_eq!(
            store.record(StepKey::Charge("o-1")).unwrap().status,
            Status::Completed
        );
    }

    #[tokio::test]
    async fn when_the_card_is_declined_should_answer_declined_and_move_no_money() {
        let (h, _, provider, queues) = handler();
        h.handle(sqs_event(&[charge("o-1", "tok_chargeDeclined")]))
            .await
            .unwrap();
        assert!(provider.charged().is_empty());
        let sent = queues.sent(COORDINATOR);
        assert_eq!(sent[0]["type"], "PaymentDeclined");
        assert_eq!(sent[0]["reason"], "CARD_DECLINED");
    }

    #[tokio::test]
    async fn when_the_provider_is_down_should_free_the_key_so_the_retry_charges_once() {
        let (h, store, provider, queues) = handler();
        provider.unavailable_for(1);
        let r = h
            .handle(sqs_event(&[charge("o-1", "tok_visa")]))
            .await
            .unwrap();
        assert_eq!(failed(&r), ["m0"]);
        assert_eq!(
            store.record(StepKey::Charge("o-1")),
            None,
            "the claim was given up"
        );
        let r = h
            .handle(sqs_event(&[charge("o-1", "tok_visa")]))
            .await
            .unwrap();
        assert!(failed(&r).is_empty());
        assert_eq!(provider.charged().len(), 1);
        assert_eq!(queues.sent(COORDINATOR)[0]["type"], "PaymentCharged");
    }

    #[tokio::test]
    async fn when_refunding_twice_should_refund_once_and_refuse_a_changed_payload() {
        let (h, _, provider, queues) = handler();
        let refund = json!({"type": "RefundPayment", "orderId": "o-1", "paymentId": "ch_0", "amountCents": 1200});
        for _ in 0..2 {
            assert!(
                failed(
                    &h.handle(sqs_event(std::slice::from_ref(&refund)))
                        .await
                        .unwrap()
                )
                .is_empty()
            );
        }
        assert_eq!(provider.refunded(), [("o-1#refund".to_string(), 1200)]);
        assert_eq!(queues.sent(COORDINATOR).len(), 2);
        let mut changed = refund.clone();
        changed["amountCents"] = json!(5);
        assert_eq!(
            failed(&h.handle(sqs_event(&[changed])).await.unwrap()),
            ["m0"]
        );
        assert_eq!(provider.refunded().len(), 1);
    }

    fn refund_unseen(order: &str) -> serde_json::Value {
        json!({"type": "RefundPayment", "orderId": order, "amountCents": 1200})
    }

    #[tokio::test]
    async fn when_a_cancelled_order_was_never_charged_should_fence_so_a_late_charge_charges_nothing()
     {
        let (h, store, provider, queues) = handler();
        for _ in 0..2 {
            let r = h.handle(sqs_event(&[refund_unseen("o-1")])).await.unwrap();
            assert!(failed(&r).is_empty());
        }
        // The ChargePayment that was still being retried arrives after the cancellation.
        let r = h
            .handle(sqs_event(&[charge("o-1", "tok_visa")]))
            .await
            .unwrap();
        assert!(failed(&r).is_empty());
        assert!(
            provider.charged().is_empty(),
            "no charge after the cancellation"
        );
        assert!(provider.refunded().is_empty());
        let types: Vec<_> = queues
            .sent(COORDINATOR)
            .iter()
            .map(|m| m["type"].clone())
            .collect();
        assert_eq!(types, ["PaymentVoided", "PaymentVoided", "PaymentVoided"]);
        assert_eq!(
            store.record(StepKey::Charge("o-1")).unwrap().outcome,
            Some(Outcome::Voided)
        );
    }

    #[tokio::test]
    async fn when_a_cancelled_order_was_charged_unseen_should_refund_that_charge_once() {
        let (h, store, provider, queues) = handler();
        h.handle(sqs_event(&[charge("o-1", "tok_visa")]))
            .await
            .unwrap();
        let payment_id = queues.sent(COORDINATOR)[0]["paymentId"].clone();
        assert_eq!(
            store.record(StepKey::Charge("o-1")).unwrap().outcome,
            Some(Outcome::Charged)
        );
        // The fenced refund (the charge's result not seen), then the plain one (seen later).
        let seen = json!({"type": "RefundPayment", "orderId": "o-1", "paymentId": payment_id,
                          "amountCents": 1200});
        for event in [refund_unseen("o-1"), seen, refund_unseen("o-1")] {
            let r = h.handle(sqs_event(&[event])).await.unwrap();
            assert!(failed(&r).is_empty());
        }
        assert_eq!(provider.charged().len(), 1);
        assert_eq!(provider.refunded(), [("o-1#refund".to_string(), 1200)]);
        let sent = queues.sent(COORDINATOR);
        assert_eq!(sent.len(), 4);
        assert!(
            sent[1..]
                .iter()
                .all(|m| m["type"] == "PaymentRefunded" && m["paymentId"] == payment_id)
        );
    }

    #[tokio::test]
    async fn when_a_declined_order_is_refunded_unseen_should_answer_the_decline_and_move_nothing() {
        let (h, _, provider, queues) = handler();
        h.handle(sqs_event(&[charge("o-1", "tok_chargeDeclined")]))
            .await
            .unwrap();
        h.handle(sqs_event(&[refund_unseen("o-1")])).await.unwrap();
        assert!(provider.charged().is_empty() && provider.refunded().is_empty());
        let types: Vec<_> = queues
            .sent(COORDINATOR)
            .iter()
            .map(|m| m["type"].clone())
            .collect();
        assert_eq!(types, ["PaymentDeclined", "PaymentDeclined"]);
    }
}
