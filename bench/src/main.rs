//! `annal-bench`: Annal's appends against raw SQL inserts into an identical table, on the same
//! database, in the same run, so that a noisy machine moves both sides alike and the ratio
//! stays meaningful.
//!
//! Run it through `scripts/bench` (a throwaway PostgreSQL with durable commits), or with
//! `DATABASE_URL` set: `cargo run --release -p annal-bench -- --help`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, PgEventStore, SqliteEventStore, StreamName};
use anyhow::Context;
use clap::Parser;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use uuid::Uuid;

/// Measures Annal's appends against raw SQL inserts on the same database in one run.
#[derive(Parser, Debug)]
struct Args {
    /// Seconds each measurement runs, per round.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds per measurement; raw and Annal alternate, and the rounds are averaged.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// A short run (1 s per measurement, one round), to check that everything works.
    #[arg(long)]
    quick: bool,
}

/// One workload shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    writers: usize,
    batch: usize,
}

/// The system under test.
#[derive(Clone)]
enum Target {
    /// `PgEventStore::append` with `ExpectedVersion::Exact`.
    Annal(PgEventStore),
    /// Plain `INSERT`s of the same rows into an identical table, no checks.
    Raw(PgPool),
    /// Plain `INSERT`s plus `pg_notify` in the same transaction: the naive wake-up.
    RawNotifyInTransaction(PgPool),
    /// `SqliteEventStore::append`.
    AnnalSqlite(SqliteEventStore),
    /// Plain `INSERT`s into an identical SQLite table.
    RawSqlite(SqlitePool),
}

struct Row {
    name: String,
    baseline_name: &'static str,
    baseline: f64,
    value: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (seconds, rounds) = if args.quick { (1.0, 1) } else { (args.seconds, args.rounds) };
    let duration = Duration::from_secs_f64(seconds);
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set: run scripts/bench")?;

    let admin = PgPool::connect(&url).await?;
    print_machine(&admin).await?;
    let annal_pool = schema_pool(&admin, &url, "bench_annal").await?;
    let raw_pool = schema_pool(&admin, &url, "bench_raw").await?;
    // The baseline's table comes from the very same migration: identical columns, keys, indexes.
    PgEventStore::migrate(&raw_pool).await?;
    let store = PgEventStore::from_pool(annal_pool).await?;

    let mut rows = Vec::new();
    let shapes = [(1, 1), (4, 1), (16, 1), (1, 50), (4, 50)].map(|(writers, batch)| Shape { writers, batch });
    for shape in shapes {
        let (raw, annal) =
            alternate(&Target::Raw(raw_pool.clone()), &Target::Annal(store.clone()), shape, duration, rounds).await?;
        rows.push(Row {
            name: format!("PostgreSQL append, {} writers, {}-event batches", shape.writers, shape.batch),
            baseline_name: "raw INSERT",
            baseline: raw,
            value: annal,
        });
    }
    // What the cross-process wake-up costs, and what the naive one would cost.
    let shape = Shape { writers: 16, batch: 1 };
    let quiet = store.clone().notify_other_processes(false);
    let (without, with) =
        alternate(&Target::Annal(quiet.clone()), &Target::Annal(store.clone()), shape, duration, rounds).await?;
    quiet.clone().notify_other_processes(true);
    rows.push(Row {
        name: "PostgreSQL append, 16 writers, with coalesced NOTIFY after commit".into(),
        baseline_name: "Annal without NOTIFY",
        baseline: without,
        value: with,
    });
    let (raw, naive) = alternate(
        &Target::Raw(raw_pool.clone()),
        &Target::RawNotifyInTransaction(raw_pool.clone()),
        shape,
        duration,
        rounds,
    )
    .await?;
    rows.push(Row {
        name: "raw INSERT + pg_notify in the same transaction, 16 writers".into(),
        baseline_name: "raw INSERT",
        baseline: raw,
        value: naive,
    });

    // SQLite, embedded: Annal against raw inserts into an identical table in another file.
    let dir = tempfile::tempdir()?;
    let sqlite_store = SqliteEventStore::open(dir.path().join("annal.db")).await?;
    let raw_path = dir.path().join("raw.db");
    SqliteEventStore::open(&raw_path).await?.close().await;
    let raw_sqlite = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&raw_path)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full),
        )
        .await?;
    for shape in [(1, 1), (4, 1), (1, 50)].map(|(writers, batch)| Shape { writers, batch }) {
        let (raw, annal) = alternate(
            &Target::RawSqlite(raw_sqlite.clone()),
            &Target::AnnalSqlite(sqlite_store.clone()),
            shape,
            duration,
            rounds,
        )
        .await?;
        rows.push(Row {
            name: format!("SQLite append, {} writers, {}-event batches", shape.writers, shape.batch),
            baseline_name: "raw INSERT",
            baseline: raw,
            value: annal,
        });
    }

    println!("\n| measurement | baseline | baseline events/s | events/s | ratio |");
    println!("|---|---|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} |",
            row.name,
            row.baseline_name,
            row.baseline,
            row.value,
            row.value / row.baseline
        );
    }
    Ok(())
}

