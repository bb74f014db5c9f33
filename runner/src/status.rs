//! `status`: every projection partition, wherever it runs, as a table or as JSON, once or
//! every few seconds.

use std::sync::Arc;
use std::time::Duration;

use annal_projections::{Projection, ProjectionStore};
use serde::Serialize;

use crate::config::{Config, SqlProjectionConfig};
use crate::database::Database;
use crate::observe::Rebuild;
use crate::rebuild::has_checkpoints;
use crate::{Error, Result, SqlProjection};

/// One projection partition, as `status` reports it.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    projection: String,
    partition: u32,
    /// `paused` while the projection is paused (even while a rebuild that took it over holds
    /// the lease), else `running` while some runner holds its lease, else `stopped`.
    state: &'static str,
    /// Who paused the projection, why and since when.
    paused: Option<crate::observe::Paused>,
    checkpoint: String,
    head: String,
    events_behind: u64,
    seconds_behind: f64,
    /// The commit-to-applied p99 its runner last reported, in milliseconds.
    p99_ms: Option<f64>,
    dead_letters: usize,
    lease: Option<LeaseRow>,
}

#[derive(Debug, Serialize)]
struct LeaseRow {
    /// `host:pid:suffix` of the runner.
    owner: String,
    held: bool,
    token: u64,
}

/// What `status` was asked for.
#[derive(Debug)]
pub(crate) struct StatusOptions {
    pub(crate) projection: Option<String>,
    pub(crate) json: bool,
    pub(crate) watch: Option<f64>,
}

/// Prints the status once, or every `watch` seconds until SIGINT or SIGTERM.
pub(crate) async fn status(
    database: &Database,
    store: &dyn ProjectionStore,
    config: &Config,
    extra: &[Arc<dyn Projection>],
    options: StatusOptions,
) -> Result<()> {
    let only = options.projection.as_deref();
    let Some(every) = options.watch else {
        let rows = rows(database, store, config, extra, only).await?;
        return print(&rows, &crate::observe::rebuilds(store, only).await?, options.json);
    };
    if !every.is_finite() || every <= 0.0 {
        return Err(Error::InvalidArgument(format!("--watch {every}: give a positive number of seconds")));
    }
    let stop = crate::serve::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let rows = rows(database, store, config, extra, only).await?;
        let rebuilds = crate::observe::rebuilds(store, only).await?;
        if !options.json {
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() {
                // Clear the screen and go home, as `watch` does.
                out!("\x1b[2J\x1b[H{}", chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"));
            } else {
                out!("{}", chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"));
            }
        }
        print(&rows, &rebuilds, options.json)?;
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs_f64(every)) => {}
        }
    }
}

fn print(rows: &[Row], rebuilds: &[Rebuild], json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::json!({ "partitions": rows, "rebuilds": rebuilds }));
        return Ok(());
    }
    out!(
        "{:<24} {:>4} {:<8} {:<16} {:<16} {:>8} {:>8} {:>8} {:>5}  lease",
        "projection",
        "part",
        "state",
        "checkpoint",
        "head",
        "behind",
        "seconds",
        "p99 ms",
        "dead"
    );
    let mut pauses = Vec::new();
    for r in rows {
        if let Some(p) = r.paused.as_ref().filter(|_| r.partition == 0) {
            pauses.push(format!("{} is paused by {} since {}: {}", r.projection, p.by, p.since, p.reason));
        }
        let p99 = r.p99_ms.map_or("-".to_owned(), |ms| format!("{ms:.1}"));
        let lease = r.lease.as_ref().map_or("-".to_owned(), |l| {
            format!("{} ({}, token {})", l.owner, if l.held { "held" } else { "expired" }, l.token)
        });
        out!(
            "{:<24} {:>4} {:<8} {:<16} {:<16} {:>8} {:>8.1} {:>8} {:>5}  {lease}",
            r.projection,
            r.partition,
            r.state,
            r.checkpoint,
            r.head,
            r.events_behind,
            r.seconds_behind,
            p99,
            r.dead_letters
        );
    }
    for pause in pauses {
        out!("{pause}");
    }
    for rebuild in rebuilds {
        out!("{}", rebuild_line(rebuild));
    }
    Ok(())
}

/// One line per rebuild record: who, how far, how fast, and how it ended (or that its process
/// died).
fn rebuild_line(r: &Rebuild) -> String {
    if r.total == 0 && r.outcome == "running" && !r.stale {
        return format!(
            "rebuild of {} ({}) by {} since {}: counting the events to replay",
            r.projection,
            r.mode.replace('_', "-"),
            r.owner,
            r.started_at
        );
    }
    let percent = if r.total == 0 { 100.0 } else { r.done as f64 * 100.0 / r.total as f64 };
    let eta = r.eta_seconds.filter(|_| !r.stale).map_or(String::new(), |s| format!(", eta {s:.0} s"));
    let outcome = if r.stale {
        format!(
            "STALE: running but not written for {:.1} s (stale after {:.1} s): its process died; rebuild again{}",
            r.seconds_since_update,
            r.stale_after_seconds,
            if r.mode == "shadow" { " to resume from its shadow" } else { " (the projection is still paused)" }
        )
    } else {
        match &r.reason {
            Some(reason) => format!("{}: {reason}", r.outcome),
            None => r.outcome.replace('_', " "),
        }
    };
    format!(
        "rebuild of {} ({}) by {} since {}: {}/{} events ({percent:.1}%), {:.0} events/s{eta}, {outcome}",
        r.projection,
        r.mode.replace('_', "-"),
        r.owner,
        r.started_at,
        r.done,
        r.total,
        r.rate
    )
}

