//! The stock function: reserves an order's items, and releases them on compensation.

use aws_lambda_events::event::sqs::SqsMessage;

use super::Function;
use super::batch::{RecordError, SqsHandler};
use crate::adapters::sqs::SqsPublisher;
use crate::adapters::stock::DynamoStock;
use crate::aws::AwsClients;
use crate::config::{ConfigError, Lookup, StockConfig};
use crate::domain::StockLine;
use crate::faults::{FaultPoint, Faults};
use crate::idempotency::dynamo::DynamoIdempotency;
use crate::idempotency::{self, Claim, Completed, Idempotency, Outcome, StepKey};
use crate::messages::{self, SagaEvent, StockCommand, StockRejection};
use crate::ports::{Publish, ReleaseOutcome, ReserveOutcome, Stock, to_json};

pub struct StockHandler<S = DynamoStock, I = DynamoIdempotency, P = SqsPublisher> {
    stock: S,
    idempotency: I,
    publisher: P,
    coordinator_queue_url: String,
    faults: Faults,
}

impl StockHandler {
    /// The handler on DynamoDB and SQS.
    pub fn new(clients: &AwsClients, config: StockConfig, faults: Faults) -> Self {
        let idempotency =
            DynamoIdempotency::new(clients.dynamodb.clone(), config.idempotency_table);
        Self::with_ports(
            DynamoStock::new(
                clients.dynamodb.clone(),
                config.products_table,
                idempotency.clone(),
            ),
            idempotency,
            SqsPublisher::new(clients.sqs.clone()),
            config.coordinator_queue_url,
            faults,
        )
    }
}

impl Function for StockHandler {
    fn from_env(
        clients: &AwsClients,
        env: &impl Lookup,
        faults: Faults,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(clients, StockConfig::load(env)?, faults))
    }
}

impl<S: Stock, I: Idempotency, P: Publish> SqsHandler for StockHandler<S, I, P> {
    async fn process(&self, record: &SqsMessage, _deadline_ms: i64) -> Result<(), RecordError> {
        let command = messages::parse(record.body.as_deref(), "stock", StockCommand::order_id)?;
        let now = crate::time::now_ms();
        let result = match &command {
            StockCommand::ReserveStock { order_id, items } => {
                self.reserve(order_id, items, now).await?
            }
            StockCommand::ReleaseStock {
                order_id,
                items,
                fence,
            } => self.release(order_id, items, *fence, now).await?,
        };
        self.faults.hit(FaultPoint::AfterWrite)?;
        self.publisher
            .send(&self.coordinator_queue_url, &result)
            .await?;
        self.faults.hit(FaultPoint::AfterPublish)?;
        Ok(())
    }
}

impl<S: Stock, I: Idempotency, P: Publish> StockHandler<S, I, P> {
    pub fn with_ports(
        stock: S,
        idempotency: I,
        publisher: P,
        coordinator_queue_url: String,
        faults: Faults,
    ) -> Self {
        Self {
            stock,
            idempotency,
            publisher,
            coordinator_queue_url,
            faults,
        }
    }

    async fn reserve(
        &self,
        order_id: &str,
        items: &[StockLine],
        now: i64,
    ) -> Result<SagaEvent, RecordError> {
        validate_lines(items)?;
        let hash = idempotency::payload_hash(&items);
        let reserved = SagaEvent::StockReserved {
            order_id: order_id.into(),
        };
        let reserved_json = to_json(&reserved);
        let done = Completed {
            key: StepKey::Reserve(order_id),
            payload_hash: &hash,
            result: &reserved_json,
            outcome: Some(Outcome::Reserved),
            ttl: idempotency::STEP_RECORD_TTL,
        };
        match self.stock.reserve(items, &done, now).await? {
            ReserveOutcome::Reserved => {
                tracing::info!(order_id, "stock reserved");
                Ok(reserved)
            }
            ReserveOutcome::AlreadyDone(record) => Ok(idempotency::replay(&record, &hash, now)?),
            ReserveOutcome::Rejected { reason, product_id } => {
                tracing::info!(
                    order_id,
                    product_id,
                    ?reason,
                    "stock rejected; nothing reserved"
                );
                let rejected = SagaEvent::StockRejected {
                    order_id: order_id.into(),
                    reason,
                    product_id,
                };
                // Record the rejection too, so a redelivery replays it rather than trying again
                // against stock that may have changed in the meantime.
                let rejected_json = to_json(&rejected);
                let done = Completed {
                    result: &rejected_json,
                    outcome: Some(Outcome::Rejected),
                    ..done
                };
                match self.idempotency.put_completed(&done, now).await? {
                    Claim::Acquired => Ok(rejected),
                    Claim::Existing(record) => Ok(idempotency::replay(&record, &hash, now)?),
                }
            }
        }
    }

