//! The saga coordinator: applies results in whatever order they arrive, confirms, and
//! compensates.
//!
//! For each event: apply the fact with one conditional update (a duplicate or late fact leaves
//! the order as it is and costs no extra read), then look at the order as it now stands and do
//! what it calls for ([`crate::saga::follow_ups`]): confirm it, release its stock, refund its
//! payment. Every follow-up is idempotent, so a redelivered event simply does them again; that
//! is also what finishes the work of an invocation that died after its write.

use aws_lambda_events::event::sqs::SqsMessage;

use super::Function;
use super::batch::{RecordError, SqsHandler};
use crate::adapters::orders::DynamoOrders;
use crate::adapters::sqs::SqsPublisher;
use crate::aws::AwsClients;
use crate::config::{ConfigError, CoordinatorConfig, Lookup};
use crate::domain::Order;
use crate::faults::{FaultPoint, Faults};
use crate::messages::{self, PaymentCommand, SagaEvent, StockCommand};
use crate::ports::{FactUpdate, Orders, Publish, Update};
use crate::saga::{Compensation, Fact, follow_ups};

/// The `cancelDetail` of a customer's cancellation.
pub const CUSTOMER_CANCELLED_DETAIL: &str = "cancelled at the customer's request";

pub struct CoordinatorHandler<O = DynamoOrders, P = SqsPublisher> {
    orders: O,
    publisher: P,
    stock_queue_url: String,
    payment_queue_url: String,
    faults: Faults,
}

impl CoordinatorHandler {
    /// The handler on DynamoDB and SQS.
    pub fn new(clients: &AwsClients, config: CoordinatorConfig, faults: Faults) -> Self {
        Self::with_ports(
            DynamoOrders::new(clients.dynamodb.clone(), config.orders_table),
            SqsPublisher::new(clients.sqs.clone()),
            config.stock_queue_url,
            config.payment_queue_url,
            faults,
        )
    }
}

impl Function for CoordinatorHandler {
    fn from_env(
        clients: &AwsClients,
        env: &impl Lookup,
        faults: Faults,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(clients, CoordinatorConfig::load(env)?, faults))
    }
}

impl<O: Orders, P: Publish> SqsHandler for CoordinatorHandler<O, P> {
    async fn process(&self, record: &SqsMessage, _deadline_ms: i64) -> Result<(), RecordError> {
        let event = messages::parse(record.body.as_deref(), "coordinator", SagaEvent::order_id)?;
        let order_id = event.order_id();
        let now = crate::time::now_ms();
        let update = fact_update(&event);
        let mut order = match self.orders.apply(order_id, &update, now).await? {
            Update::Applied(order) => {
                tracing::info!(order_id, fact = ?update.fact, status = ?order.status, "applied");
                if let Some(reason) = cancelled_by(&update.fact, &order) {
                    crate::metrics::order_cancelled(reason);
                    tracing::info!(order_id, reason = reason.as_str(), "order cancelled");
                }
                order
            }
            Update::NotApplicable(order) => {
                tracing::info!(order_id, fact = ?update.fact, status = ?order.status, "already applied or too late; order unchanged");
                order
            }
            Update::NotFound => {
                return Err(RecordError::Permanent(format!(
                    "order {order_id} does not exist"
                )));
            }
        };
        if follow_ups(&order.saga_state()).confirm {
            match self.orders.confirm(order_id, now).await? {
                Update::Applied(confirmed) => {
                    crate::metrics::order_confirmed();
                    tracing::info!(
                        order_id,
                        total_cents = confirmed.total_cents,
                        "order confirmed"
                    );
                    order = confirmed;
                }
                Update::NotApplicable(current) => order = current,
                Update::NotFound => {
                    return Err(RecordError::Permanent(format!("order {order_id} vanished")));
                }
            }
        }
        self.faults.hit(FaultPoint::AfterWrite)?;
        self.compensate(&order).await?;
        self.faults.hit(FaultPoint::AfterPublish)?;
        if order.pending_sweep.as_deref() == Some(crate::domain::CANCELLING_SWEEP) {
            // The compensations of a customer's cancellation are on their queues: the sweeper
            // need not hand this order over again.
            self.orders.compensations_sent(order_id, now).await?;
        }
        Ok(())
    }
}

impl<O: Orders, P: Publish> CoordinatorHandler<O, P> {
    pub fn with_ports(
        orders: O,
        publisher: P,
        stock_queue_url: String,
        payment_queue_url: String,
        faults: Faults,
    ) -> Self {
        Self {
            orders,
            publisher,
            stock_queue_url,
            payment_queue_url,
            faults,
        }
    }

