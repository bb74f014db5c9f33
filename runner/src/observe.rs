//! What a running runner knows about its projections, gathered once per request for
//! `/metrics`, `/health/ready` and the console, from the database (so partitions held by other
//! runners are included) and from this process (whether its projections still run).

use std::sync::Arc;

use annal_eventstore::{Filter, Position};
use annal_projections::{ProjectionStore, RunningProjections};
use serde::Serialize;

use crate::config::HealthConfig;
use crate::database::Database;

/// What `/metrics`, `/health` and the console read.
#[derive(Clone)]
pub(crate) struct Observed {
    pub(crate) database: Database,
    pub(crate) store: Arc<dyn ProjectionStore>,
    pub(crate) running: Arc<RunningProjections>,
    /// Each projection run here: name, filter, partitions.
    pub(crate) projections: Vec<(String, Filter, u32)>,
    pub(crate) health: HealthConfig,
    /// The projections themselves, for the console's retries.
    pub(crate) handlers: Vec<Arc<dyn annal_projections::Projection>>,
    /// The console's action token.
    pub(crate) token: Option<String>,
}

/// The state of every projection run here, at one moment.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    /// The head of the log, `None` if it could not be read.
    pub(crate) head: Option<String>,
    /// The head's sequence part.
    #[serde(skip)]
    pub(crate) head_sequence: u64,
    /// Why the log could not be read.
    pub(crate) log_error: Option<String>,
    /// The age of the oldest open transaction holding an id (PostgreSQL).
    pub(crate) oldest_transaction_seconds: Option<f64>,
    pub(crate) projections: Vec<ProjectionState>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ProjectionState {
    pub(crate) name: String,
    /// False once the projection stopped in this process (a failing event under `on_failure = "stop"`).
    pub(crate) running: bool,
    pub(crate) dead_letters: u64,
    /// Set while the projection is paused (by an operator, or taken over by a rebuild or reset).
    pub(crate) paused: Option<Paused>,
    pub(crate) partitions: Vec<PartitionState>,
}

/// A pause, as `status`, the console and `/health/ready` show it.
#[derive(Debug, Serialize)]
pub(crate) struct Paused {
    pub(crate) by: String,
    pub(crate) reason: String,
    pub(crate) since: String,
}

impl Paused {
    pub(crate) fn of(control: annal_projections::Control) -> Option<Paused> {
        control.paused.map(|p| Paused { by: p.by, reason: p.reason, since: p.at.to_rfc3339() })
    }
}

/// A rebuild record, as `status --json` and the console's `/api/status` show it.
#[derive(Debug, Serialize)]
pub(crate) struct Rebuild {
    pub(crate) projection: String,
    /// The rebuilding process, `host:pid:suffix`.
    pub(crate) owner: String,
    /// `in_place` or `shadow`.
    pub(crate) mode: &'static str,
    pub(crate) started_at: String,
    pub(crate) updated_at: String,
    pub(crate) total: u64,
    pub(crate) done: u64,
    /// Events per second.
    pub(crate) rate: f64,
    pub(crate) eta_seconds: Option<f64>,
    /// `running`, `swapped_in`, `resumed`, `left_paused`, `failed` or `interrupted`.
    pub(crate) outcome: &'static str,
    /// Why it failed.
    pub(crate) reason: Option<String>,
    /// Running, but not written for `stale_after_seconds` by the store's clock: its process died.
    pub(crate) stale: bool,
    pub(crate) stale_after_seconds: f64,
    /// Since the last write, by the store's clock.
    pub(crate) seconds_since_update: f64,
}

impl Rebuild {
    fn of(record: annal_projections::RebuildProgress) -> Rebuild {
        let time = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        Rebuild {
            stale: record.stale(),
            mode: record.mode.as_str(),
            started_at: time(record.started_at),
            updated_at: time(record.updated_at),
            total: record.update.total,
            done: record.update.done,
            rate: record.update.rate,
            eta_seconds: record.update.eta.map(|eta| eta.as_secs_f64()),
            outcome: record.update.outcome.as_str(),
            reason: record.update.outcome.reason().map(str::to_owned),
            stale_after_seconds: record.stale_after.as_secs_f64(),
            seconds_since_update: record.age.as_secs_f64(),
            projection: record.projection,
            owner: record.owner,
        }
    }
}

