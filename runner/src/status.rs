//! `status`: a table of every projection partition, wherever it runs.

use std::sync::Arc;

use annal_projections::{Projection, ProjectionStore};

use crate::config::{Config, SqlProjectionConfig};
use crate::database::Database;
use crate::rebuild::has_checkpoints;
use crate::{Result, SqlProjection};

/// Prints every projection partition's checkpoint, lag, dead letters and lease.
pub(crate) async fn status(
    database: &Database,
    store: &dyn ProjectionStore,
    config: &Config,
    extra: &[Arc<dyn Projection>],
) -> Result<()> {
    let events = database.events();
    let head = events.head().await?;
    let mut targets: Vec<(String, annal_eventstore::Filter, u32)> = config
        .projections
        .iter()
        .map(|p| SqlProjection::new(p).map(|s| (p.name.clone(), s.filter(), p.partitions.max(1))))
        .collect::<Result<_, _>>()?;
    targets.extend(extra.iter().map(|p| (p.name().to_owned(), p.filter(), p.partitions().max(1))));
    // A rebuild in progress (or interrupted) shows as its shadow projection.
    for shadow in config.projections.iter().filter_map(SqlProjectionConfig::shadow) {
        if has_checkpoints(store, &shadow.name, shadow.partitions).await? {
            let filter = SqlProjection::new(&shadow)?.filter();
            targets.push((shadow.name, filter, shadow.partitions.max(1)));
        }
    }
    println!(
        "{:<24} {:>4} {:<8} {:<22} {:<22} {:>10} {:>10} {:>10} {:>6}  lease",
        "projection", "part", "state", "checkpoint", "head", "behind", "seconds", "p99 ms", "dead"
    );
    for (name, filter, partitions) in targets {
        let dead = store.dead_letters(&name).await?;
        let leases = store.leases(&name).await?;
        for partition in 0..partitions {
            let checkpoint = store.checkpoint(&name, partition).await?;
            let position = checkpoint.as_ref().map_or(annal_eventstore::Position::START, |c| c.position);
            let lag =
                annal_projections::partition_lag(&*events, &filter, (partition, partitions), position, head).await?;
            let (behind, seconds) = (lag.events_behind, lag.time_behind.as_secs_f64());
            let lease = leases.iter().find(|l| l.partition == partition);
            let held = lease.is_some_and(|l| l.expires_at > chrono::Utc::now());
            let lease = lease.map_or("-".to_owned(), |l| {
                format!("{} ({}, token {})", l.owner, if held { "held" } else { "expired" }, l.token)
            });
            let state = if held { "running" } else { "stopped" };
            let p99 = checkpoint
                .as_ref()
                .and_then(|c| c.latency_p99)
                .map_or("-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3));
            let dead = dead.iter().filter(|d| d.partition == partition).count();
            println!(
                "{name:<24} {partition:>4} {state:<8} {:<22} {:<22} {behind:>10} {seconds:>10.1} {p99:>10} {dead:>6}  {lease}",
                position.to_string(),
                head.to_string()
            );
        }
    }
    Ok(())
}
