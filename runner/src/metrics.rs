//! `/metrics`: Prometheus text from the `metrics` crate's recorder. Workers count and time what
//! they do as they do it (`annal_projections::metrics`); the gauges here (lag, positions, dead
//! letters, the oldest transaction) are read from the database at each scrape, so that they
//! cover partitions run by other runners too.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::observe::Snapshot;
use crate::{Error, Result};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's Prometheus recorder (once) and returns its handle.
pub(crate) fn install() -> Result<&'static PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    use annal_eventstore::metrics::{APPEND_BUCKETS, APPEND_DURATION};
    use annal_projections::metrics::{BATCH, BUCKETS, LATENCY};
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LATENCY.into()), BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH.into()), BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(APPEND_DURATION.into()), APPEND_BUCKETS))
        .map_err(|e| Error::Metrics(e.to_string()))?;
    let handle = builder.install_recorder().map_err(|e| Error::Metrics(e.to_string()))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle))
}

fn describe() {
    use annal_projections::metrics as m;
    metrics::describe_counter!(m::APPLIED, "events applied");
    metrics::describe_counter!(m::FAILED, "failed attempts to apply an event");
    metrics::describe_counter!(m::RETRIED, "events tried again after a failure");
    metrics::describe_counter!(m::PARKED, "events parked as dead letters");
    metrics::describe_histogram!(m::LATENCY, metrics::Unit::Seconds, "commit-to-applied latency");
    metrics::describe_histogram!(m::BATCH, metrics::Unit::Seconds, "time to apply a batch");
    metrics::describe_histogram!(
        annal_eventstore::metrics::APPEND_DURATION,
        metrics::Unit::Seconds,
        "time an append took, by backend and outcome (appends made in this process)"
    );
    metrics::describe_gauge!("annal_projection_running", "1 while the projection runs in this process");
    metrics::describe_gauge!("annal_projection_events_behind", "events selected but not yet applied");
    metrics::describe_gauge!("annal_projection_seconds_behind", "age of the oldest event not yet applied");
    metrics::describe_gauge!("annal_projection_dead_letters", "parked events");
    metrics::describe_gauge!("annal_projection_checkpoint_position", "sequence part of the checkpoint");
    metrics::describe_gauge!("annal_projection_lease_held", "1 while some runner holds the partition's lease");
    metrics::describe_gauge!("annal_log_head_position", "sequence part of the head of the log");
    metrics::describe_gauge!("annal_log_readable", "1 while the runner can read the log");
    metrics::describe_gauge!(
        "annal_store_oldest_transaction_seconds",
        "age of the oldest open transaction holding an id (PostgreSQL)"
    );
}

/// Registers the store's append histogram for `backend` (appends made in this process are
/// recorded under it): the exporter prints nothing for a metric never recorded, so without this
/// the scrape of a runner that has appended nothing would lack it, and a dashboard or alert on
/// it would find no series rather than a count of zero.
pub(crate) fn register_backend(backend: &'static str) {
    let _ = metrics::histogram!(annal_eventstore::metrics::APPEND_DURATION, "backend" => backend, "outcome" => "ok");
}

/// Sets the gauges from `snapshot` and renders everything.
pub(crate) fn render(handle: &PrometheusHandle, snapshot: &Snapshot) -> String {
    metrics::gauge!("annal_log_readable").set(if snapshot.log_error.is_none() { 1.0 } else { 0.0 });
    if snapshot.head.is_some() {
        metrics::gauge!("annal_log_head_position").set(snapshot.head_sequence as f64);
    }
    if let Some(age) = snapshot.oldest_transaction_seconds {
        metrics::gauge!("annal_store_oldest_transaction_seconds").set(age);
    } else {
        metrics::gauge!("annal_store_oldest_transaction_seconds").set(0.0);
    }
    for p in &snapshot.projections {
        let name = [("projection", p.name.clone())];
        metrics::gauge!("annal_projection_running", &name).set(if p.running { 1.0 } else { 0.0 });
        for part in &p.partitions {
            let labels = [("projection", p.name.clone()), ("partition", part.partition.to_string())];
            metrics::gauge!("annal_projection_dead_letters", &labels).set(part.dead_letters as f64);
            metrics::gauge!("annal_projection_checkpoint_position", &labels).set(part.checkpoint_sequence as f64);
            metrics::gauge!("annal_projection_lease_held", &labels).set(if part.owner.is_some() { 1.0 } else { 0.0 });
            if let (Some(events), Some(seconds)) = (part.events_behind, part.seconds_behind) {
                metrics::gauge!("annal_projection_events_behind", &labels).set(events as f64);
                metrics::gauge!("annal_projection_seconds_behind", &labels).set(seconds);
            }
        }
    }
    handle.render()
}
