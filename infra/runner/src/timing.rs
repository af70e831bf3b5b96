//! What the load benchmark (`saga-bench load`) sees inside a running stack, per function:
//!
//! - each SQS message's **queue wait** (its `SentTimestamp` to the mapping's first receive,
//!   `ApproximateFirstReceiveTimestamp`) and **batching wait** (that receive to the invocation
//!   it was handed to: the batching window filling), from the attributes SQS delivers;
//! - each invocation's **handler time** (the event handed over to the response back) and
//!   how many records it carried; for the order API, each request's;
//! - every **AWS call** a function's clients make (its handler's and its mapping's receives
//!   and deletes), by service and operation, timed from the SDK's start of the operation to
//!   its end (serialization, signing, retries and the round trip included), by an SDK
//!   interceptor on the function's clients;
//! - when each order reached its **final state**: the first `UpdateItem` whose returned item
//!   (`ReturnValues: ALL_NEW`, as the orders adapter asks) is an order `CONFIRMED` or
//!   `CANCELLED`, seen by the same interceptor. The orders table records no final timestamp of
//!   its own (`updatedAt` moves again when a cancelled order's compensations are recorded).
//!
//! Nothing here is on when no [`Probe`] is given to the stack (`make run`, the tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use serde::{Deserialize, Serialize};

/// One message handed to a function.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub function: String,
    /// Sent to first received, ms.
    pub queue_wait_ms: f64,
    /// First received to handed to the function, ms.
    pub batching_wait_ms: f64,
    /// Whether this was the message's first receive (later ones come after a failure).
    pub first: bool,
}

/// One invocation (an SQS batch, or one API request).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Invocation {
    pub function: String,
    pub records: usize,
    pub ms: f64,
}

/// One AWS call made through a function's clients.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimedCall {
    pub function: String,
    pub service: String,
    pub operation: String,
    pub ms: f64,
    pub ok: bool,
}

/// What a probe recorded since it was last taken.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Samples {
    pub deliveries: Vec<Delivery>,
    pub invocations: Vec<Invocation>,
    pub calls: Vec<TimedCall>,
}

/// When and how an order reached its final state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Final {
    pub at: Instant,
    pub confirmed: bool,
}

/// The recorder the stack's mappings, HTTP front and clients report to. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    samples: Arc<Mutex<Samples>>,
    finals: Arc<Mutex<HashMap<String, Final>>>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn attribute(m: &Message, name: MessageSystemAttributeName) -> Option<i64> {
    m.attributes.as_ref()?.get(&name)?.parse().ok()
}

impl Probe {
    /// Takes what was recorded so far (the final states stay).
    pub fn take(&self) -> Samples {
        std::mem::take(&mut *self.samples.lock().expect("probe"))
    }

    /// When the order reached its final state, if it has.
    pub fn final_of(&self, order_id: &str) -> Option<Final> {
        self.finals.lock().expect("probe").get(order_id).copied()
    }

    /// How many orders have reached their final state.
    pub fn finals_len(&self) -> usize {
        self.finals.lock().expect("probe").len()
    }

    /// Messages handed to `function` now, with the system attributes SQS delivered.
    pub fn delivered(&self, function: &str, messages: &[Message]) {
        let now = saga_core::time::now_ms();
        let mut s = self.samples.lock().expect("probe");
        for m in messages {
            let sent = attribute(m, MessageSystemAttributeName::SentTimestamp);
            let received = attribute(
                m,
                MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
            );
            let (Some(sent), Some(received)) = (sent, received) else {
                continue;
            };
            let count = attribute(m, MessageSystemAttributeName::ApproximateReceiveCount);
            s.deliveries.push(Delivery {
                function: function.to_string(),
                queue_wait_ms: (received - sent).max(0) as f64,
                batching_wait_ms: (now - received).max(0) as f64,
                first: count.is_none_or(|c| c <= 1),
            });
        }
    }

    /// An invocation of `function` with `records` records took `took`.
    pub fn invoked(&self, function: &str, records: usize, took: Duration) {
        self.samples
            .lock()
            .expect("probe")
            .invocations
            .push(Invocation {
                function: function.to_string(),
                records,
                ms: ms(took),
            });
    }

