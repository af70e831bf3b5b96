//! The saga's state machine, as pure functions.
//!
//! The coordinator applies each fact to the order with one DynamoDB conditional update whose
//! condition is exactly [`Fact::precondition`] and whose effect is exactly [`apply`]; this module
//! is the model those updates implement, and its property tests show that any order and any
//! duplication of results ends in the same final state with each compensation done once.

use crate::domain::{CancelReason, OrderStatus, PaymentStatus, StockStatus};

/// The part of an order the saga moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaState {
    pub status: OrderStatus,
    pub stock: StockStatus,
    pub payment: PaymentStatus,
    pub cancel_reason: Option<CancelReason>,
}

impl SagaState {
    pub fn new() -> Self {
        Self {
            status: OrderStatus::Pending,
            stock: StockStatus::Pending,
            payment: PaymentStatus::Pending,
            cancel_reason: None,
        }
    }
}

impl Default for SagaState {
    fn default() -> Self {
        Self::new()
    }
}

/// Something that happened to an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    StockReserved,
    StockRejected(CancelReason),
    /// The reservation was given back; or, for an order cancelled before its reservation was
    /// seen, a reservation that had happened meanwhile was given back.
    StockReleased,
    /// The order was cancelled before its stock was reserved; the reservation is fenced off.
    StockVoided,
    PaymentCharged,
    PaymentDeclined,
    /// The charge was refunded; or, for an order cancelled before its charge was seen, a
    /// charge that had happened meanwhile was refunded.
    PaymentRefunded,
    /// The order was cancelled before it was charged; the charge is fenced off.
    PaymentVoided,
    /// The order was still pending at the sweeper's cut-off.
    TimedOut,
    /// The customer (or an operator) cancelled the order: pending or confirmed, it ends
    /// cancelled and everything it holds is given back.
    CustomerCancelled,
}

/// What a fact, or confirmation, requires of the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requires {
    /// The stock step is in one of these states.
    Stock(&'static [StockStatus]),
    /// The payment step is in one of these states.
    Payment(&'static [PaymentStatus]),
    /// The order is pending and not both steps have succeeded (what a timeout may cancel).
    PendingIncomplete,
    /// The order is pending and both steps have succeeded (what confirmation requires).
    PendingComplete,
    /// The order is pending or confirmed (what a customer may cancel).
    NotCancelled,
}

impl Requires {
    pub fn holds(self, s: &SagaState) -> bool {
        let complete = s.stock == StockStatus::Reserved && s.payment == PaymentStatus::Charged;
        match self {
            Requires::Stock(states) => states.contains(&s.stock),
            Requires::Payment(states) => states.contains(&s.payment),
            Requires::PendingIncomplete => s.status == OrderStatus::Pending && !complete,
            Requires::PendingComplete => s.status == OrderStatus::Pending && complete,
            Requires::NotCancelled => s.status != OrderStatus::Cancelled,
        }
    }
}

/// A step's new state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Stock(StockStatus),
    Payment(PaymentStatus),
}

/// What applying a fact means: its precondition, the step state it sets, and the reason it
/// cancels the order for. A failure (`cancels_confirmed: false`) cancels only a pending
/// order; a customer's cancellation also cancels a confirmed one. The DynamoDB adapter writes
/// exactly this as one conditional update, so the rules live here and nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub requires: Requires,
    pub sets: Option<Step>,
    pub cancels: Option<CancelReason>,
    pub cancels_confirmed: bool,
}

const STOCK_PENDING: &[StockStatus] = &[StockStatus::Pending];
const STOCK_HELD_OR_UNSEEN: &[StockStatus] = &[StockStatus::Reserved, StockStatus::Pending];
const PAYMENT_PENDING: &[PaymentStatus] = &[PaymentStatus::Pending];
const PAYMENT_CHARGED_OR_UNSEEN: &[PaymentStatus] =
    &[PaymentStatus::Charged, PaymentStatus::Pending];