    /// Sends the compensations a cancelled order still needs: for a step whose success was
    /// seen, its undo; for a step whose result was not seen (in flight, in a DLQ, or not run
    /// yet), an undo that fences the step off if it has not run. Nothing waits for a result.
    /// Repeating them is harmless: the stock and payment functions apply each at most once
    /// per order.
    async fn compensate(&self, order: &Order) -> Result<(), RecordError> {
        let (release, refund) = compensations(order).map_err(RecordError::Permanent)?;
        if let Some(command) = release {
            tracing::info!(order_id = %order.order_id, ?command, "releasing stock of cancelled order");
            self.publisher.send(&self.stock_queue_url, &command).await?;
        }
        if let Some(command) = refund {
            tracing::info!(order_id = %order.order_id, ?command, "refunding payment of cancelled order");
            self.publisher
                .send(&self.payment_queue_url, &command)
                .await?;
        }
        Ok(())
    }
}

/// The commands that compensate a cancelled order as it stands ([`follow_ups`]), for whoever
/// cancelled it: the coordinator, or the API for a customer's cancellation. For a step whose
/// success was seen, its undo; for a step whose result was not seen (in flight, in a DLQ, or
/// not run yet), an undo that fences the step off if it has not run, so nothing waits for a
/// result message. Err when the order is inconsistent (charged without a payment id).
pub fn compensations(
    order: &Order,
) -> Result<(Option<StockCommand>, Option<PaymentCommand>), String> {
    let todo = follow_ups(&order.saga_state());
    let release = todo.release_stock.map(|how| StockCommand::ReleaseStock {
        order_id: order.order_id.clone(),
        items: order.stock_lines(),
        fence: how == Compensation::UndoOrFence,
    });
    let refund = match todo.refund_payment {
        None => None,
        Some(how) => Some(PaymentCommand::RefundPayment {
            order_id: order.order_id.clone(),
            payment_id: match how {
                Compensation::UndoOrFence => None,
                Compensation::Undo => Some(order.payment_id.clone().ok_or_else(|| {
                    format!("order {} is charged but has no payment id", order.order_id)
                })?),
            },
            amount_cents: order.total_cents,
        }),
    };
    Ok((release, refund))
}

/// The reason, if applying `fact` is what cancelled the order.
fn cancelled_by(fact: &Fact, order: &Order) -> Option<crate::domain::CancelReason> {
    let reason = match fact {
        Fact::StockRejected(reason) => *reason,
        Fact::PaymentDeclined => crate::domain::CancelReason::PaymentDeclined,
        Fact::TimedOut => crate::domain::CancelReason::Timeout,
        Fact::CustomerCancelled => crate::domain::CancelReason::CustomerCancelled,
        _ => return None,
    };
    (order.status == crate::domain::OrderStatus::Cancelled && order.cancel_reason == Some(reason))
        .then_some(reason)
}