    /// Gives back the order's reservation; with `fence`, fences off one that has not
    /// happened. A release that must find a reservation (no fence: the coordinator saw
    /// `StockReserved`) and finds none is a fault for the DLQ and its alarm.
    async fn release(
        &self,
        order_id: &str,
        items: &[StockLine],
        fence: bool,
        now: i64,
    ) -> Result<SagaEvent, RecordError> {
        validate_lines(items)?;
        let hash = idempotency::payload_hash(&items);
        let released = SagaEvent::StockReleased {
            order_id: order_id.into(),
        };
        let released_json = to_json(&released);
        let voided = SagaEvent::StockVoided {
            order_id: order_id.into(),
        };
        let voided_json = to_json(&voided);
        let done = Completed {
            key: StepKey::Release(order_id),
            payload_hash: &hash,
            result: &released_json,
            outcome: Some(Outcome::Released),
            ttl: idempotency::STEP_RECORD_TTL,
        };
        let fence_record = Completed::fence(StepKey::Reserve(order_id), &voided_json);
        let reservation = StepKey::Reserve(order_id);
        match (self.stock)
            .release(
                items,
                &done,
                reservation,
                fence.then_some(&fence_record),
                now,
            )
            .await?
        {
            ReleaseOutcome::Released => {
                crate::metrics::compensation("release");
                tracing::info!(order_id, "stock released");
                Ok(released)
            }
            ReleaseOutcome::AlreadyDone(record) => Ok(idempotency::replay(&record, &hash, now)?),
            ReleaseOutcome::Fenced => {
                crate::metrics::compensation("fence_reservation");
                tracing::info!(
                    order_id,
                    "order cancelled before its stock was reserved; the reservation is fenced off"
                );
                Ok(voided)
            }
            // A fenced release of an order whose reservation was refused (or fenced before)
            // answers with that step's own result; nothing was held.
            ReleaseOutcome::NothingHeld(record) if fence => {
                Ok(idempotency::replay(&record, &hash, now)?)
            }
            ReleaseOutcome::NothingHeld(record) => Err(RecordError::Permanent(format!(
                "order {order_id}: the coordinator saw its stock reserved, but {} records no \
                 reservation ({:?})",
                record.id, record.outcome
            ))),
            ReleaseOutcome::Missing => Err(RecordError::Permanent(format!(
                "order {order_id}: the coordinator saw its stock reserved, but there is no \
                 reservation record to release"
            ))),
        }
    }
}

fn validate_lines(items: &[StockLine]) -> Result<(), RecordError> {
    if items.is_empty() || items.len() > crate::domain::MAX_ITEMS_PER_ORDER {
        return Err(RecordError::Permanent(format!(
            "a stock command must have 1 to {} items",
            crate::domain::MAX_ITEMS_PER_ORDER
        )));
    }
    for item in items {
        crate::domain::validate_id("productId", &item.product_id)
            .map_err(|e| RecordError::Permanent(e.to_string()))?;
        if item.quantity == 0 || item.quantity > crate::domain::MAX_QUANTITY_PER_LINE {
            return Err(RecordError::Permanent(format!(
                "invalid quantity {}",
                item.quantity
            )));
        }
    }
    Ok(())
}

