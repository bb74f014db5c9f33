//! What workers record through the [`metrics`] facade, in one place: the metric names, their
//! labels and the rule that tells live workers from catching-up and rebuilding ones.
//!
//! Nothing is recorded until the program installs a recorder (`annal-runner` installs a
//! Prometheus one); without one every call is a no-op. Labels on every metric: `projection`,
//! `partition` and, on the per-event ones, `phase`:
//!
//! - `rebuild` for a rebuild's shadow projection (its name ends in `__rebuild`);
//! - `catchup` for a batch that filled its page (more events were waiting behind it);
//! - `live` otherwise: the worker is at the head of the log.
//!
//! So the latency of a replay never mixes with the live latency, and the histograms (real
//! buckets, not quantiles) add up across runners.

use std::time::Duration;

use annal_eventstore::RecordedEvent;
use chrono::Utc;

/// Events applied (committed with the checkpoint, or handled at least / at most once).
pub const APPLIED: &str = "annal_projection_events_applied_total";
/// Attempts that failed, each counted once (a batch that failed counts its events).
pub const FAILED: &str = "annal_projection_events_failed_total";
/// Events tried again after a failure, one per extra attempt.
pub const RETRIED: &str = "annal_projection_events_retried_total";
/// Events parked as dead letters.
pub const PARKED: &str = "annal_projection_events_parked_total";
/// Seconds from an event's commit to its being applied.
pub const LATENCY: &str = "annal_projection_latency_seconds";
/// Seconds a batch took, from reading it to its commit.
pub const BATCH: &str = "annal_projection_batch_duration_seconds";

/// The histogram buckets, in seconds, for [`LATENCY`] and [`BATCH`]: 1 ms to 5 minutes.
pub const BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The phase label of a batch of `events` from a page of at most `page_size`.
pub fn phase(projection: &str, events: usize, page_size: usize) -> &'static str {
    if projection.ends_with("__rebuild") {
        "rebuild"
    } else if events >= page_size {
        "catchup"
    } else {
        "live"
    }
}

/// Records `events` applied by partition `partition` of `projection`: the counter and each
/// event's commit-to-applied latency.
pub(crate) fn applied(projection: &str, partition: u32, phase: &'static str, events: &[RecordedEvent]) {
    let labels = [("projection", projection.to_owned()), ("partition", partition.to_string()), ("phase", phase.into())];
    metrics::counter!(APPLIED, &labels).increment(events.len() as u64);
    let latency = metrics::histogram!(LATENCY, &labels);
    let now = Utc::now();
    for event in events {
        latency.record((now - event.recorded_at).to_std().unwrap_or_default().as_secs_f64());
    }
}

/// Records how long a batch took.
pub(crate) fn batch(projection: &str, partition: u32, phase: &'static str, took: Duration) {
    let labels = [("projection", projection.to_owned()), ("partition", partition.to_string()), ("phase", phase.into())];
    metrics::histogram!(BATCH, &labels).record(took.as_secs_f64());
}

/// Counts `count` events under `name` ([`FAILED`], [`RETRIED`] or [`PARKED`]).
pub(crate) fn count(name: &'static str, projection: &str, partition: u32, count: usize) {
    let labels = [("projection", projection.to_owned()), ("partition", partition.to_string())];
    metrics::counter!(name, &labels).increment(count as u64);
}

#[cfg(test)]
mod tests {
    use super::phase;

    #[test]
    fn phases() {
        assert_eq!(phase("balances__rebuild", 1, 100), "rebuild");
        assert_eq!(phase("balances", 100, 100), "catchup");
        assert_eq!(phase("balances", 3, 100), "live");
    }
}