fn fact_update(event: &SagaEvent) -> FactUpdate {
    match event {
        SagaEvent::StockReserved { .. } => FactUpdate::new(Fact::StockReserved),
        SagaEvent::StockRejected {
            reason, product_id, ..
        } => FactUpdate {
            cancel_detail: Some(match reason {
                messages::StockRejection::InsufficientStock => {
                    format!("not enough stock of product {product_id}")
                }
                messages::StockRejection::UnknownProduct => {
                    format!("product {product_id} does not exist")
                }
            }),
            cancel_product_id: Some(product_id.clone()),
            ..FactUpdate::new(Fact::StockRejected((*reason).into()))
        },
        SagaEvent::StockReleased { .. } => FactUpdate::new(Fact::StockReleased),
        SagaEvent::PaymentCharged { payment_id, .. } => FactUpdate {
            payment_id: Some(payment_id.clone()),
            ..FactUpdate::new(Fact::PaymentCharged)
        },
        SagaEvent::PaymentDeclined { reason, .. } => FactUpdate {
            cancel_detail: Some(format!("payment declined: {reason}")),
            ..FactUpdate::new(Fact::PaymentDeclined)
        },
        SagaEvent::PaymentRefunded { payment_id, .. } => FactUpdate {
            payment_id: Some(payment_id.clone()),
            ..FactUpdate::new(Fact::PaymentRefunded)
        },
        SagaEvent::StockVoided { .. } => FactUpdate::new(Fact::StockVoided),
        SagaEvent::PaymentVoided { .. } => FactUpdate::new(Fact::PaymentVoided),
        SagaEvent::OrderCancelled { .. } => FactUpdate {
            cancel_detail: Some(CUSTOMER_CANCELLED_DETAIL.into()),
            ..FactUpdate::new(Fact::CustomerCancelled)
        },
        SagaEvent::OrderTimedOut { cutoff_ms, .. } => FactUpdate {
            cutoff_ms: Some(*cutoff_ms),
            cancel_detail: Some("the order did not complete in time".into()),
            ..FactUpdate::new(Fact::TimedOut)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryQueues, MemoryStore};
    use crate::domain::OrderStatus;
    use crate::handlers::testing::{failed, order, sqs_event};
    use serde_json::json;

    const STOCK: &str = "stock";
    const PAYMENT: &str = "payment";

    fn handler() -> (
        CoordinatorHandler<MemoryStore, MemoryQueues>,
        MemoryStore,
        MemoryQueues,
    ) {
        let store = MemoryStore::default();
        let queues = MemoryQueues::default();
        store.insert_order(order("o-1", 2, 1_000));
        let h = CoordinatorHandler::with_ports(
            store.clone(),
            queues.clone(),
            STOCK.into(),
            PAYMENT.into(),
            Faults::none(),
        );
        (h, store, queues)
    }

    fn reserved() -> serde_json::Value {
        json!({"type": "StockReserved", "orderId": "o-1"})
    }

    fn charged() -> serde_json::Value {
        json!({"type": "PaymentCharged", "orderId": "o-1", "paymentId": "ch_1"})
    }

    #[tokio::test]
    async fn when_both_steps_succeed_in_any_order_should_confirm_once_without_compensating() {
        let (h, store, queues) = handler();
        for event in [charged(), reserved(), charged(), reserved()] {
            assert!(failed(&h.handle(sqs_event(&[event])).await.unwrap()).is_empty());
        }
        let order = store.order("o-1").unwrap();
        assert_eq!(order.status, OrderStatus::Confirmed);
        assert_eq!(order.payment_id.as_deref(), Some("ch_1"));
        assert_eq!(order.pending_sweep, None);
        assert!(queues.sent(STOCK).is_empty() && queues.sent(PAYMENT).is_empty());
    }

    #[tokio::test]
    async fn when_stock_is_rejected_after_the_charge_should_cancel_and_refund() {
        let (h, store, queues) = handler();
        let rejected = json!({"type": "StockRejected", "orderId": "o-1",
                              "reason": "INSUFFICIENT_STOCK", "productId": "p-1"});
        for event in [charged(), rejected.clone(), rejected] {
            h.handle(sqs_event(&[event])).await.unwrap();
        }
        let order = store.order("o-1").unwrap();
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(order.cancel_product_id.as_deref(), Some("p-1"));
        assert_eq!(
            order.cancel_detail.as_deref(),
            Some("not enough stock of product p-1")
        );
        let refunds = queues.sent(PAYMENT);
        // The duplicate rejection asks again; the payment function refunds once per order.
        assert_eq!(refunds.len(), 2);
        assert_eq!(
            refunds[0],
            json!({"type": "RefundPayment", "orderId": "o-1",
                                       "paymentId": "ch_1", "amountCents": 600})
        );
    }

    #[tokio::test]
    async fn when_a_decline_cancels_should_fence_the_unseen_reservation_then_release_it_once_seen()
    {
        let (h, store, queues) = handler();
        let declined =
            json!({"type": "PaymentDeclined", "orderId": "o-1", "reason": "CARD_DECLINED"});
        for event in [declined, reserved()] {
            h.handle(sqs_event(&[event])).await.unwrap();
        }
        let order = store.order("o-1").unwrap();
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(
            order.cancel_reason,
            Some(crate::domain::CancelReason::PaymentDeclined)
        );
        // At the decline, the reservation was not seen: release it if it ran, fence it if not.
        // Once seen, it is released (the stock function does it once, whichever comes first).
        let releases = queues.sent(STOCK);
        assert_eq!(
            releases,
            [
                json!({"type": "ReleaseStock", "orderId": "o-1",
                       "items": [{"productId": "p-1", "quantity": 2}], "fence": true}),
                json!({"type": "ReleaseStock", "orderId": "o-1",
                       "items": [{"productId": "p-1", "quantity": 2}]}),
            ]
        );
        assert!(queues.sent(PAYMENT).is_empty());
    }

    #[tokio::test]
    async fn when_a_timeout_meets_a_finished_saga_should_not_cancel_it() {
        let (h, store, _) = handler();
        let timed_out = json!({"type": "OrderTimedOut", "orderId": "o-1", "cutoffMs": 5_000});
        for event in [reserved(), charged(), timed_out] {
            h.handle(sqs_event(&[event])).await.unwrap();
        }
        assert_eq!(store.order("o-1").unwrap().status, OrderStatus::Confirmed);
    }

    #[tokio::test]
    async fn when_the_order_does_not_exist_should_fail_the_record() {
        let (h, _, _) = handler();
        let r = h
            .handle(sqs_event(&[
                json!({"type": "StockReserved", "orderId": "o-404"}),
            ]))
            .await
            .unwrap();
        assert_eq!(failed(&r), ["m0"]);
    }
}