impl Fact {
    pub fn transition(&self) -> Transition {
        let (requires, sets, cancels) = match self {
            Fact::StockReserved => (
                Requires::Stock(STOCK_PENDING),
                Some(Step::Stock(StockStatus::Reserved)),
                None,
            ),
            Fact::StockRejected(reason) => (
                Requires::Stock(STOCK_PENDING),
                Some(Step::Stock(StockStatus::Rejected)),
                Some(*reason),
            ),
            Fact::StockReleased => (
                Requires::Stock(STOCK_HELD_OR_UNSEEN),
                Some(Step::Stock(StockStatus::Released)),
                None,
            ),
            Fact::StockVoided => (
                Requires::Stock(STOCK_PENDING),
                Some(Step::Stock(StockStatus::Voided)),
                None,
            ),
            Fact::PaymentCharged => (
                Requires::Payment(PAYMENT_PENDING),
                Some(Step::Payment(PaymentStatus::Charged)),
                None,
            ),
            Fact::PaymentDeclined => (
                Requires::Payment(PAYMENT_PENDING),
                Some(Step::Payment(PaymentStatus::Declined)),
                Some(CancelReason::PaymentDeclined),
            ),
            Fact::PaymentRefunded => (
                Requires::Payment(PAYMENT_CHARGED_OR_UNSEEN),
                Some(Step::Payment(PaymentStatus::Refunded)),
                None,
            ),
            Fact::PaymentVoided => (
                Requires::Payment(PAYMENT_PENDING),
                Some(Step::Payment(PaymentStatus::Voided)),
                None,
            ),
            Fact::TimedOut => (
                Requires::PendingIncomplete,
                None,
                Some(CancelReason::Timeout),
            ),
            Fact::CustomerCancelled => (
                Requires::NotCancelled,
                None,
                Some(CancelReason::CustomerCancelled),
            ),
        };
        Transition {
            requires,
            sets,
            cancels,
            cancels_confirmed: *self == Fact::CustomerCancelled,
        }
    }

    /// Whether the fact may be applied to `s`. When it may not, the fact was already applied
    /// (a duplicate) or arrived too late to matter; either way the order is left unchanged.
    pub fn precondition(&self, s: &SagaState) -> bool {
        self.transition().requires.holds(s)
    }
}

/// Applies a fact; `None` when its precondition does not hold. A failure cancels only a
/// pending order; on an order already final it only records its step.
pub fn apply(s: &SagaState, fact: &Fact) -> Option<SagaState> {
    let t = fact.transition();
    if !t.requires.holds(s) {
        return None;
    }
    let mut next = s.clone();
    match t.sets {
        Some(Step::Stock(status)) => next.stock = status,
        Some(Step::Payment(status)) => next.payment = status,
        None => {}
    }
    if let Some(reason) = t.cancels {
        let cancellable = next.status == OrderStatus::Pending
            || (t.cancels_confirmed && next.status == OrderStatus::Confirmed);
        if cancellable {
            next.status = OrderStatus::Cancelled;
            next.cancel_reason = Some(reason);
        }
    }
    Some(next)
}

/// How a cancelled order's step is compensated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compensation {
    /// The step is known to have succeeded (its result was applied): undo it. Finding nothing
    /// to undo is an error for the DLQ and its alarm.
    Undo,
    /// The step's result has not been seen: undo it if it ran, or fence it off so that it never
    /// takes effect. Nothing waits for the result message, which may be in flight, in a DLQ,
    /// or gone.
    UndoOrFence,
}

/// What the coordinator must do after looking at an order's state. Every one of these is
/// safe to repeat: confirmation is a conditional update, and release and refund are
/// deduplicated downstream by their business keys (`{orderId}#release`, `{orderId}#refund`,
/// and the fences on `{orderId}#reserve` and `{orderId}#charge`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowUps {
    pub confirm: bool,
    pub release_stock: Option<Compensation>,
    pub refund_payment: Option<Compensation>,
}

