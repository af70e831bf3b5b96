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
    StockReleased,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    /// The order was still pending at the sweeper's cut-off.
    TimedOut,
}

/// What a fact, or confirmation, requires of the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requires {
    /// The stock step is in this state.
    Stock(StockStatus),
    /// The payment step is in this state.
    Payment(PaymentStatus),
    /// The order is pending and not both steps have succeeded (what a timeout may cancel).
    PendingIncomplete,
    /// The order is pending and both steps have succeeded (what confirmation requires).
    PendingComplete,
}

impl Requires {
    pub fn holds(self, s: &SagaState) -> bool {
        let complete = s.stock == StockStatus::Reserved && s.payment == PaymentStatus::Charged;
        match self {
            Requires::Stock(status) => s.stock == status,
            Requires::Payment(status) => s.payment == status,
            Requires::PendingIncomplete => s.status == OrderStatus::Pending && !complete,
            Requires::PendingComplete => s.status == OrderStatus::Pending && complete,
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
/// cancels a still-pending order for. The DynamoDB adapter writes exactly this as one
/// conditional update, so the rules live here and nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub requires: Requires,
    pub sets: Option<Step>,
    pub cancels: Option<CancelReason>,
}

impl Fact {
    pub fn transition(&self) -> Transition {
        let (requires, sets, cancels) = match self {
            Fact::StockReserved => (
                Requires::Stock(StockStatus::Pending),
                Some(Step::Stock(StockStatus::Reserved)),
                None,
            ),
            Fact::StockRejected(reason) => (
                Requires::Stock(StockStatus::Pending),
                Some(Step::Stock(StockStatus::Rejected)),
                Some(*reason),
            ),
            Fact::StockReleased => (
                Requires::Stock(StockStatus::Reserved),
                Some(Step::Stock(StockStatus::Released)),
                None,
            ),
            Fact::PaymentCharged => (
                Requires::Payment(PaymentStatus::Pending),
                Some(Step::Payment(PaymentStatus::Charged)),
                None,
            ),
            Fact::PaymentDeclined => (
                Requires::Payment(PaymentStatus::Pending),
                Some(Step::Payment(PaymentStatus::Declined)),
                Some(CancelReason::PaymentDeclined),
            ),
            Fact::PaymentRefunded => (
                Requires::Payment(PaymentStatus::Charged),
                Some(Step::Payment(PaymentStatus::Refunded)),
                None,
            ),
            Fact::TimedOut => (
                Requires::PendingIncomplete,
                None,
                Some(CancelReason::Timeout),
            ),
        };
        Transition {
            requires,
            sets,
            cancels,
        }
    }

    /// Whether the fact may be applied to `s`. When it may not, the fact was already applied
    /// (a duplicate) or arrived too late to matter; either way the order is left unchanged.
    pub fn precondition(&self, s: &SagaState) -> bool {
        self.transition().requires.holds(s)
    }
}

/// Applies a fact; `None` when its precondition does not hold. A fact that cancels cancels
/// only a pending order; on an order already final it only records its step.
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
        if next.status == OrderStatus::Pending {
            next.status = OrderStatus::Cancelled;
            next.cancel_reason = Some(reason);
        }
    }
    Some(next)
}

/// What the coordinator must do after looking at an order's state. Every one of these is
/// safe to repeat: confirmation is a conditional update, and release and refund are
/// deduplicated downstream by their business keys (`{orderId}#release`, `{orderId}#refund`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowUps {
    pub confirm: bool,
    pub release_stock: bool,
    pub refund_payment: bool,
}

