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

use std::sync::atomic::{AtomicU64, Ordering};
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

/// What a [`Timed`] store saw: when each event's read-model row became visible, and how long
/// the projection's transactions took.
pub(crate) struct Probe {
    /// Per event: when the transaction that applied it began, and when it committed.
    visible: Mutex<Vec<(Uuid, Instant, Instant)>>,
    transactions: Mutex<Latencies>,
    batches: AtomicU64,
    events: AtomicU64,
}

impl Probe {
    pub(crate) fn new() -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Probe {
            visible: Mutex::default(),
            transactions: Mutex::new(Latencies::new()?),
            batches: AtomicU64::new(0),
            events: AtomicU64::new(0),
        }))
    }

    fn take_visible(&self) -> Vec<(Uuid, Instant, Instant)> {
        std::mem::take(&mut *self.visible.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// A one-line profile of the projection's transactions: batches, mean batch size, and the
    /// transaction's duration (begin to commit, handler included) at p50 and p99.
    pub(crate) fn profile(&self) -> String {
        let batches = self.batches.load(Ordering::Relaxed);
        let events = self.events.load(Ordering::Relaxed);
        let transactions = self.transactions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        format!(
            "{batches} transactions of {:.1} events on average, each {:.2} ms p50 / {:.2} ms p99",
            events as f64 / batches.max(1) as f64,
            transactions.ms(0.5),
            transactions.ms(0.99)
        )
    }

    /// Total time spent in the projection's transactions, in seconds (approximate: the sum of
    /// the histogram's samples).
    pub(crate) fn total_seconds(&self) -> f64 {
        let transactions = self.transactions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        transactions.sum_ms() / 1000.0
    }
}

/// A projection store that notes, for every event of a batch, when the batch's transaction
/// committed, and how long the transaction took.
pub(crate) struct Timed<S> {
    pub(crate) inner: S,
    pub(crate) probe: Arc<Probe>,
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
        let began = Instant::now();
        let applied = self.inner.apply(projection, partition, from, to, events, fence).await?;
        if matches!(applied, Applied::Committed) {
            let now = Instant::now();
            let probe = &self.probe;
            probe
                .visible
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend(events.iter().map(|e| (e.id, began, now)));
            probe.transactions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).record(began, now);
            probe.batches.fetch_add(1, Ordering::Relaxed);
            probe.events.fetch_add(events.len() as u64, Ordering::Relaxed);
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

    async fn register_runner(&self, projection: &str, owner: &str, ttl: Duration) -> annal_projections::Result<usize> {
        self.inner.register_runner(projection, owner, ttl).await
    }

    async fn deregister_runner(&self, projection: &str, owner: &str) -> annal_projections::Result<()> {
        self.inner.deregister_runner(projection, owner).await
    }

    async fn reset(&self, projection: &str) -> annal_projections::Result<()> {
        self.inner.reset(projection).await
    }

    async fn control(&self, projection: &str) -> annal_projections::Result<annal_projections::Control> {
        self.inner.control(projection).await
    }

    async fn pause(&self, projection: &str, pause: &annal_projections::Pause) -> annal_projections::Result<()> {
        self.inner.pause(projection, pause).await
    }

    async fn resume(&self, projection: &str) -> annal_projections::Result<bool> {
        self.inner.resume(projection).await
    }

    async fn move_checkpoints(
        &self,
        projection: &str,
        partitions: u32,
        to: annal_eventstore::Position,
    ) -> annal_projections::Result<()> {
        self.inner.move_checkpoints(projection, partitions, to).await
    }

    async fn claim_partitions(&self, projection: &str, partitions: u32) -> annal_projections::Result<()> {
        self.inner.claim_partitions(projection, partitions).await
    }

    async fn promote(&self, shadow: &str, live: &str, statements: &[String]) -> annal_projections::Result<()> {
        self.inner.promote(shadow, live, statements).await
    }
}

/// A SQL read model of every deposit, written in the projection's transaction: one
/// parameterised `INSERT` per event, as the runner's declarative SQL projections do, or (on
/// PostgreSQL, `batched`) one `INSERT ... SELECT FROM unnest(...)` per batch.
struct Ledger {
    name: String,
    batched: bool,
    /// `SET LOCAL synchronous_commit = off` in the projection's transaction: its commit returns
    /// before the WAL is flushed. Safe for an exactly-once read model: a crash can only lose
    /// read-model rows together with the checkpoint that covers them, and they are applied again.
    async_commit: bool,
}

const LEDGER_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS bench_ledger (event_id uuid PRIMARY KEY, stream text NOT NULL, amount bigint NOT NULL)";
const LEDGER_INSERT_PG: &str = "INSERT INTO bench_ledger (event_id, stream, amount) VALUES ($1, $2, $3)";
const LEDGER_INSERT_BATCH_PG: &str = "INSERT INTO bench_ledger (event_id, stream, amount) \
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[])";
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
        let amount = |e: &RecordedEvent| e.data["amount"].as_i64().unwrap_or_default();
        if self.async_commit {
            let conn = tx.postgres().ok_or("asynchronous commit needs a PostgreSQL transaction")?;
            sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *conn).await?;
        }
        if self.batched {
            let conn = tx.postgres().ok_or("the batched ledger needs a PostgreSQL transaction")?;
            sqlx::query(LEDGER_INSERT_BATCH_PG)
                .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>())
                .bind(events.iter().map(amount).collect::<Vec<_>>())
                .execute(&mut *conn)
                .await?;
            return Ok(());
        }
        for event in events {
            let amount = amount(event);
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
    handler: Handler,
}

