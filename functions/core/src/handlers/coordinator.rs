//! The saga coordinator: applies results in whatever order they arrive, confirms, and
//! compensates.
//!
//! For each event: apply the fact with one conditional update (a duplicate or late fact leaves
//! the order as it is and costs no extra read), then look at the order as it now stands and do
//! what it calls for ([`crate::saga::follow_ups`]): confirm it, release its stock, refund its
//! payment. Every follow-up is idempotent, so a redelivered event simply does them again; that
//! is also what finishes the work of an invocation that died after its write.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::LambdaEvent;

use super::batch::{process_batch, RecordError};
use crate::adapters::orders::{FactUpdate, OrderStore, Update};
use crate::adapters::sqs::Publisher;
use crate::aws::AwsClients;
use crate::config::CoordinatorConfig;
use crate::domain::Order;
use crate::faults::{FaultPoint, Faults};
use crate::messages::{self, PaymentCommand, SagaEvent, StockCommand};
use crate::saga::{follow_ups, Fact};

pub struct CoordinatorHandler {
    orders: OrderStore,
    publisher: Publisher,
    stock_queue_url: String,
    payment_queue_url: String,
    faults: Faults,
}

impl CoordinatorHandler {
    pub fn new(clients: &AwsClients, config: CoordinatorConfig, faults: Faults) -> Self {
        Self {
            orders: OrderStore::new(clients.dynamodb.clone(), config.orders_table),
            publisher: Publisher::new(clients.sqs.clone()),
            stock_queue_url: config.stock_queue_url,
            payment_queue_url: config.payment_queue_url,
            faults,
        }
    }

    pub async fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, lambda_runtime::Error> {
        Ok(process_batch(&event.payload, |record| self.process(record)).await?)
    }

    async fn process(&self, record: &SqsMessage) -> Result<(), RecordError> {
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
                    return Err(RecordError::Permanent(format!("order {order_id} vanished")))
                }
            }
        }
        self.faults.hit(FaultPoint::AfterWrite)?;
        self.compensate(&order).await?;
        self.faults.hit(FaultPoint::AfterPublish)?;
        Ok(())
    }

    /// Sends the compensations a cancelled order still needs. Repeating them is harmless: the
    /// stock and payment functions apply each at most once per order.
    async fn compensate(&self, order: &Order) -> Result<(), RecordError> {
        let todo = follow_ups(&order.saga_state());
        if todo.release_stock {
            tracing::info!(order_id = %order.order_id, "releasing stock of cancelled order");
            let command = StockCommand::ReleaseStock {
                order_id: order.order_id.clone(),
                items: order.stock_lines(),
            };
            self.publisher.send(&self.stock_queue_url, &command).await?;
        }
        if todo.refund_payment {
            let payment_id = order.payment_id.clone().ok_or_else(|| {
                RecordError::Permanent(format!(
                    "order {} is charged but has no payment id",
                    order.order_id
                ))
            })?;
            tracing::info!(order_id = %order.order_id, "refunding payment of cancelled order");
            let command = PaymentCommand::RefundPayment {
                order_id: order.order_id.clone(),
                payment_id,
                amount_cents: order.total_cents,
            };
            self.publisher
                .send(&self.payment_queue_url, &command)
                .await?;
        }
        Ok(())
    }
}

/// The reason, if applying `fact` is what cancelled the order.
fn cancelled_by(fact: &Fact, order: &Order) -> Option<crate::domain::CancelReason> {
    let reason = match fact {
        Fact::StockRejected(reason) => *reason,
        Fact::PaymentDeclined => crate::domain::CancelReason::PaymentDeclined,
        Fact::TimedOut => crate::domain::CancelReason::Timeout,
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
        SagaEvent::PaymentRefunded { .. } => FactUpdate::new(Fact::PaymentRefunded),
        SagaEvent::OrderTimedOut { cutoff_ms, .. } => FactUpdate {
            cutoff_ms: Some(*cutoff_ms),
            cancel_detail: Some("the order did not complete in time".into()),
            ..FactUpdate::new(Fact::TimedOut)
        },
    }
}
