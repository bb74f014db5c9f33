//! Latencies measured per event: when it was committed, when it was seen, and the distribution
//! of the difference.

use std::collections::HashMap;
use std::time::Instant;

use hdrhistogram::Histogram;
use uuid::Uuid;

/// A latency distribution, in microseconds.
pub(crate) struct Latencies {
    histogram: Histogram<u64>,
    /// Events seen before their writer got the commit's reply: counted as zero latency.
    pub(crate) early: u64,
}

impl Latencies {
    /// Joins commit times with the times the events were seen; every committed event must have
    /// been seen.
    ///
    /// # Errors
    /// If an event was never seen (it would be a lost event, not a slow one).
    pub(crate) fn join(
        committed: &[(Uuid, Instant)],
        seen: impl IntoIterator<Item = (Uuid, Instant)>,
    ) -> anyhow::Result<Self> {
        let seen: HashMap<Uuid, Instant> = seen.into_iter().collect();
        let mut latencies = Latencies::new()?;
        for (id, at) in committed {
            let Some(seen) = seen.get(id) else { anyhow::bail!("event {id} was committed but never seen") };
            latencies.record(*at, *seen);
        }
        Ok(latencies)
    }

    pub(crate) fn new() -> anyhow::Result<Self> {
        // 1 µs to 10 minutes at 3 significant figures.
        Ok(Latencies { histogram: Histogram::new_with_bounds(1, 600_000_000, 3)?, early: 0 })
    }

    pub(crate) fn record(&mut self, committed: Instant, seen: Instant) {
        if seen < committed {
            self.early += 1;
        }
        let micros = u64::try_from(seen.saturating_duration_since(committed).as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.max(1));
    }

    /// Adds another distribution's samples to this one.
    pub(crate) fn merge(&mut self, other: &Latencies) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.early += other.early;
        Ok(())
    }

    pub(crate) fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at quantile `q`, in milliseconds.
    pub(crate) fn ms(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    /// The sum of all samples, in milliseconds.
    pub(crate) fn sum_ms(&self) -> f64 {
        self.histogram.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum::<f64>()
            / 1000.0
    }

    pub(crate) fn max_ms(&self) -> f64 {
        self.histogram.max() as f64 / 1000.0
    }

    /// The distribution for a chart: latency at quantiles from p10 to p99.9 (below, the
    /// fastest events say little and the slowest carry the goals).
    pub(crate) fn curve(&self, label: impl Into<String>) -> Curve {
        let points = (1..=60)
            .map(|i| {
                // Evenly spaced in "nines": 0 is p0, 1 is p90, 2 is p99, 3 is p99.9.
                let nines = f64::from(i) * 0.05;
                (nines, self.ms(1.0 - 10f64.powf(-nines)))
            })
            .collect();
        Curve { label: label.into(), points }
    }
}

/// A latency distribution as chart points: (nines, milliseconds).
#[derive(Clone, Debug)]
pub(crate) struct Curve {
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
}
