//! Fault points for crash tests.
//!
//! A fault point marks a place where a real Lambda can die: after a DynamoDB write and before
//! the publish that follows it, after the publish and before SQS deletes the message, and
//! inside the payment provider call. A "crash" aborts the current record at once, with no
//! clean-up (no idempotency claim is released), exactly as a killed process would leave it.
//!
//! The points are only live when the crate is built with the `fault-injection` feature (the
//! local runner and the tests enable it); the Lambda binaries are built without it, and there
//! [`Faults::hit`] compiles to `Ok(())`.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// After a DynamoDB write, before the message that announces it is sent.
    AfterWrite,
    /// After the outgoing message is sent, before the incoming one is acknowledged.
    AfterPublish,
    /// Inside the payment provider call: after the provider has acted, before we record it.
    InPayment,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 3] = [
        FaultPoint::AfterWrite,
        FaultPoint::AfterPublish,
        FaultPoint::InPayment,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::AfterWrite => "after_write",
            FaultPoint::AfterPublish => "after_publish",
            FaultPoint::InPayment => "in_payment",
        }
    }
}

/// A simulated crash at a fault point.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("injected crash at fault point {}", .0.name())]
pub struct Crash(pub FaultPoint);

/// Without the `fault-injection` feature no crash can happen: the type has no value, so the
/// error variants that carry it cannot be built and production code has no crash path.
#[cfg(not(feature = "fault-injection"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Crash {}

/// Which fault points fire, and how often (probability per pass, 0.0 to 1.0).
#[derive(Clone, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    rates: [f64; 3],
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "fault-injection")]
        return f
            .debug_struct("Faults")
            .field("rates", &self.rates)
            .finish();
        #[cfg(not(feature = "fault-injection"))]
        f.write_str("Faults(disabled)")
    }
}

impl Faults {
    /// No fault ever fires. What production uses.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses `after_write=0.1,after_publish=0.05,in_payment=0.1` (the `SAGA_FAULTS` syntax).
    #[cfg(feature = "fault-injection")]
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut faults = Self::none();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, rate) = part
                .split_once('=')
                .ok_or_else(|| format!("fault {part:?} is not name=rate"))?;
            let point = FaultPoint::ALL
                .into_iter()
                .find(|p| p.name() == name.trim())
                .ok_or_else(|| format!("unknown fault point {name:?}"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| format!("fault rate {rate:?} is not a number from 0 to 1"))?;
            faults = faults.with(point, rate);
        }
        Ok(faults)
    }

    #[cfg(feature = "fault-injection")]
    pub fn with(mut self, point: FaultPoint, rate: f64) -> Self {
        self.rates[point as usize] = rate;
        self
    }

    /// Passes a fault point: `Err(Crash)` when the point fires.
    #[inline]
    pub fn hit(&self, point: FaultPoint) -> Result<(), Crash> {
        #[cfg(feature = "fault-injection")]
        {
            let rate = self.rates[point as usize];
            if rate > 0.0 && fastrand::f64() < rate {
                tracing::warn!(fault = point.name(), "injected crash");
                return Err(Crash(point));
            }
        }
        let _ = point;
        Ok(())
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn when_rate_is_one_should_always_fire_and_zero_never() {
        let f = Faults::parse("after_write=1, in_payment=0").unwrap();
        assert_eq!(
            f.hit(FaultPoint::AfterWrite),
            Err(Crash(FaultPoint::AfterWrite))
        );
        assert_eq!(f.hit(FaultPoint::InPayment), Ok(()));
        assert_eq!(f.hit(FaultPoint::AfterPublish), Ok(()));
        assert!(Faults::parse("nope=1").is_err());
        assert!(Faults::parse("after_write=2").is_err());
    }
}