/// Every projection partition's checkpoint, lag, dead letters and lease; only `only`'s (and its
/// rebuild's) if given, which must name a projection.
pub(crate) async fn rows(
    database: &Database,
    store: &dyn ProjectionStore,
    config: &Config,
    extra: &[Arc<dyn Projection>],
    only: Option<&str>,
) -> Result<Vec<Row>> {
    let events = database.events();
    let head = events.head().await?;
    let mut targets: Vec<(String, annal_eventstore::Filter, u32)> = config
        .projections
        .iter()
        .map(|p| SqlProjection::new(p).map(|s| (p.name.clone(), s.filter(), p.partitions.max(1))))
        .collect::<Result<_, _>>()?;
    targets.extend(extra.iter().map(|p| (p.name().to_owned(), p.filter(), p.partitions().max(1))));
    if let Some(only) = only
        && !targets.iter().any(|(name, _, _)| name == only)
    {
        return Err(Error::UnknownProjection(only.to_owned()));
    }
    // A rebuild in progress (or interrupted) shows as its shadow projection.
    for shadow in config.projections.iter().filter_map(SqlProjectionConfig::shadow) {
        if has_checkpoints(store, &shadow.name, shadow.partitions).await? {
            let filter = SqlProjection::new(&shadow)?.filter();
            targets.push((shadow.name, filter, shadow.partitions.max(1)));
        }
    }
    if let Some(only) = only {
        let shadow = format!("{only}{}", crate::SHADOW_SUFFIX);
        targets.retain(|(name, _, _)| name == only || *name == shadow);
    }
    let mut rows = Vec::new();
    for (name, filter, partitions) in targets {
        let dead = store.dead_letters(&name).await?;
        let leases = store.leases(&name).await?;
        let control = store.control(&name).await?;
        for partition in 0..partitions {
            let checkpoint = store.checkpoint(&name, partition).await?;
            let position = checkpoint.as_ref().map_or(annal_eventstore::Position::START, |c| c.position);
            let lag =
                annal_projections::partition_lag(&*events, &filter, (partition, partitions), position, head).await?;
            let lease = leases.iter().find(|l| l.partition == partition).map(|l| LeaseRow {
                owner: l.owner.clone(),
                held: l.expires_at > chrono::Utc::now(),
                token: l.token,
            });
            let held = lease.as_ref().is_some_and(|l| l.held);
            rows.push(Row {
                state: if control.paused.is_some() {
                    "paused"
                } else if held {
                    "running"
                } else {
                    "stopped"
                },
                paused: crate::observe::Paused::of(control.clone()),
                projection: name.clone(),
                partition,
                checkpoint: position.to_string(),
                head: head.to_string(),
                events_behind: lag.events_behind,
                seconds_behind: lag.time_behind.as_secs_f64(),
                p99_ms: checkpoint.as_ref().and_then(|c| c.latency_p99).map(|d| d.as_secs_f64() * 1e3),
                dead_letters: dead.iter().filter(|d| d.partition == partition).count(),
                lease,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(total: u64, done: u64, outcome: &'static str, reason: Option<&str>, stale: bool) -> Rebuild {
        Rebuild {
            projection: "ledger".into(),
            owner: "host:7:ab".into(),
            mode: "shadow",
            started_at: "T".into(),
            updated_at: "U".into(),
            total,
            done,
            rate: 1234.4,
            eta_seconds: (outcome == "running").then_some(4.6),
            outcome,
            reason: reason.map(str::to_owned),
            stale,
            stale_after_seconds: 3.0,
            seconds_since_update: if stale { 7.25 } else { 0.5 },
        }
    }

    #[test]
    fn a_line_per_rebuild_says_how_far_and_how_it_ended() {
        let head = "rebuild of ledger (shadow) by host:7:ab since T: ";
        let cases = [
            (record(0, 0, "running", None, false), "counting the events to replay"),
            (record(1000, 400, "running", None, false), "400/1000 events (40.0%), 1234 events/s, eta 5 s, running"),
            (
                record(1000, 400, "running", None, true),
                "400/1000 events (40.0%), 1234 events/s, STALE: running but not written for 7.2 s \
                 (stale after 3.0 s): its process died; rebuild again to resume from its shadow",
            ),
            (record(1000, 1000, "swapped_in", None, false), "1000/1000 events (100.0%), 1234 events/s, swapped in"),
            (record(1000, 10, "failed", Some("boom"), false), "10/1000 events (1.0%), 1234 events/s, failed: boom"),
        ];
        for (rebuild, expected) in cases {
            assert_eq!(rebuild_line(&rebuild), format!("{head}{expected}"));
        }
    }
}
