//! How the local runner keeps a slow machine from turning into a congestion collapse.
//!
//! Two mechanisms, both shared by the event source mappings ([`crate::esm`]) and the HTTP
//! front ([`crate::http`]):
//!
//! - [`FunctionTimeout`]: a function's timeout. On `make run` it is the template's, fixed, as
//!   on Lambda. Tests shorten it so that crashes are retried quickly; a short timeout is then a
//!   *floor*, and the timeout in force grows with the invocations' recent durations (a few times
//!   their 95th percentile, doubled after every time-out) up to the template's value. On a busy
//!   or slow machine the stack therefore stops timing out healthy invocations, which would
//!   otherwise be retried, receive their messages again, and finally dead-letter good work.
//! - [`Governor`]: how many pollers of one mapping may run at once. Like Lambda's event source
//!   mapping, which scales down when its function errors or is throttled, it halves on a
//!   receive error, a failed or timed-out invocation, or a slow SQS call, and adds one poller
//!   back after a run of healthy batches (additive increase, multiplicative decrease).

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How many recent invocation durations a [`FunctionTimeout`] remembers.
const WINDOW: usize = 64;
/// The timeout in force is this many times the recent 95th percentile duration.
const HEADROOM: u32 = 4;

/// A function's timeout, fixed or scaled by how long its invocations have been taking.
#[derive(Debug)]
pub struct FunctionTimeout {
    floor: Duration,
    ceiling: Duration,
    recent: Mutex<VecDeque<Duration>>,
}

impl FunctionTimeout {
    /// Always `timeout` (the template's, as on Lambda).
    pub fn fixed(timeout: Duration) -> Self {
        Self::scaled(timeout, timeout)
    }

    /// At least `floor`, at most `ceiling`, in between as the invocations demand.
    pub fn scaled(floor: Duration, ceiling: Duration) -> Self {
        Self {
            floor: floor.min(ceiling),
            ceiling,
            recent: Mutex::new(VecDeque::with_capacity(WINDOW)),
        }
    }

    /// The timeout for an invocation that starts now.
    pub fn current(&self) -> Duration {
        if self.floor >= self.ceiling {
            return self.ceiling;
        }
        let recent = self.recent.lock().expect("timeout window");
        if recent.is_empty() {
            return self.floor;
        }
        let mut sorted: Vec<Duration> = recent.iter().copied().collect();
        sorted.sort_unstable();
        let p95 = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
        (p95 * HEADROOM).clamp(self.floor, self.ceiling)
    }

