//! Commands: `Repository::execute` of a counter aggregate, as an application runs it, against
//! the ceilings of the same work in plain SQL through sqlx in the same run: W tasks doing one
//! durable single-row `INSERT` transaction each, and the same in 50-row transactions.
//!
//! W tasks (1, 4, 16) each own 100 aggregates and cycle through them one command at a time, so
//! every command loads a real stream (tens of events) and never conflicts with another task.
//! After a warm-up, a command counts when it completes inside the window. After each run the
//! stored events are counted: they must equal the commands that succeeded. Each is measured
//! without and with the aggregate cache, and with snapshots every 50 events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annal::{Aggregate, Decide, Event, PgEventStore, Repository};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::Plan;
use crate::appends::RAW_INSERT;
use crate::db::{drop_schema, run_id, schema_pool};
use crate::latency::Latencies;
use crate::report::{Better, Measurement};

/// Aggregates per task.
const AGGREGATES: usize = 100;

/// The counter's one event: about 300 bytes of JSON with its padding.
#[derive(Clone, Debug, Serialize, Deserialize, Event)]
enum CounterEvent {
    Incremented { by: u64, pad: String },
}

/// A counter, never snapshotted.
#[derive(Clone, Debug, Default, Aggregate)]
#[aggregate(category = "counter", event = CounterEvent, id = String)]
struct Counter {
    total: u64,
}

/// The same counter, snapshotted every 50 events.
#[derive(Clone, Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(category = "counter", event = CounterEvent, id = String, snapshot(every = 50))]
struct SnapshottedCounter {
    total: u64,
}

impl Decide for SnapshottedCounter {
    type Command = Increment;
    type Error = std::convert::Infallible;

    fn handle(&self, command: Increment) -> Result<Vec<CounterEvent>, Self::Error> {
        Counter::default().handle(command)
    }

    fn apply(&mut self, CounterEvent::Incremented { by, .. }: &CounterEvent) {
        self.total += by;
    }
}

/// The command.
#[derive(Clone, Debug)]
struct Increment {
    by: u64,
}

impl Decide for Counter {
    type Command = Increment;
    type Error = std::convert::Infallible;

    fn handle(&self, Increment { by }: Increment) -> Result<Vec<CounterEvent>, Self::Error> {
        Ok(vec![CounterEvent::Incremented { by, pad: pad() }])
    }

    fn apply(&mut self, CounterEvent::Incremented { by, .. }: &CounterEvent) {
        self.total += by;
    }
}

/// The fixed 267-character padding that brings an event's JSON to about 300 bytes.
fn pad() -> String {
    "x".repeat(267)
}

/// What one run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `Repository::execute`, no cache.
    Annal,
    /// `Repository::execute` with the aggregate cache.
    AnnalCached,
    /// `Repository::execute`, snapshots every 50 events, no cache.
    AnnalSnapshots,
    /// `Repository::execute`, snapshots every 50 events, with the aggregate cache.
    AnnalSnapshotsCached,
    /// One single-row `INSERT` transaction per command, through sqlx.
    Raw1,
    /// 50-row `INSERT` transactions (a row counts as a command).
    Raw50,
}

/// One run's figures.
struct Outcome {
    rate: f64,
    p50: f64,
    p99: f64,
}