/// The rebuild records of every projection (only of `only`, if given); none from a store that
/// keeps none.
pub(crate) async fn rebuilds(store: &dyn ProjectionStore, only: Option<&str>) -> crate::Result<Vec<Rebuild>> {
    let records = match store.rebuilds().await {
        Ok(records) => records,
        Err(annal_projections::Error::Unsupported(_)) => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    Ok(records.into_iter().filter(|r| only.is_none_or(|name| r.projection == name)).map(Rebuild::of).collect())
}

#[derive(Debug, Serialize)]
pub(crate) struct PartitionState {
    pub(crate) partition: u32,
    pub(crate) checkpoint: String,
    #[serde(skip)]
    pub(crate) checkpoint_sequence: u64,
    /// `None` when the log could not be read.
    pub(crate) events_behind: Option<u64>,
    pub(crate) seconds_behind: Option<f64>,
    pub(crate) dead_letters: u64,
    /// The runner holding its lease, if the lease is live.
    pub(crate) owner: Option<String>,
}

impl Observed {
    /// Reads everything once. Errors reading the log are part of the snapshot, not a failure.
    pub(crate) async fn snapshot(&self) -> Snapshot {
        let events = self.database.events();
        let (head, log_error) = match events.head().await {
            Ok(head) => (Some(head), None),
            Err(error) => (None, Some(chain(&error))),
        };
        let mut log_error = log_error;
        let oldest_transaction_seconds = match self.database.oldest_transaction_age().await {
            Ok(age) => age.map(|a| a.as_secs_f64()),
            Err(_) => None,
        };
        let mut projections = Vec::new();
        for (name, filter, count) in &self.projections {
            let running = self.running.is_running(name).unwrap_or(false);
            let dead = self.store.dead_letters(name).await.unwrap_or_default();
            let leases = self.store.leases(name).await.unwrap_or_default();
            let paused = self.store.control(name).await.ok().and_then(Paused::of);
            let mut partitions = Vec::new();
            for partition in 0..*count {
                let checkpoint = match self.store.checkpoint(name, partition).await {
                    Ok(c) => c.map_or(Position::START, |c| c.position),
                    Err(error) => {
                        log_error.get_or_insert_with(|| chain(&error));
                        Position::START
                    }
                };
                let lag = match head {
                    Some(head) => {
                        match annal_projections::partition_lag(&*events, filter, (partition, *count), checkpoint, head)
                            .await
                        {
                            Ok(lag) => Some(lag),
                            Err(error) => {
                                log_error.get_or_insert_with(|| chain(&error));
                                None
                            }
                        }
                    }
                    None => None,
                };
                let now = chrono::Utc::now();
                partitions.push(PartitionState {
                    partition,
                    checkpoint: checkpoint.to_string(),
                    checkpoint_sequence: checkpoint.sequence(),
                    events_behind: lag.as_ref().map(|l| l.events_behind),
                    seconds_behind: lag.as_ref().map(|l| l.time_behind.as_secs_f64()),
                    dead_letters: dead.iter().filter(|d| d.partition == partition).count() as u64,
                    owner: leases
                        .iter()
                        .find(|l| l.partition == partition && l.expires_at > now)
                        .map(|l| l.owner.clone()),
                });
            }
            projections.push(ProjectionState {
                name: name.clone(),
                running,
                dead_letters: dead.len() as u64,
                paused,
                partitions,
            });
        }
        Snapshot {
            head: head.map(|h| h.to_string()),
            head_sequence: head.map_or(0, Position::sequence),
            log_error,
            oldest_transaction_seconds,
            projections,
        }
    }
}

/// Why a runner is not ready, one entry per problem found.
#[derive(Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub(crate) enum NotReady {
    /// The projection stopped in this process, or a partition has no live lease anywhere.
    Stopped { projection: String, partition: Option<u32> },
    /// The log (or the checkpoints) could not be read.
    LogUnreadable { error: String },
    /// A partition is more events behind than `health.max_events_behind`.
    EventsBehind { projection: String, partition: u32, events_behind: u64, max: u64 },
    /// A partition is more seconds behind than `health.max_seconds_behind`.
    SecondsBehind { projection: String, partition: u32, seconds_behind: f64, max: f64 },
    /// A projection has more dead letters than `health.max_dead_letters`.
    DeadLetters { projection: String, dead_letters: u64, max: u64 },
}

/// Every reason `snapshot` fails readiness under `health`; empty when ready.
pub(crate) fn not_ready(snapshot: &Snapshot, health: &HealthConfig) -> Vec<NotReady> {
    let mut reasons = Vec::new();
    if let Some(error) = &snapshot.log_error {
        reasons.push(NotReady::LogUnreadable { error: error.clone() });
    }
    for p in &snapshot.projections {
        if !p.running {
            reasons.push(NotReady::Stopped { projection: p.name.clone(), partition: None });
        }
        if let Some(max) = health.max_dead_letters
            && p.dead_letters > max
        {
            reasons.push(NotReady::DeadLetters { projection: p.name.clone(), dead_letters: p.dead_letters, max });
        }
        for part in &p.partitions {
            // Paused is not stopped: an operator (or a rebuild) chose it, and `status` shows it.
            if p.running && part.owner.is_none() && p.paused.is_none() {
                reasons.push(NotReady::Stopped { projection: p.name.clone(), partition: Some(part.partition) });
            }
            if let (Some(max), Some(behind)) = (health.max_events_behind, part.events_behind)
                && behind > max
            {
                reasons.push(NotReady::EventsBehind {
                    projection: p.name.clone(),
                    partition: part.partition,
                    events_behind: behind,
                    max,
                });
            }
            if let (Some(max), Some(behind)) = (health.max_seconds_behind, part.seconds_behind)
                && behind > max
            {
                reasons.push(NotReady::SecondsBehind {
                    projection: p.name.clone(),
                    partition: part.partition,
                    seconds_behind: behind,
                    max,
                });
            }
        }
    }
    reasons
}

/// An error and its causes, as one line.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