impl Run {
    /// "PostgreSQL lag at 10000 events/s, one INSERT per event": what names the run's figures.
    fn label(&self) -> String {
        let statements = match self.handler {
            Handler::PerEvent => "one INSERT per event",
            Handler::Declarative => "one INSERT per event, declarative (annal-runner)",
            Handler::PerBatch => "one INSERT per batch",
            Handler::PerBatchAsync => "one INSERT per batch, asynchronous commit",
        };
        format!("{} lag at {} events/s, {statements}", self.backend, self.rate)
    }
}

/// How the projection writes its read model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    /// A Rust projection running one `INSERT` per event.
    PerEvent,
    /// A Rust projection running one `INSERT ... SELECT FROM unnest(...)` per batch.
    PerBatch,
    /// The same, its transactions committing asynchronously.
    PerBatchAsync,
    /// The runner's declarative SQL projection with one `INSERT` per event type (one statement
    /// per event as the user writes it; on PostgreSQL the runner applies a batch in one call).
    Declarative,
}

/// The declarative projection: the same ledger, as a user configures it for `annal-runner`.
const DECLARATIVE: &str = r#"
database = "postgres://unused"
[[projection]]
name = "lag_ledger"
categories = ["lag"]
[projection.handlers]
Deposited = "INSERT INTO bench_ledger (event_id, stream, amount) VALUES (:event_id, :stream, (:data ->> 'amount')::bigint)"
"#;

/// PostgreSQL at 1,000, 5,000 and 10,000 events per second with one statement per event (the
/// last from writers appending 10 events at a time, once from a Rust projection and once from
/// the runner's declarative one), and at 5,000 with one statement per batch, then also with
/// asynchronous commit.
pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<(Vec<Measurement>, Vec<Curve>)> {
    let pool = schema_pool(admin, url, "bench_lag", 24).await?;
    sqlx::query(LEDGER_TABLE).execute(&pool).await?;
    let events = PgEventStore::from_pool(pool).await?;
    let inner = PgProjectionStore::new(&events).await?;
    let mut measurements = Vec::new();
    let mut curves = Vec::new();
    let runs = [
        (1000, 1, Handler::PerEvent),
        (5000, 5, Handler::PerEvent),
        (10_000, 10, Handler::PerEvent),
        (10_000, 10, Handler::Declarative),
        (5000, 5, Handler::PerBatch),
        (5000, 5, Handler::PerBatchAsync),
    ];
    for (rate, per_append, handler) in runs {
        let run = Run { backend: "PostgreSQL", rate, writers: 8, per_append, handler };
        let projection = match handler {
            Handler::Declarative => {
                let config = annal_runner::Config::parse(DECLARATIVE)?;
                let sql = annal_runner::SqlProjection::new(&config.projections[0])?;
                sql.install_postgres(events.pool()).await?;
                Arc::new(sql) as Arc<dyn Projection>
            }
            _ => ledger(handler),
        };
        // A checkpoint now, so that the previous run's WAL does not trigger one inside this
        // run's window; checkpoints that still fall inside it are counted and reported.
        sqlx::query("CHECKPOINT").execute(events.pool()).await?;
        let before = maintenance(events.pool()).await?;
        let (m, curve) = measure(events.clone(), inner.clone(), projection, run, plan).await?;
        let after = maintenance(events.pool()).await?;
        measurements.extend(m);
        measurements.push(
            Measurement::new(
                format!("{}: server checkpoints during the run", run.label()),
                (after.0 - before.0) as f64,
                "checkpoints",
                Better::Lower,
            )
            .note(format!("and {} autovacuum or autoanalyze runs of the suite's tables", after.1 - before.1)),
        );
        curves.push(curve);
    }
    events.close().await;
    drop_schema(admin, "bench_lag").await?;
    Ok((measurements, curves))
}