    /// The interceptor for `function`'s clients.
    pub fn interceptor(&self, function: &str) -> ProbeInterceptor {
        ProbeInterceptor {
            probe: self.clone(),
            function: function.to_string(),
        }
    }

    fn order_update(&self, output: &aws_sdk_dynamodb::operation::update_item::UpdateItemOutput) {
        let Some(item) = output.attributes.as_ref() else {
            return;
        };
        let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok());
        let (Some(order_id), Some(status)) = (text("orderId"), text("status")) else {
            return;
        };
        let confirmed = match status.as_str() {
            "CONFIRMED" => true,
            "CANCELLED" => false,
            _ => return,
        };
        self.finals
            .lock()
            .expect("probe")
            .entry(order_id.clone())
            .or_insert(Final {
                at: Instant::now(),
                confirmed,
            });
    }
}

/// Times every call of one function's clients and watches its order updates.
#[derive(Clone, Debug)]
pub struct ProbeInterceptor {
    probe: Probe,
    function: String,
}

#[derive(Clone, Copy, Debug)]
struct CallStarted(Instant);

impl Storable for CallStarted {
    type Storer = StoreReplace<Self>;
}

impl Intercept for ProbeInterceptor {
    fn name(&self) -> &'static str {
        "ProbeInterceptor"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(CallStarted(Instant::now()));
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let took = cfg
            .load::<CallStarted>()
            .map(|s| s.0.elapsed())
            .unwrap_or_default();
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_string(), m.name().to_string()))
            .unwrap_or_default();
        let output = context.output_or_error().and_then(Result::ok);
        if operation == "UpdateItem"
            && let Some(out) = output.and_then(|o| {
                o.downcast_ref::<aws_sdk_dynamodb::operation::update_item::UpdateItemOutput>()
            })
        {
            self.probe.order_update(out);
        }
        self.probe
            .samples
            .lock()
            .expect("probe")
            .calls
            .push(TimedCall {
                function: self.function.clone(),
                service,
                operation,
                ms: ms(took),
                ok: output.is_some(),
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;
    use aws_sdk_dynamodb::types::AttributeValue as A;

    fn update(order: &str, status: &str) -> UpdateItemOutput {
        UpdateItemOutput::builder()
            .attributes("orderId", A::S(order.into()))
            .attributes("status", A::S(status.into()))
            .build()
    }

    #[test]
    fn when_an_order_update_returns_a_final_state_should_keep_the_first() {
        let p = Probe::default();
        p.order_update(&update("o-1", "PENDING"));
        assert_eq!(p.final_of("o-1"), None);
        p.order_update(&update("o-1", "CANCELLED"));
        let first = p.final_of("o-1").expect("final");
        assert!(!first.confirmed);
        // A compensation recorded later returns the cancelled order again: the first stays.
        p.order_update(&update("o-1", "CANCELLED"));
        assert_eq!(p.final_of("o-1"), Some(first));
        p.order_update(&update("o-2", "CONFIRMED"));
        assert!(p.final_of("o-2").is_some_and(|f| f.confirmed));
    }

    #[test]
    fn when_messages_are_delivered_should_split_queue_and_batching_waits() {
        let p = Probe::default();
        let now = saga_core::time::now_ms();
        let m = Message::builder()
            .attributes(
                MessageSystemAttributeName::SentTimestamp,
                (now - 300).to_string(),
            )
            .attributes(
                MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                (now - 100).to_string(),
            )
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "1")
            .build();
        p.delivered("StockFunction", &[m, Message::builder().build()]);
        p.invoked("StockFunction", 2, Duration::from_millis(7));
        let s = p.take();
        assert_eq!(
            s.deliveries.len(),
            1,
            "a message without timestamps is skipped"
        );
        let d = &s.deliveries[0];
        assert_eq!(d.queue_wait_ms, 200.0);
        assert!(d.batching_wait_ms >= 100.0 && d.first);
        assert_eq!(s.invocations[0].records, 2);
        assert!(p.take().invocations.is_empty());
    }
}