pub fn follow_ups(s: &SagaState) -> FollowUps {
    FollowUps {
        confirm: Requires::PendingComplete.holds(s),
        release_stock: s.status == OrderStatus::Cancelled && s.stock == StockStatus::Reserved,
        refund_payment: s.status == OrderStatus::Cancelled && s.payment == PaymentStatus::Charged,
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

    /// A whole saga on the model: the coordinator, plus stock and payment services that
    /// deduplicate release and refund by business key, with every message possibly delivered
    /// more than once and in any order.
    #[derive(Default)]
    struct World {
        state: SagaState,
        releases: u32,
        refunds: u32,
        released_key_seen: bool,
        refund_key_seen: bool,
    }

    impl World {
        fn coordinator(&mut self, fact: &Fact, queue: &mut VecDeque<Fact>) {
            if let Some(next) = apply(&self.state, fact) {
                self.state = next;
            }
            if let Some(next) = confirm(&self.state) {
                self.state = next;
            }
            let f = follow_ups(&self.state);
            if f.release_stock {
                // The stock service: one effect per order, then StockReleased (re-published
                // on every duplicate).
                if !self.released_key_seen {
                    self.released_key_seen = true;
                    self.releases += 1;
                }
                queue.push_back(Fact::StockReleased);
            }
            if f.refund_payment {
                if !self.refund_key_seen {
                    self.refund_key_seen = true;
                    self.refunds += 1;
                }
                queue.push_back(Fact::PaymentRefunded);
            }
        }
    }

    fn run(facts: Vec<Fact>, picks: &[usize], duplicates: &[bool]) -> World {
        let mut world = World::default();
        let mut queue: VecDeque<Fact> = facts.into();
        let mut step = 0usize;
        while let Some(fact) = {
            // Take the next message from a position chosen by the test: any delivery order.
            if queue.is_empty() {
                None
            } else {
                let at = picks.get(step).copied().unwrap_or(0) % queue.len();
                queue.remove(at)
            }
        } {
            let dup = duplicates.get(step).copied().unwrap_or(false);
            step += 1;
            world.coordinator(&fact, &mut queue);
            if dup && step < 64 {
                world.coordinator(&fact, &mut queue);
            }
            if step > 200 {
                panic!("saga did not settle");
            }
        }
        world
    }

    fn stock_fact() -> impl Strategy<Value = Fact> {
        prop_oneof![
            Just(Fact::StockReserved),
            Just(Fact::StockRejected(CancelReason::InsufficientStock)),
        ]
    }

    fn payment_fact() -> impl Strategy<Value = Fact> {
        prop_oneof![Just(Fact::PaymentCharged), Just(Fact::PaymentDeclined)]
    }

    proptest! {
        #[test]
        fn any_order_and_duplication_of_results_ends_in_the_same_final_state(
            stock in stock_fact(),
            payment in payment_fact(),
            extra_copies in prop::collection::vec(0usize..2, 0..4),
            picks in prop::collection::vec(0usize..16, 0..64),
            duplicates in prop::collection::vec(any::<bool>(), 0..64),
            timeout in any::<bool>(),
        ) {
            let mut facts = vec![stock.clone(), payment.clone()];
            for which in extra_copies {
                facts.push(if which == 0 { stock.clone() } else { payment.clone() });
            }
            if timeout {
                facts.push(Fact::TimedOut);
            }
            let world = run(facts, &picks, &duplicates);
            let s = &world.state;
            let reserved = stock == Fact::StockReserved;
            let charged = payment == Fact::PaymentCharged;
            // Never left pending, never moved backwards.
            prop_assert_ne!(s.status, OrderStatus::Pending);
            if s.status == OrderStatus::Confirmed {
                prop_assert!(reserved && charged);
                prop_assert_eq!(s.stock, StockStatus::Reserved);
                prop_assert_eq!(s.payment, PaymentStatus::Charged);
                prop_assert_eq!(world.releases + world.refunds, 0);
            } else {
                // Every successful step is compensated exactly once.
                prop_assert_eq!(world.releases, u32::from(reserved));
                prop_assert_eq!(world.refunds, u32::from(charged));
                prop_assert_eq!(s.stock, if reserved { StockStatus::Released } else { StockStatus::Rejected });
                prop_assert_eq!(s.payment, if charged { PaymentStatus::Refunded } else { PaymentStatus::Declined });
                prop_assert!(s.cancel_reason.is_some());
            }
            // Without a timeout, the outcome depends only on the results, not their order.
            if !timeout {
                let expected = if reserved && charged { OrderStatus::Confirmed } else { OrderStatus::Cancelled };
                prop_assert_eq!(s.status, expected);
                if reserved && !charged {
                    prop_assert_eq!(s.cancel_reason, Some(CancelReason::PaymentDeclined));
                }
                if !reserved && charged {
                    prop_assert_eq!(s.cancel_reason, Some(CancelReason::InsufficientStock));
                }
            }
        }
    }

    #[test]
    fn when_a_result_arrives_after_cancellation_should_compensate_it() {
        let s = apply(&SagaState::new(), &Fact::PaymentDeclined).unwrap();
        assert_eq!(s.status, OrderStatus::Cancelled);
        let s = apply(&s, &Fact::StockReserved).unwrap();
        assert_eq!(
            follow_ups(&s),
            FollowUps {
                confirm: false,
                release_stock: true,
                refund_payment: false
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
    fn when_confirmed_no_late_fact_should_cancel() {
        let s = apply(&SagaState::new(), &Fact::StockReserved).unwrap();
        let s = confirm(&apply(&s, &Fact::PaymentCharged).unwrap()).unwrap();
        for f in [
            Fact::TimedOut,
            Fact::PaymentDeclined,
            Fact::StockRejected(CancelReason::InsufficientStock),
        ] {
            assert_eq!(apply(&s, &f).map(|n| n.status), None);
        }
    }
}