/// The server's checkpoints so far, and the autovacuum and autoanalyze runs of the tables in
/// the pool's schema: what else wrote to the disk while a lag run was measured (a stall in the
/// p99.9 is then the server's, not the projection's).
async fn maintenance(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let row: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), \
         (SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)::int8 FROM pg_stat_user_tables \
          WHERE schemaname = current_schema())",
    )
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// SQLite at 1,000 events per second.
pub(crate) async fn sqlite(plan: Plan) -> anyhow::Result<(Vec<Measurement>, Vec<Curve>)> {
    let dir = tempfile::tempdir()?;
    let events = SqliteEventStore::open(dir.path().join("lag.db")).await?;
    sqlx::query(LEDGER_TABLE).execute(events.writer()).await?;
    let inner = SqliteProjectionStore::new(&events).await?;
    let run = Run { backend: "SQLite", rate: 1000, writers: 4, per_append: 5, handler: Handler::PerEvent };
    let (measurements, curve) = measure(events.clone(), inner, ledger(run.handler), run, plan).await?;
    events.close().await;
    Ok((measurements, vec![curve]))
}

/// The Rust ledger projection writing as `handler` says.
fn ledger(handler: Handler) -> Arc<dyn Projection> {
    Arc::new(Ledger {
        name: "lag_ledger".to_owned(),
        batched: matches!(handler, Handler::PerBatch | Handler::PerBatchAsync),
        async_commit: handler == Handler::PerBatchAsync,
    })
}

async fn measure<E, S>(
    events: E,
    inner: S,
    projection: Arc<dyn Projection>,
    run: Run,
    plan: Plan,
) -> anyhow::Result<(Vec<Measurement>, Curve)>
where
    E: EventStore + Clone + 'static,
    S: ProjectionStore + 'static,
{
    // One projection for all runs on a backend: each run continues from the previous one's
    // checkpoint, so no event is applied twice to the shared read model.
    let name = projection.name().to_owned();
    let probe = Probe::new()?;
    let store = Arc::new(Timed { inner, probe: probe.clone() });
    let running =
        ProjectionRunner::new(Arc::new(events.clone()), store).with(projection, WorkerOptions::default())?.start();
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

    // The warm-up event is not measured.
    let seen = probe.take_visible();
    let latencies = Latencies::join(&committed, seen.iter().map(|&(id, _, visible)| (id, visible)))?;
    // The profile: how long events waited before the transaction applying them began (for the
    // batch in flight, then for the read of the log), against the whole.
    let before = Latencies::join(&committed, seen.iter().map(|&(id, began, _)| (id, began)))?;
    let split = format!(
        "before the projection's transaction began: {:.2} ms p50 / {:.2} ms p99",
        before.ms(0.5),
        before.ms(0.99)
    );
    let label = run.label();
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
            .note(format!("per event{early}; {split}; {}", probe.profile())),
        Measurement::new(
            format!("{label}: p99 as the runner reports it"),
            runner_p99.as_secs_f64() * 1e3,
            "ms",
            Better::Lower,
        )
        .note("recorded_at to applied, from Lag::latency"),
    ];
    let short = match run.handler {
        Handler::PerEvent => "",
        Handler::Declarative => ", declarative",
        Handler::PerBatch => ", batched",
        Handler::PerBatchAsync => ", batched, async commit",
    };
    Ok((measurements, latencies.curve(format!("{}, {} events/s{short}", run.backend, run.rate))))
}