/// The commands suite at 1, 4 and 16 tasks.
pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let (warm_up, window) = if plan.quick {
        (Duration::from_millis(500), Duration::from_secs(1))
    } else {
        (Duration::from_secs(2), Duration::from_secs(5))
    };
    // Annal as a user connects it: `PgEventStore::connect`, its own pool, the schema on the URL.
    schema_pool(admin, url, "bench_commands", 1).await?.close().await;
    let store =
        PgEventStore::connect(&with_search_path(url, "bench_commands")).await?.with_group_commit(plan.group_commit);
    let raw = schema_pool(admin, url, "bench_commands_raw", 16).await?;
    PgEventStore::migrate(&raw).await?;
    let mut rows = Vec::new();
    for writers in [1, 4, 16] {
        // The four Annal variants twice, in mirrored order (A B C D D C B A): each has the same
        // mean place in the sequence, so a drift of the machine over the runs (load, the WAL,
        // autovacuum) hits them alike; their figures are the means of their two runs.
        use Target::*;
        let order = [Raw1, Annal, AnnalCached, AnnalSnapshots, AnnalSnapshotsCached];
        let mut outcomes: Vec<(Target, Outcome)> = Vec::new();
        for target in order.iter().chain(order[1..].iter().rev()).chain([&Raw50]) {
            outcomes.push((*target, run(*target, &store, &raw, writers, warm_up, window).await?));
        }
        let mean = |target: Target| {
            let runs: Vec<&Outcome> = outcomes.iter().filter(|(t, _)| *t == target).map(|(_, o)| o).collect();
            let n = runs.len().max(1) as f64;
            Outcome {
                rate: runs.iter().map(|o| o.rate).sum::<f64>() / n,
                p50: runs.iter().map(|o| o.p50).sum::<f64>() / n,
                p99: runs.iter().map(|o| o.p99).sum::<f64>() / n,
            }
        };
        let [raw1, annal, cached, snapshots, snapshots_cached, raw50] =
            [Raw1, Annal, AnnalCached, AnnalSnapshots, AnnalSnapshotsCached, Raw50].map(mean);
        let goal = if writers == 16 { 1.0 } else { 0.9 };
        let note = |o: &Outcome| {
            format!(
                "p50 {:.2} ms, p99 {:.2} ms (single-row INSERT p50 {:.2} ms, p99 {:.2} ms); 50-row INSERT ceiling {:.0} rows/s",
                o.p50, o.p99, raw1.p50, raw1.p99, raw50.rate
            )
        };
        rows.push(
            Measurement::against(
                format!("PostgreSQL commands, {writers} tasks, Repository::execute"),
                annal.rate,
                "commands/s",
                Better::Higher,
                "single-row INSERT transactions",
                raw1.rate,
            )
            .ratio_at_least(goal)
            .note(note(&annal)),
        );
        rows.push(
            Measurement::against(
                format!("PostgreSQL commands, {writers} tasks, Repository::execute with cache"),
                cached.rate,
                "commands/s",
                Better::Higher,
                "single-row INSERT transactions",
                raw1.rate,
            )
            .ratio_at_least(goal)
            .note(note(&cached)),
        );
        rows.push(
            Measurement::against(
                format!("PostgreSQL commands, {writers} tasks, snapshot(every = 50), no cache"),
                snapshots.rate,
                "commands/s",
                Better::Higher,
                "no snapshots, no cache",
                annal.rate,
            )
            .ratio_at_least(1.0)
            .note(format!("{}; both sides the mean of two runs in mirrored order", note(&snapshots))),
        );
        rows.push(
            Measurement::against(
                format!("PostgreSQL commands, {writers} tasks, snapshot(every = 50), with cache"),
                snapshots_cached.rate,
                "commands/s",
                Better::Higher,
                "no snapshots, with cache",
                cached.rate,
            )
            .ratio_at_least(1.0)
            .note(format!("{}; both sides the mean of two runs in mirrored order", note(&snapshots_cached))),
        );
        rows.push(Measurement::against(
            format!("PostgreSQL commands, {writers} tasks, against 50-row INSERT transactions"),
            cached.rate,
            "commands/s",
            Better::Higher,
            "50-row INSERT transactions, rows/s",
            raw50.rate,
        ));
        for (name, o) in [("without cache", &annal), ("with cache", &cached)] {
            rows.push(
                Measurement::against(
                    format!("PostgreSQL command p99, {writers} tasks, {name}"),
                    o.p99,
                    "ms",
                    Better::Lower,
                    "single-row INSERT p99",
                    raw1.p99,
                )
                .note(format!("p50 {:.2} ms", o.p50)),
            );
        }
    }
    store.close().await;
    raw.close().await;
    drop_schema(admin, "bench_commands").await?;
    drop_schema(admin, "bench_commands_raw").await?;
    Ok(rows)
}

/// `url` with `search_path` set to `schema` in the connection options.
fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