async fn print_machine(admin: &PgPool) -> anyhow::Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(admin).await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(admin).await?;
    let sync_commit: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(admin).await?;
    println!("machine: {cores} cores, {cpu}; PostgreSQL {version} (fsync={fsync}, synchronous_commit={sync_commit})");
    Ok(())
}

async fn schema_pool(admin: &PgPool, url: &str, schema: &str) -> anyhow::Result<PgPool> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};")))
        .execute(admin)
        .await?;
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    Ok(PgPoolOptions::new().max_connections(24).connect_with(options).await?)
}

/// Runs `a` and `b` for `rounds` rounds each, alternating which goes first; returns each one's
/// mean events per second.
async fn alternate(
    a: &Target,
    b: &Target,
    shape: Shape,
    duration: Duration,
    rounds: u32,
) -> anyhow::Result<(f64, f64)> {
    let (mut sum_a, mut sum_b) = (0.0, 0.0);
    for round in 0..rounds {
        if round % 2 == 0 {
            sum_a += run(a, shape, duration).await?;
            sum_b += run(b, shape, duration).await?;
        } else {
            sum_b += run(b, shape, duration).await?;
            sum_a += run(a, shape, duration).await?;
        }
    }
    Ok((sum_a / f64::from(rounds), sum_b / f64::from(rounds)))
}

/// `writers` tasks append to their own fresh streams for `duration`; returns events per second.
async fn run(target: &Target, shape: Shape, duration: Duration) -> anyhow::Result<f64> {
    let run_id = Uuid::now_v7().simple().to_string();
    let start = Arc::new(tokio::sync::Barrier::new(shape.writers + 1));
    let tasks: Vec<_> = (0..shape.writers)
        .map(|w| {
            let (target, start) = (target.clone(), start.clone());
            let stream = StreamName::new(format!("bench-{run_id}{w}")).expect("valid name");
            tokio::spawn(async move {
                start.wait().await;
                let deadline = Instant::now() + duration;
                let mut written = 0u64;
                while Instant::now() < deadline {
                    append(&target, &stream, written, shape.batch).await?;
                    written += shape.batch as u64;
                }
                anyhow::Ok(written)
            })
        })
        .collect();
    start.wait().await;
    let began = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / began.elapsed().as_secs_f64())
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            NewEvent::new("Deposited", json!({ "amount": 42 + i, "currency": "EUR", "note": "benchmark payload" }))
                .with_metadata(annal_eventstore::Metadata::default().with_correlation_id(Uuid::now_v7()))
        })
        .collect()
}

const RAW_INSERT: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::jsonb[], $8::jsonb[])";
const RAW_INSERT_NOTIFY: &str = "WITH ins AS (INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::jsonb[], $8::jsonb[]) RETURNING 1) \
    SELECT pg_notify('bench', '') FROM ins LIMIT 1";

async fn append(target: &Target, stream: &StreamName, version: u64, batch: usize) -> anyhow::Result<()> {
    let events = events(batch);
    let expected = if version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(version - 1) };
    match target {
        Target::Annal(store) => {
            store.append(stream, expected, events).await?;
        }
        Target::AnnalSqlite(store) => {
            store.append(stream, expected, events).await?;
        }
        Target::Raw(pool) | Target::RawNotifyInTransaction(pool) => {
            let sql = if matches!(target, Target::Raw(_)) { RAW_INSERT } else { RAW_INSERT_NOTIFY };
            let n = events.len();
            sqlx::query(sql)
                .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
                .bind(vec![stream.as_str(); n])
                .bind(vec![stream.category(); n])
                .bind((0..n as i64).map(|i| version as i64 + i).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
                .bind(vec![1i32; n])
                .bind(events.iter().map(|e| e.data.clone()).collect::<Vec<_>>())
                .bind(events.iter().map(|e| serde_json::to_value(&e.metadata)).collect::<Result<Vec<_>, _>>()?)
                .execute(pool)
                .await?;
        }
        Target::RawSqlite(pool) => {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, recorded_at) ",
            );
            let now = 0i64;
            q.push_values(events.iter().enumerate(), |mut row, (i, e)| {
                row.push_bind(e.id)
                    .push_bind(stream.as_str())
                    .push_bind(stream.category())
                    .push_bind(version as i64 + i as i64)
                    .push_bind(e.event_type.as_str())
                    .push_bind(1i64)
                    .push_bind(e.data.to_string())
                    .push_bind(serde_json::to_string(&e.metadata).unwrap_or_default())
                    .push_bind(now);
            });
            q.build().execute(pool).await?;
        }
    }
    Ok(())
}
