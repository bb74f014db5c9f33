//! Retrying failed events: exponential back-off with jitter, then a dead letter or a stop.

use std::time::Duration;

/// How a failing event is retried before the projection gives up on it.
///
/// The defaults follow common practice: start at 100 ms, double each time, cap at 60 s, add
/// jitter, and give up after 7 attempts.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// The pause after the first failure.
    pub initial: Duration,
    /// How much each pause grows.
    pub factor: f64,
    /// The longest pause.
    pub max: Duration,
    /// Whether pauses are randomised (between half and all of the computed pause), so that
    /// workers failing together do not retry together.
    pub jitter: bool,
    /// How many attempts in all, the first included (at least 1).
    pub attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(60),
            jitter: true,
            attempts: 7,
        }
    }
}

impl RetryPolicy {
    /// The default policy with another number of attempts.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The default policy with another first pause.
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The pause after failed attempt number `attempt` (from 1).
    pub fn pause(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let pause = self.initial.as_secs_f64() * self.factor.powi(exponent);
        let pause = Duration::from_secs_f64(pause.min(self.max.as_secs_f64()).max(0.0));
        if self.jitter {
            // Half to all of the pause; a UUIDv4 is random enough for spreading retries.
            let random = (uuid::Uuid::new_v4().as_u128() % 1_000) as f64 / 1_000.0;
            pause.mul_f64(0.5 + random / 2.0)
        } else {
            pause
        }
    }
}

/// What a worker does with an event that still fails after its last attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Park it in the dead-letter table and go on. Later events of the same stream are parked
    /// behind it, so a stream's events are never applied out of order.
    #[default]
    Park,
    /// Stop the projection with the error; it resumes at that event when restarted.
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap() {
        let policy = RetryPolicy { jitter: false, ..RetryPolicy::default() };
        let pauses: Vec<_> = (1..=12).map(|a| policy.pause(a).as_millis()).collect();
        assert_eq!(&pauses[..4], &[100, 200, 400, 800]);
        assert_eq!(pauses[11], 60_000);
        let jittered = RetryPolicy::default();
        for attempt in 1..10 {
            let p = jittered.pause(attempt);
            let full = policy.pause(attempt);
            assert!(p >= full / 2 && p <= full, "{p:?} vs {full:?}");
        }
    }
}