/// `writers` tasks run `target` for the warm-up and then the window; returns the rate and the
/// latencies of what completed inside the window, having checked that the stored events equal
/// the commands (rows) that succeeded.
async fn run(
    target: Target,
    store: &PgEventStore,
    raw: &PgPool,
    writers: usize,
    warm_up: Duration,
    window: Duration,
) -> anyhow::Result<Outcome> {
    let run = run_id();
    let start = Arc::new(tokio::sync::Barrier::new(writers + 1));
    let began = Instant::now() + Duration::from_millis(50);
    let (from, until) = (began + warm_up, began + warm_up + window);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, raw, start) = (store.clone(), raw.clone(), start.clone());
        let ids: Vec<String> = (0..AGGREGATES).map(|i| format!("{run}x{w}x{i}")).collect();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::new()?;
            let (mut succeeded, mut counted) = (0u64, 0u64);
            let cached = matches!(target, Target::AnnalCached | Target::AnnalSnapshotsCached);
            let capacity = if cached { AGGREGATES } else { 0 };
            let plain = Repository::<Counter, _>::new(store.clone()).with_cache(capacity);
            let snapshotted = Repository::<SnapshottedCounter, _>::new(store).with_cache(capacity);
            let mut versions = vec![0i64; AGGREGATES];
            start.wait().await;
            tokio::time::sleep_until(began.into()).await;
            let mut i = 0;
            while Instant::now() < until {
                let t0 = Instant::now();
                let n = match target {
                    Target::Annal | Target::AnnalCached => {
                        plain.execute(&ids[i], Increment { by: 1 }).await?;
                        1
                    }
                    Target::AnnalSnapshots | Target::AnnalSnapshotsCached => {
                        snapshotted.execute(&ids[i], Increment { by: 1 }).await?;
                        1
                    }
                    Target::Raw1 | Target::Raw50 => {
                        let n = if target == Target::Raw1 { 1 } else { 50 };
                        insert(&raw, &format!("counter-{}", ids[i]), versions[i], n).await?;
                        versions[i] += n as i64;
                        n as u64
                    }
                };
                let t1 = Instant::now();
                succeeded += n;
                if t0 >= from && t1 <= until {
                    counted += n;
                    latencies.record(t0, t1);
                } else if t0 < from && t1 > from && t1 <= until {
                    // Straddles the window's start: count the rows, not the latency.
                    counted += n;
                }
                i = (i + 1) % AGGREGATES;
            }
            anyhow::Ok((succeeded, counted, latencies))
        }));
    }
    start.wait().await;
    let (mut succeeded, mut counted, mut latencies) = (0, 0, Latencies::new()?);
    for task in tasks {
        let (s, c, l) = task.await??;
        succeeded += s;
        counted += c;
        latencies.merge(&l)?;
    }
    let pool = if matches!(target, Target::Raw1 | Target::Raw50) { raw } else { store.pool() };
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM annal_events WHERE stream LIKE $1")
        .bind(format!("counter-{run}x%"))
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(stored as u64 == succeeded, "{target:?}: {stored} events stored for {succeeded} commands");
    Ok(Outcome { rate: counted as f64 / window.as_secs_f64(), p50: latencies.ms(0.5), p99: latencies.ms(0.99) })
}

/// One transaction of `n` rows into `stream` from `version`, with the counter's payload.
async fn insert(pool: &PgPool, stream: &str, version: i64, n: usize) -> anyhow::Result<()> {
    let data = serde_json::to_value(CounterEvent::Incremented { by: 1, pad: pad() })?;
    sqlx::query(RAW_INSERT)
        .bind((0..n).map(|_| uuid::Uuid::now_v7()).collect::<Vec<_>>())
        .bind(vec![stream; n])
        .bind(vec!["counter"; n])
        .bind((0..n as i64).map(|i| version + i).collect::<Vec<_>>())
        .bind(vec!["Incremented"; n])
        .bind(vec![1i32; n])
        .bind(vec![data; n])
        .bind(vec![serde_json::json!({}); n])
        .execute(pool)
        .await?;
    Ok(())
}