pub fn follow_ups(s: &SagaState) -> FollowUps {
    let cancelled = s.status == OrderStatus::Cancelled;
    FollowUps {
        confirm: Requires::PendingComplete.holds(s),
        release_stock: match s.stock {
            StockStatus::Reserved if cancelled => Some(Compensation::Undo),
            StockStatus::Pending if cancelled => Some(Compensation::UndoOrFence),
            _ => None,
        },
        refund_payment: match s.payment {
            PaymentStatus::Charged if cancelled => Some(Compensation::Undo),
            PaymentStatus::Pending if cancelled => Some(Compensation::UndoOrFence),
            _ => None,
        },
    }
}

/// Confirms the order (`None` unless [`FollowUps::confirm`] holds).
pub fn confirm(s: &SagaState) -> Option<SagaState> {
    follow_ups(s).confirm.then(|| SagaState {
        status: OrderStatus::Confirmed,
        ..s.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// A message of the model: the commands, their results, and the cancellations.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Msg {
        Reserve,
        Charge,
        Release(Compensation),
        Refund(Compensation),
        Result(Fact),
        TimedOut,
        Cancel,
    }

    /// What a step's business key holds, as the stock and payment functions record it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Record {
        Done,
        Refused,
        Fenced,
    }

    /// A whole saga on the model: the coordinator, and stock and payment services that record
    /// each step once by business key (fences included), with every message possibly delivered
    /// more than once and in any order.
    #[derive(Default)]
    struct World {
        state: SagaState,
        stock_ok: bool,
        payment_ok: bool,
        reservation: Option<Record>,
        released: bool,
        charge: Option<Record>,
        refunded: bool,
        units_held: i32,
        charges: i32,
        refunds: i32,
        /// An `Undo` that found nothing to undo: what goes to the DLQ and its alarm.
        missing: u32,
    }

    impl World {
        fn handle(&mut self, msg: &Msg, queue: &mut VecDeque<Msg>) {
            match msg {
                Msg::Reserve => {
                    if self.reservation.is_none() {
                        self.reservation = Some(if self.stock_ok {
                            self.units_held += 1;
                            Record::Done
                        } else {
                            Record::Refused
                        });
                    }
                    queue.push_back(Msg::Result(self.reservation_result()));
                }
                Msg::Charge => {
                    if self.charge.is_none() {
                        self.charge = Some(if self.payment_ok {
                            self.charges += 1;
                            Record::Done
                        } else {
                            Record::Refused
                        });
                    }
                    queue.push_back(Msg::Result(self.charge_result()));
                }
                Msg::Release(mode) => {
                    if self.released {
                        queue.push_back(Msg::Result(Fact::StockReleased));
                        return;
                    }
                    match (self.reservation, mode) {
                        (Some(Record::Done), _) => {
                            self.units_held -= 1;
                            self.released = true;
                            queue.push_back(Msg::Result(Fact::StockReleased));
                        }
                        (_, Compensation::Undo) => self.missing += 1,
                        (None, Compensation::UndoOrFence) => {
                            self.reservation = Some(Record::Fenced);
                            queue.push_back(Msg::Result(Fact::StockVoided));
                        }
                        (Some(_), Compensation::UndoOrFence) => {
                            queue.push_back(Msg::Result(self.reservation_result()))
                        }
                    }
                }
                Msg::Refund(mode) => {
                    if self.refunded {
                        queue.push_back(Msg::Result(Fact::PaymentRefunded));
                        return;
                    }
                    match (self.charge, mode) {
                        (Some(Record::Done), _) => {
                            self.refunds += 1;
                            self.refunded = true;
                            queue.push_back(Msg::Result(Fact::PaymentRefunded));
                        }
                        (_, Compensation::Undo) => self.missing += 1,
                        (None, Compensation::UndoOrFence) => {
                            self.charge = Some(Record::Fenced);
                            queue.push_back(Msg::Result(Fact::PaymentVoided));
                        }
                        (Some(_), Compensation::UndoOrFence) => {
                            queue.push_back(Msg::Result(self.charge_result()))
                        }
                    }
                }
                Msg::Result(fact) => self.coordinator(fact, queue),
                Msg::TimedOut => self.coordinator(&Fact::TimedOut, queue),
                Msg::Cancel => self.coordinator(&Fact::CustomerCancelled, queue),
            }
        }

        fn reservation_result(&self) -> Fact {
            match self.reservation {
                Some(Record::Done) => Fact::StockReserved,
                Some(Record::Refused) => Fact::StockRejected(CancelReason::InsufficientStock),
                _ => Fact::StockVoided,
            }
        }

        fn charge_result(&self) -> Fact {
            match self.charge {
                Some(Record::Done) => Fact::PaymentCharged,
                Some(Record::Refused) => Fact::PaymentDeclined,
                _ => Fact::PaymentVoided,
            }
        }

        fn coordinator(&mut self, fact: &Fact, queue: &mut VecDeque<Msg>) {
            if let Some(next) = apply(&self.state, fact) {
                self.state = next;
            }
            if let Some(next) = confirm(&self.state) {
                self.state = next;
            }
            let f = follow_ups(&self.state);
            if let Some(mode) = f.release_stock {
                queue.push_back(Msg::Release(mode));
            }
            if let Some(mode) = f.refund_payment {
                queue.push_back(Msg::Refund(mode));
            }
        }
    }

    fn run(world: &mut World, messages: Vec<Msg>, picks: &[usize], duplicates: &[bool]) {
        let mut queue: VecDeque<Msg> = messages.into();
        let mut step = 0usize;
        while !queue.is_empty() {
            // Take the next message from a position chosen by the test: any delivery order.
            let at = picks.get(step).copied().unwrap_or(0) % queue.len();
            let msg = queue.remove(at).expect("in range");
            let dup = duplicates.get(step).copied().unwrap_or(false);
            step += 1;
            world.handle(&msg, &mut queue);
            if dup && step < 64 {
                world.handle(&msg, &mut queue);
            }
            assert!(step < 400, "saga did not settle");
        }
    }

    proptest! {
        #[test]
        fn any_order_duplication_timeout_or_cancellation_ends_final_with_each_effect_once(
            stock_ok in any::<bool>(),
            payment_ok in any::<bool>(),
            extra_commands in prop::collection::vec(any::<bool>(), 0..3),
            picks in prop::collection::vec(0usize..16, 0..96),
            duplicates in prop::collection::vec(any::<bool>(), 0..96),
            timeout in any::<bool>(),
            cancel in any::<bool>(),
        ) {
            let mut messages = vec![Msg::Reserve, Msg::Charge];
            for reserve in extra_commands {
                messages.push(if reserve { Msg::Reserve } else { Msg::Charge });
            }
            if timeout {
                messages.push(Msg::TimedOut);
            }
            if cancel {
                messages.push(Msg::Cancel);
            }
            let mut w = World { stock_ok, payment_ok, ..World::default() };
            run(&mut w, messages, &picks, &duplicates);
            let s = w.state.clone();
            // Never an undo of nothing, never left pending, never an effect twice.
            prop_assert_eq!(w.missing, 0);
            prop_assert_ne!(s.status, OrderStatus::Pending);
            prop_assert!(w.charges <= 1 && w.refunds <= 1);
            if s.status == OrderStatus::Confirmed {
                prop_assert!(stock_ok && payment_ok);
                prop_assert_eq!((w.units_held, w.charges, w.refunds), (1, 1, 0));
                prop_assert_eq!(s.stock, StockStatus::Reserved);
                prop_assert_eq!(s.payment, PaymentStatus::Charged);
            } else {
                // Nothing held, nothing kept, and both steps final on the order.
                prop_assert_eq!(w.units_held, 0);
                prop_assert_eq!(w.charges, w.refunds);
                prop_assert!(matches!(s.stock, StockStatus::Released | StockStatus::Rejected | StockStatus::Voided), "{:?}", s);
                prop_assert!(matches!(s.payment, PaymentStatus::Refunded | PaymentStatus::Declined | PaymentStatus::Voided), "{:?}", s);
                prop_assert!(s.cancel_reason.is_some());
            }
            // Without a timeout or a cancellation, the outcome depends only on the results.
            if !timeout && !cancel {
                let expected = if stock_ok && payment_ok { OrderStatus::Confirmed } else { OrderStatus::Cancelled };
                prop_assert_eq!(s.status, expected);
            }
            if cancel && !timeout && stock_ok && payment_ok {
                // A customer's cancellation wins over completion, whenever it lands.
                prop_assert_eq!(s.status, OrderStatus::Cancelled);
                prop_assert_eq!(s.cancel_reason, Some(CancelReason::CustomerCancelled));
            }
        }
    }

    #[test]
    fn when_a_result_arrives_after_cancellation_should_compensate_it() {
        let s = apply(&SagaState::new(), &Fact::PaymentDeclined).unwrap();
        assert_eq!(s.status, OrderStatus::Cancelled);
        // The reservation is not seen yet: release it if it ran, fence it off if not.
        assert_eq!(
            follow_ups(&s).release_stock,
            Some(Compensation::UndoOrFence)
        );
        let s = apply(&s, &Fact::StockReserved).unwrap();
        assert_eq!(
            follow_ups(&s),
            FollowUps {
                confirm: false,
                release_stock: Some(Compensation::Undo),
                refund_payment: None,
            }
        );
    }

    #[test]
    fn when_a_result_is_duplicated_should_not_apply_twice() {
        let s = apply(&SagaState::new(), &Fact::StockReserved).unwrap();
        assert_eq!(apply(&s, &Fact::StockReserved), None);
        assert_eq!(
            apply(&s, &Fact::StockRejected(CancelReason::InsufficientStock)),
            None
        );
    }

    #[test]
    fn when_both_steps_succeeded_a_timeout_should_not_cancel() {
        let s = apply(&SagaState::new(), &Fact::StockReserved).unwrap();
        let s = apply(&s, &Fact::PaymentCharged).unwrap();
        assert_eq!(apply(&s, &Fact::TimedOut), None);
        assert!(follow_ups(&s).confirm);
    }

    #[test]
    fn when_confirmed_no_late_fact_should_cancel_but_the_customer_may() {
        let s = apply(&SagaState::new(), &Fact::StockReserved).unwrap();
        let s = confirm(&apply(&s, &Fact::PaymentCharged).unwrap()).unwrap();
        for f in [
            Fact::TimedOut,
            Fact::PaymentDeclined,
            Fact::StockRejected(CancelReason::InsufficientStock),
        ] {
            assert_eq!(apply(&s, &f).map(|n| n.status), None);
        }
        let cancelled = apply(&s, &Fact::CustomerCancelled).unwrap();
        assert_eq!(cancelled.status, OrderStatus::Cancelled);
        assert_eq!(
            cancelled.cancel_reason,
            Some(CancelReason::CustomerCancelled)
        );
        assert_eq!(
            follow_ups(&cancelled),
            FollowUps {
                confirm: false,
                release_stock: Some(Compensation::Undo),
                refund_payment: Some(Compensation::Undo),
            }
        );
        // Cancelling again changes nothing.
        assert_eq!(apply(&cancelled, &Fact::CustomerCancelled), None);
    }

    #[test]
    fn when_cancelled_before_any_result_a_late_result_should_find_its_step_voided() {
        let s = apply(&SagaState::new(), &Fact::CustomerCancelled).unwrap();
        let s = apply(&s, &Fact::StockVoided).unwrap();
        let s = apply(&s, &Fact::PaymentVoided).unwrap();
        assert_eq!(follow_ups(&s), FollowUps::default());
        // The fenced commands replay their fences, never their effects.
        assert_eq!(apply(&s, &Fact::StockReserved), None);
        assert_eq!(apply(&s, &Fact::PaymentCharged), None);
    }
}