    /// Records how long a finished invocation took.
    pub fn observe(&self, took: Duration) {
        let mut recent = self.recent.lock().expect("timeout window");
        if recent.len() == WINDOW {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// Records an invocation stopped at `limit`. It needed at least that long, so it counts
    /// as that many samples of `limit` as make it the 95th percentile: the next invocations get
    /// [`HEADROOM`] times as long (up to the ceiling).
    pub fn timed_out(&self, limit: Duration) {
        for _ in 0..WINDOW / 10 {
            self.observe(limit);
        }
    }

    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }
}

/// The visibility timeout a receive asks for: long enough to cover the batching window and an
/// invocation that runs to its timeout (plus a second for the delete), never below `floor`
/// and never above `ceiling` (the queue's own setting).
pub fn visibility_for(
    function_timeout: Duration,
    batching_window: Duration,
    floor: i32,
    ceiling: i32,
) -> i32 {
    let needed = (function_timeout + batching_window + Duration::from_secs(1)).as_secs_f64();
    (needed.ceil() as i32).max(floor).min(ceiling.max(floor))
}

/// Additive-increase, multiplicative-decrease limit on a mapping's concurrent pollers.
#[derive(Debug)]
pub struct Governor {
    max: usize,
    limit: AtomicUsize,
    healthy: AtomicUsize,
}

impl Governor {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            limit: AtomicUsize::new(max),
            healthy: AtomicUsize::new(0),
        }
    }

    /// Whether poller number `index` (from 0) may poll now.
    pub fn admits(&self, index: usize) -> bool {
        index < self.limit.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A batch went through cleanly and quickly: after `limit` such batches, one more poller.
    pub fn healthy(&self) {
        let limit = self.limit();
        if limit >= self.max {
            return;
        }
        if self.healthy.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
            self.healthy.store(0, Ordering::Relaxed);
            let _ =
                self.limit
                    .compare_exchange(limit, limit + 1, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// An error, a time-out or a slow dependency: half the pollers stand down (at least one
    /// keeps going). Returns the new limit.
    pub fn congested(&self) -> usize {
        self.healthy.store(0, Ordering::Relaxed);
        let mut current = self.limit();
        loop {
            let next = (current / 2).max(1);
            match self
                .limit
                .compare_exchange(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => current = seen,
            }
        }
    }
}

/// The runner's one back-off (the event source mappings' receive errors, provisioning's waits,
/// the tests' retries): exponential with jitter and without end, from `base / 2 ..= base` up
/// to `cap / 2 ..= cap`, doubling. Iterate it for the delays; take a fresh one to start again
/// from `base`; or give it to [`backon::Retryable::retry`].
pub fn backoff(base: Duration, cap: Duration) -> ExponentialBackoff {
    // backon's jitter adds up to as much again as the step, so the steps are half of each.
    ExponentialBuilder::new()
        .with_min_delay(base / 2)
        .with_max_delay(cap / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn when_fixed_should_always_be_the_templates_timeout() {
        let t = FunctionTimeout::fixed(S(10));
        t.observe(S(30));
        t.timed_out(S(10));
        assert_eq!(t.current(), S(10));
    }

    #[test]
    fn when_invocations_are_fast_should_stay_at_the_floor() {
        let t = FunctionTimeout::scaled(S(2), S(10));
        assert_eq!(t.current(), S(2));
        for _ in 0..100 {
            t.observe(MS(50));
        }
        assert_eq!(t.current(), S(2));
    }

    #[test]
    fn when_invocations_slow_down_should_grow_with_them_up_to_the_ceiling() {
        let t = FunctionTimeout::scaled(S(2), S(10));
        for _ in 0..WINDOW {
            t.observe(MS(1_000));
        }
        assert_eq!(t.current(), S(4));
        for _ in 0..WINDOW {
            t.observe(S(5));
        }
        assert_eq!(t.current(), S(10));
        // And come back down when they speed up again.
        for _ in 0..WINDOW {
            t.observe(MS(100));
        }
        assert_eq!(t.current(), S(2));
    }

    #[test]
    fn when_invocations_time_out_should_lengthen_the_next_timeout() {
        let t = FunctionTimeout::scaled(S(2), S(60));
        for _ in 0..WINDOW {
            t.observe(MS(200));
        }
        let before = t.current();
        t.timed_out(before);
        let after = t.current();
        assert!(after >= before * 2, "{before:?} -> {after:?}");
        t.timed_out(after);
        assert!(t.current() >= after * 2, "{after:?} -> {:?}", t.current());
    }

    #[test]
    fn when_computing_visibility_should_cover_window_and_timeout_within_the_queues_bounds() {
        assert_eq!(visibility_for(S(2), S(1), 2, 70), 4);
        assert_eq!(visibility_for(MS(2_500), S(0), 2, 70), 4);
        assert_eq!(visibility_for(S(100), S(1), 2, 70), 70);
        assert_eq!(visibility_for(MS(100), S(0), 5, 70), 5);
    }

    #[test]
    fn when_congested_should_halve_and_recover_one_poller_at_a_time() {
        let g = Governor::new(5);
        assert!(g.admits(4));
        assert_eq!(g.congested(), 2);
        assert!(g.admits(1) && !g.admits(2));
        assert_eq!(g.congested(), 1);
        assert_eq!(g.congested(), 1, "one poller always keeps going");
        g.healthy();
        assert_eq!(g.limit(), 2);
        g.healthy();
        assert_eq!(g.limit(), 2, "two healthy batches at a limit of two");
        g.healthy();
        assert_eq!(g.limit(), 3);
        for _ in 0..20 {
            g.healthy();
        }
        assert_eq!(
            g.limit(),
            5,
            "never above the mapping's maximum concurrency"
        );
    }

    #[test]
    fn when_backing_off_should_grow_to_the_cap_and_reset() {
        let mut b = backoff(MS(100), S(2));
        let first = b.next().unwrap();
        assert!(first >= MS(50) && first <= MS(100), "{first:?}");
        for _ in 0..10 {
            b.next();
        }
        let late = b.next().unwrap();
        assert!(late >= S(1) && late <= S(2), "{late:?}");
        // Without end.
        assert!(b.nth(1_000).is_some_and(|d| d <= S(2)));
        let mut b = backoff(MS(100), S(2));
        assert!(b.next().unwrap() <= MS(100));
    }
}