impl From<StockRejection> for crate::domain::CancelReason {
    fn from(r: StockRejection) -> Self {
        match r {
            StockRejection::InsufficientStock => crate::domain::CancelReason::InsufficientStock,
            StockRejection::UnknownProduct => crate::domain::CancelReason::UnknownProduct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{MemoryQueues, MemoryStore};
    use crate::handlers::testing::{failed, sqs_event};
    use crate::idempotency::{IdempotencyRecord, Status};
    use serde_json::json;

    const COORDINATOR: &str = "coordinator";

    fn handler() -> (
        StockHandler<MemoryStore, MemoryStore, MemoryQueues>,
        MemoryStore,
        MemoryQueues,
    ) {
        let store = MemoryStore::default();
        let queues = MemoryQueues::default();
        store.add_product("p-1", 500, 3);
        store.add_product("p-2", 100, 10);
        let h = StockHandler::with_ports(
            store.clone(),
            store.clone(),
            queues.clone(),
            COORDINATOR.into(),
            Faults::none(),
        );
        (h, store, queues)
    }

    fn reserve(order: &str, lines: &[(&str, u64)]) -> serde_json::Value {
        let items: Vec<_> = lines
            .iter()
            .map(|(p, q)| json!({"productId": p, "quantity": q}))
            .collect();
        json!({"type": "ReserveStock", "orderId": order, "items": items})
    }

    fn release(order: &str, lines: &[(&str, u64)]) -> serde_json::Value {
        let mut m = reserve(order, lines);
        m["type"] = json!("ReleaseStock");
        m
    }

    #[tokio::test]
    async fn when_reserving_twice_should_take_stock_once_and_answer_twice() {
        let (h, store, queues) = handler();
        let cmd = reserve("o-1", &[("p-1", 2), ("p-2", 4)]);
        for _ in 0..2 {
            let r = h
                .handle(sqs_event(std::slice::from_ref(&cmd)))
                .await
                .unwrap();
            assert!(failed(&r).is_empty());
        }
        assert_eq!(store.quantity("p-1"), Some(1));
        assert_eq!(store.quantity("p-2"), Some(6));
        let sent = queues.sent(COORDINATOR);
        assert_eq!(sent.len(), 2);
        assert!(
            sent.iter()
                .all(|m| m["type"] == "StockReserved" && m["orderId"] == "o-1")
        );
    }

    #[tokio::test]
    async fn when_one_line_is_short_should_reserve_nothing_and_replay_the_rejection() {
        let (h, store, queues) = handler();
        let cmd = reserve("o-1", &[("p-2", 1), ("p-1", 4)]);
        h.handle(sqs_event(std::slice::from_ref(&cmd)))
            .await
            .unwrap();
        assert_eq!(store.quantity("p-2"), Some(10));
        assert_eq!(store.quantity("p-1"), Some(3));
        // Restocked before the redelivery: the recorded rejection stands.
        store.add_product("p-1", 500, 100);
        h.handle(sqs_event(&[cmd])).await.unwrap();
        assert_eq!(store.quantity("p-1"), Some(100));
        let sent = queues.sent(COORDINATOR);
        assert_eq!(sent.len(), 2);
        for m in sent {
            assert_eq!(m["type"], "StockRejected");
            assert_eq!(m["reason"], "INSUFFICIENT_STOCK");
            assert_eq!(m["productId"], "p-1");
        }
        let unknown = reserve("o-2", &[("p-9", 1)]);
        h.handle(sqs_event(&[unknown])).await.unwrap();
        assert_eq!(queues.sent(COORDINATOR)[2]["reason"], "UNKNOWN_PRODUCT");
    }

    #[tokio::test]
    async fn when_releasing_should_give_back_a_reservation_once_and_only_a_reservation() {
        let (h, store, queues) = handler();
        h.handle(sqs_event(&[release("o-0", &[("p-1", 1)])]))
            .await
            .unwrap();
        assert_eq!(store.quantity("p-1"), Some(3));
        assert!(
            queues.sent(COORDINATOR).is_empty(),
            "nothing reserved, nothing released"
        );
        h.handle(sqs_event(&[reserve("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        for _ in 0..2 {
            h.handle(sqs_event(&[release("o-1", &[("p-1", 2)])]))
                .await
                .unwrap();
        }
        assert_eq!(store.quantity("p-1"), Some(3));
        let types: Vec<_> = queues
            .sent(COORDINATOR)
            .iter()
            .map(|m| m["type"].clone())
            .collect();
        assert_eq!(types, ["StockReserved", "StockReleased", "StockReleased"]);
    }

    #[tokio::test]
    async fn when_a_record_is_malformed_or_cannot_be_sent_should_fail_only_that_record() {
        let (h, store, queues) = handler();
        let batch = [
            reserve("o-1", &[("p-1", 1)]),
            json!("not json"),
            json!({"type": "ChargePayment", "orderId": "o-1"}),
            reserve("o-2", &[("p-1", 0)]),
        ];
        let r = h.handle(sqs_event(&batch)).await.unwrap();
        assert_eq!(failed(&r), ["m1", "m2", "m3"]);
        assert_eq!(store.quantity("p-1"), Some(2));
        // SQS refuses the answer: the record fails, and its retry answers without reserving again.
        queues.refuse_next(1);
        let cmd = reserve("o-3", &[("p-1", 1)]);
        assert_eq!(
            failed(
                &h.handle(sqs_event(std::slice::from_ref(&cmd)))
                    .await
                    .unwrap()
            ),
            ["m0"]
        );
        assert!(failed(&h.handle(sqs_event(&[cmd])).await.unwrap()).is_empty());
        assert_eq!(store.quantity("p-1"), Some(1));
        assert_eq!(queues.sent(COORDINATOR).len(), 2);
    }

    fn fenced_release(order: &str, lines: &[(&str, u64)]) -> serde_json::Value {
        let mut m = release(order, lines);
        m["fence"] = json!(true);
        m
    }

    #[tokio::test]
    async fn when_reserving_and_releasing_should_move_units_between_quantity_and_reserved() {
        let (h, store, _) = handler();
        h.handle(sqs_event(&[reserve("o-1", &[("p-2", 4)])]))
            .await
            .unwrap();
        assert_eq!(
            (store.quantity("p-2"), store.reserved("p-2")),
            (Some(6), Some(4))
        );
        h.handle(sqs_event(&[release("o-1", &[("p-2", 4)])]))
            .await
            .unwrap();
        assert_eq!(
            (store.quantity("p-2"), store.reserved("p-2")),
            (Some(10), Some(0))
        );
        let record = store.record(StepKey::Reserve("o-1")).unwrap();
        assert_eq!(record.outcome, Some(Outcome::Reserved));
    }

    #[tokio::test]
    async fn when_a_cancelled_order_was_never_reserved_should_fence_so_a_late_reserve_holds_nothing()
     {
        let (h, store, queues) = handler();
        for _ in 0..2 {
            let r = h
                .handle(sqs_event(&[fenced_release("o-1", &[("p-1", 2)])]))
                .await
                .unwrap();
            assert!(failed(&r).is_empty());
        }
        // The ReserveStock that was still in flight arrives: it replays the fence.
        let r = h
            .handle(sqs_event(&[reserve("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        assert!(failed(&r).is_empty());
        assert_eq!(
            (store.quantity("p-1"), store.reserved("p-1")),
            (Some(3), Some(0))
        );
        let types: Vec<_> = queues
            .sent(COORDINATOR)
            .iter()
            .map(|m| m["type"].clone())
            .collect();
        assert_eq!(types, ["StockVoided", "StockVoided", "StockVoided"]);
    }

    #[tokio::test]
    async fn when_a_fenced_release_comes_after_the_reservation_should_release_it() {
        let (h, store, queues) = handler();
        h.handle(sqs_event(&[reserve("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        h.handle(sqs_event(&[fenced_release("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        // ... and the plain release the coordinator sends once it sees StockReserved.
        h.handle(sqs_event(&[release("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        assert_eq!(
            (store.quantity("p-1"), store.reserved("p-1")),
            (Some(3), Some(0))
        );
        let types: Vec<_> = queues
            .sent(COORDINATOR)
            .iter()
            .map(|m| m["type"].clone())
            .collect();
        assert_eq!(types, ["StockReserved", "StockReleased", "StockReleased"]);
    }

    #[tokio::test]
    async fn when_a_release_finds_no_reservation_where_one_must_exist_should_fail_loudly() {
        let (h, store, queues) = handler();
        let r = h
            .handle(sqs_event(&[release("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        assert_eq!(failed(&r), ["m0"], "for the DLQ and its alarm");
        // A rejected reservation is no reservation either.
        h.handle(sqs_event(&[reserve("o-2", &[("p-1", 9)])]))
            .await
            .unwrap();
        let r = h
            .handle(sqs_event(&[release("o-2", &[("p-1", 9)])]))
            .await
            .unwrap();
        assert_eq!(failed(&r), ["m0"]);
        assert_eq!(store.quantity("p-1"), Some(3));
        assert_eq!(queues.sent(COORDINATOR).len(), 1, "only the rejection");
    }

    #[tokio::test]
    async fn when_a_reservation_was_recorded_by_the_previous_version_should_still_release_it() {
        let (h, store, queues) = handler();
        // What the stock function wrote before outcomes were recorded (and before `reserved`
        // was counted): the result alone, and quantity already taken.
        let items = vec![StockLine {
            product_id: "p-2".into(),
            quantity: 4,
        }];
        store.insert_record(IdempotencyRecord {
            id: "o-old#reserve".into(),
            status: Status::Completed,
            payload_hash: idempotency::payload_hash(&items),
            in_progress_until_ms: None,
            expires_at: i64::MAX,
            result: Some(r#"{"type":"StockReserved","orderId":"o-old"}"#.into()),
            order_id: None,
            outcome: None,
        });
        store.add_product("p-2", 100, 6);
        for _ in 0..2 {
            let r = h
                .handle(sqs_event(&[release("o-old", &[("p-2", 4)])]))
                .await
                .unwrap();
            assert!(failed(&r).is_empty());
        }
        assert_eq!(
            (store.quantity("p-2"), store.reserved("p-2")),
            (Some(10), Some(0))
        );
        assert_eq!(queues.sent(COORDINATOR).len(), 2);
    }

    #[tokio::test]
    async fn when_an_order_id_is_reused_with_other_items_should_refuse_it() {
        let (h, store, _) = handler();
        h.handle(sqs_event(&[reserve("o-1", &[("p-1", 1)])]))
            .await
            .unwrap();
        let r = h
            .handle(sqs_event(&[reserve("o-1", &[("p-1", 2)])]))
            .await
            .unwrap();
        assert_eq!(failed(&r), ["m0"]);
        assert_eq!(store.quantity("p-1"), Some(2));
    }
}
