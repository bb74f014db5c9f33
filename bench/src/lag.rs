//! Eventual-consistency lag: writers append at a fixed rate while a SQL projection runs in
//! exactly-once mode; for every event, the time from its append's commit to its read-model row's
//! commit.
//!
//! The commit time of an event is the moment its writer gets the append's reply (the commit is
//! done by then, so this is the latest the commit can have happened). The time its read-model
//! row became visible is the moment the projection's transaction (read-model rows and
//! checkpoint together) has committed: the projection store is wrapped, and `apply` notes the
//! time as soon as the inner store's commit returns. Both are `Instant`s of this process, so no
//! clocks are compared.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use annal_eventstore::{BoxError, EventStore, ExpectedVersion, Filter, PgEventStore, SqliteEventStore, StreamName};
use annal_projections::{
    Applied, Checkpoint, DeadLetter, Fence, Lease, Park, PgProjectionStore, Position, Projection, ProjectionRunner,
    ProjectionStore, RecordedEvent, SqliteProjectionStore, Tx, WorkerOptions,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Plan;
use crate::db::{drop_schema, run_id, schema_pool};
use crate::latency::{Curve, Latencies};
use crate::report::{Better, Measurement};

/// When each event's read-model row became visible.
type Visible = Arc<Mutex<Vec<(Uuid, Instant)>>>;

/// A projection store that notes, for every event of a batch, when the batch's transaction
/// committed.
struct Timed<S> {
    inner: S,
    visible: Visible,
}

#[async_trait]
impl<S: ProjectionStore> ProjectionStore for Timed<S> {
    async fn checkpoint(&self, projection: &str, partition: u32) -> annal_projections::Result<Option<Checkpoint>> {
        self.inner.checkpoint(projection, partition).await
    }

    async fn advance(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        to: Position,
        last_recorded_at: Option<DateTime<Utc>>,
        fence: Option<&Fence>,
    ) -> annal_projections::Result<bool> {
        self.inner.advance(projection, partition, from, to, last_recorded_at, fence).await
    }

    async fn apply(
        &self,
        projection: &dyn Projection,
        partition: u32,
        from: Position,
        to: Position,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> annal_projections::Result<Applied> {
        let applied = self.inner.apply(projection, partition, from, to, events, fence).await?;
        if matches!(applied, Applied::Committed) {
            let now = Instant::now();
            let mut visible = self.visible.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            visible.extend(events.iter().map(|e| (e.id, now)));
        }
        Ok(applied)
    }

    async fn park(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        park: Park<'_>,
        fence: Option<&Fence>,
    ) -> annal_projections::Result<bool> {
        self.inner.park(projection, partition, from, park, fence).await
    }

    async fn dead_letters(&self, projection: &str) -> annal_projections::Result<Vec<DeadLetter>> {
        self.inner.dead_letters(projection).await
    }

    async fn apply_dead_letter(
        &self,
        projection: &dyn Projection,
        id: i64,
        event: &RecordedEvent,
    ) -> annal_projections::Result<Applied> {
        self.inner.apply_dead_letter(projection, id, event).await
    }

    async fn remove_dead_letter(&self, projection: &str, id: i64) -> annal_projections::Result<bool> {
        self.inner.remove_dead_letter(projection, id).await
    }

    async fn record_latency(&self, projection: &str, partition: u32, p99: Duration) -> annal_projections::Result<()> {
        self.inner.record_latency(projection, partition, p99).await
    }

    async fn acquire_lease(
        &self,
        projection: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
    ) -> annal_projections::Result<Option<Fence>> {
        self.inner.acquire_lease(projection, partition, owner, ttl).await
    }

    async fn renew_lease(
        &self,
        projection: &str,
        partition: u32,
        fence: &Fence,
        ttl: Duration,
    ) -> annal_projections::Result<bool> {
        self.inner.renew_lease(projection, partition, fence, ttl).await
    }

    async fn release_lease(&self, projection: &str, partition: u32, fence: &Fence) -> annal_projections::Result<()> {
        self.inner.release_lease(projection, partition, fence).await
    }

    async fn leases(&self, projection: &str) -> annal_projections::Result<Vec<Lease>> {
        self.inner.leases(projection).await
    }

    async fn register_runner(&self, owner: &str, ttl: Duration) -> annal_projections::Result<usize> {
        self.inner.register_runner(owner, ttl).await
    }

    async fn deregister_runner(&self, owner: &str) -> annal_projections::Result<()> {
        self.inner.deregister_runner(owner).await
    }

    async fn reset(&self, projection: &str) -> annal_projections::Result<()> {
        self.inner.reset(projection).await
    }
}

/// A SQL read model of every deposit: one parameterised `INSERT` per event in the projection's
/// transaction, as the runner's declarative SQL projections do.
struct Ledger {
    name: String,
}

const LEDGER_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS bench_ledger (event_id uuid PRIMARY KEY, stream text NOT NULL, amount bigint NOT NULL)";
const LEDGER_INSERT_PG: &str = "INSERT INTO bench_ledger (event_id, stream, amount) VALUES ($1, $2, $3)";
const LEDGER_INSERT_SQLITE: &str = "INSERT INTO bench_ledger (event_id, stream, amount) VALUES (?1, ?2, ?3)";

#[async_trait]
impl Projection for Ledger {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> Filter {
        Filter::categories(["lag"])
    }

    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        for event in events {
            let amount = event.data["amount"].as_i64().unwrap_or_default();
            if let Some(conn) = tx.postgres() {
                sqlx::query(LEDGER_INSERT_PG)
                    .bind(event.id)
                    .bind(event.stream.as_str())
                    .bind(amount)
                    .execute(&mut *conn)
                    .await?;
            } else if let Some(conn) = tx.sqlite() {
                sqlx::query(LEDGER_INSERT_SQLITE)
                    .bind(event.id)
                    .bind(event.stream.as_str())
                    .bind(amount)
                    .execute(&mut *conn)
                    .await?;
            } else {
                return Err("the ledger needs a database transaction".into());
            }
        }
        Ok(())
    }
}

/// One lag run: `writers` tasks, each appending `per_append` events on a fixed tick, together
/// `rate` events per second.
#[derive(Clone, Copy, Debug)]
struct Run {
    backend: &'static str,
    rate: u32,
    writers: usize,
    per_append: usize,
}

/// PostgreSQL at 1,000 and 5,000 events per second.
pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<(Vec<Measurement>, Vec<Curve>)> {
    let pool = schema_pool(admin, url, "bench_lag", 24).await?;
    sqlx::query(LEDGER_TABLE).execute(&pool).await?;
    let events = PgEventStore::from_pool(pool).await?;
    let inner = PgProjectionStore::new(&events).await?;
    let mut measurements = Vec::new();
    let mut curves = Vec::new();
    for (rate, per_append) in [(1000, 1), (5000, 5)] {
        let run = Run { backend: "PostgreSQL", rate, writers: 8, per_append };
        let (m, curve) = measure(events.clone(), inner.clone(), run, plan).await?;
        measurements.extend(m);
        curves.push(curve);
    }
    events.close().await;
    drop_schema(admin, "bench_lag").await?;
    Ok((measurements, curves))
}

/// SQLite at 1,000 events per second.
pub(crate) async fn sqlite(plan: Plan) -> anyhow::Result<(Vec<Measurement>, Vec<Curve>)> {
    let dir = tempfile::tempdir()?;
    let events = SqliteEventStore::open(dir.path().join("lag.db")).await?;
    sqlx::query(LEDGER_TABLE).execute(events.writer()).await?;
    let inner = SqliteProjectionStore::new(&events).await?;
    let run = Run { backend: "SQLite", rate: 1000, writers: 4, per_append: 5 };
    let (measurements, curve) = measure(events.clone(), inner, run, plan).await?;
    events.close().await;
    Ok((measurements, vec![curve]))
}

async fn measure<E, S>(events: E, inner: S, run: Run, plan: Plan) -> anyhow::Result<(Vec<Measurement>, Curve)>
where
    E: EventStore + Clone + 'static,
    S: ProjectionStore + 'static,
{
    // One projection for all runs on a backend: each run continues from the previous one's
    // checkpoint, so no event is applied twice to the shared read model.
    let name = "lag_ledger".to_owned();
    let visible: Visible = Arc::default();
    let store = Arc::new(Timed { inner, visible: visible.clone() });
    let running = ProjectionRunner::new(Arc::new(events.clone()), store)
        .with(Arc::new(Ledger { name: name.clone() }), WorkerOptions::default())?
        .start();
    // Warm up: the projection has taken its lease and applied a first event.
    let warmup = StreamName::new(format!("lag-warmup{}", run_id()))?;
    let first = events.append(&warmup, ExpectedVersion::NoStream, crate::db::events(1)).await?;
    running.wait_for(&name, first.position(), Duration::from_secs(30)).await?;

    let period = Duration::from_secs_f64(run.writers as f64 * run.per_append as f64 / f64::from(run.rate));
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let deadline = start + plan.lag_duration;
    let run_id = run_id();
    let mut writers = Vec::new();
    for w in 0..run.writers {
        let events = events.clone();
        let stream = StreamName::new(format!("lag-{run_id}{w}"))?;
        // Staggered, so the writers' ticks spread over the period.
        let first_tick = start + period.mul_f64(w as f64 / run.writers as f64);
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(first_tick, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut committed = Vec::new();
            let mut last = Position::START;
            let mut version = None;
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let batch = crate::db::events(run.per_append);
                let ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
                let written = events.append(&stream, ExpectedVersion::from_current(version), batch).await?;
                let at = Instant::now();
                committed.extend(ids.into_iter().map(|id| (id, at)));
                version = Some(written.version);
                last = last.max(written.position());
            }
            anyhow::Ok((committed, last))
        }));
    }
    let mut committed = Vec::new();
    let mut last = Position::START;
    for writer in writers {
        let (c, l) = writer.await??;
        committed.extend(c);
        last = last.max(l);
    }
    let achieved = committed.len() as f64 / plan.lag_duration.as_secs_f64();
    running.wait_for(&name, last, Duration::from_secs(120)).await?;
    let runner_p99 = running.lag(&name).await?.latency.p99;
    running.shutdown().await?;

    let seen = std::mem::take(&mut *visible.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    let latencies = Latencies::join(&committed, seen)?;
    let label = format!("{} lag at {} events/s", run.backend, run.rate);
    let how = format!(
        "{} writers, {}-event appends, {} events over {} s",
        run.writers,
        run.per_append,
        latencies.count(),
        plan.lag_duration.as_secs()
    );
    let early = if latencies.early > 0 {
        format!(", {} seen before the writer's reply", latencies.early)
    } else {
        String::new()
    };
    let measurements = vec![
        Measurement::against(
            format!("{label}: achieved write rate"),
            achieved,
            "events/s",
            Better::Higher,
            "target rate",
            f64::from(run.rate),
        )
        .note(how),
        Measurement::new(format!("{label}: commit-to-visible p50"), latencies.ms(0.5), "ms", Better::Lower).below(5.0),
        Measurement::new(format!("{label}: commit-to-visible p99"), latencies.ms(0.99), "ms", Better::Lower)
            .below(20.0),
        Measurement::new(format!("{label}: commit-to-visible p99.9"), latencies.ms(0.999), "ms", Better::Lower)
            .below(50.0),
        Measurement::new(format!("{label}: commit-to-visible max"), latencies.max_ms(), "ms", Better::Lower)
            .note(format!("per event{early}")),
        Measurement::new(
            format!("{label}: p99 as the runner reports it"),
            runner_p99.as_secs_f64() * 1e3,
            "ms",
            Better::Lower,
        )
        .note("recorded_at to applied, from Lag::latency"),
    ];
    Ok((measurements, latencies.curve(format!("{}, {} events/s", run.backend, run.rate))))
}
