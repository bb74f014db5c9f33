//! What the store records of each append through the [`metrics`](https://docs.rs/metrics)
//! facade and `tracing`: one histogram sample and one span, the same on every backend.
//!
//! Nothing is recorded until the program installs a recorder (`annal-runner` installs a
//! Prometheus one, with [`APPEND_BUCKETS`]); without one the sample is a no-op.

use std::future::Future;
use std::time::Instant;

use tracing::Instrument;

use crate::{Result, StreamName};

/// Seconds an append took, from the call to its result (for an append in a PostgreSQL
/// transaction, to the end of its statements, not the commit). Labels: `backend` (`memory`, `sqlite`, `postgres`)
/// and `outcome` (`ok`, also for an idempotent retry; `conflict`; `error`, bad input among them).
pub const APPEND_DURATION: &str = "annal_store_append_duration_seconds";

/// The buckets, in seconds, for [`APPEND_DURATION`]: 100 µs to 10 s (an in-memory append takes
/// microseconds, a PostgreSQL one behind a lock seconds).
pub const APPEND_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Runs a backend's append inside an `annal.append` span (whose trace context the appended
/// events keep, see [`TraceParent`](crate::TraceParent)) and records its duration.
pub(crate) async fn append<T>(
    backend: &'static str,
    stream: &StreamName,
    events: usize,
    append: impl Future<Output = Result<T>>,
) -> Result<T> {
    let span = tracing::info_span!("annal.append", backend, stream = stream.as_str(), events);
    let started = Instant::now();
    let result = append.instrument(span).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(error) if error.is_conflict() => "conflict",
        Err(_) => "error",
    };
    metrics::histogram!(APPEND_DURATION, "backend" => backend, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}
