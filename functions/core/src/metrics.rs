//! The business and health counters the saga emits (CloudWatch metrics through EMF in Lambda,
//! see [`crate::telemetry::lambda_metrics`]). Alarms and dashboards can be built on them.

/// An order was accepted (202).
pub fn order_placed() {
    metrics::counter!("OrdersPlaced").increment(1);
}

/// A request with a known `Idempotency-Key` was answered from its record.
pub fn idempotent_replay() {
    metrics::counter!("IdempotentReplays").increment(1);
}

pub fn order_confirmed() {
    metrics::counter!("OrdersConfirmed").increment(1);
}

pub fn order_cancelled(reason: crate::domain::CancelReason) {
    metrics::counter!("OrdersCancelled", "reason" => reason.as_str()).increment(1);
}

/// A compensation took effect (`release` of stock or `refund` of a payment).
pub fn compensation(kind: &'static str) {
    metrics::counter!("Compensations", "kind" => kind).increment(1);
}

/// A redelivered message found its step already done and published the recorded result.
pub fn step_replayed() {
    metrics::counter!("StepReplays").increment(1);
}

/// A queue record failed (`transient`, `permanent`, `crash` or `panic`) and will be retried.
pub fn record_failed(kind: &'static str) {
    metrics::counter!("RecordFailures", "kind" => kind).increment(1);
}
