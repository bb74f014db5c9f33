//! Appends: Annal against raw SQL inserts of the same rows into a table made by the same
//! migration, at several concurrencies and batch sizes; large batches against `COPY`; and what
//! the cross-process wake-up costs. Raw and Annal alternate in rounds, each side first in turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, PgEventStore, SqliteEventStore, StreamName};
use sqlx::postgres::{PgPool, PgPoolCopyExt};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::Plan;
use crate::charts::Throughput;
use crate::db::{drop_schema, events, run_id, schema_pool};
use crate::report::{Better, Measurement};

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
    /// `COPY ... FROM STDIN` of the same rows into an identical table.
    RawCopy(PgPool),
    /// `SqliteEventStore::append`.
    AnnalSqlite(SqliteEventStore),
    /// Plain `INSERT`s into an identical SQLite table.
    RawSqlite(SqlitePool),
}

/// The PostgreSQL stores of the append suites: Annal in one schema, the baseline's table made by
/// the very same migration in another (identical columns, keys, indexes).
async fn stores(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<(PgEventStore, PgPool)> {
    let annal_pool = schema_pool(admin, url, "bench_annal", 24).await?;
    let raw_pool = schema_pool(admin, url, "bench_raw", 24).await?;
    PgEventStore::migrate(&raw_pool).await?;
    Ok((PgEventStore::from_pool(annal_pool).await?.with_group_commit(plan.group_commit), raw_pool))
}

/// PostgreSQL appends at 1, 4 and 16 writers and in 50-event batches, and the wake-up costs.
pub(crate) async fn postgres(
    admin: &PgPool,
    url: &str,
    plan: Plan,
) -> anyhow::Result<(Vec<Measurement>, Vec<Throughput>)> {
    let (store, raw_pool) = stores(admin, url, plan).await?;
    let mut rows = Vec::new();
    let mut throughput = Vec::new();
    let shapes = [(1, 1), (4, 1), (16, 1), (1, 50), (4, 50)].map(|(writers, batch)| Shape { writers, batch });
    for shape in shapes {
        let (raw, annal) =
            alternate(&Target::Raw(raw_pool.clone()), &Target::Annal(store.clone()), shape, plan).await?;
        throughput.push(Throughput { writers: shape.writers, batch: shape.batch, raw: raw.rate, annal: annal.rate });
        rows.push(
            Measurement::against(
                format!("PostgreSQL append, {} writers, {}-event batches", shape.writers, shape.batch),
                annal.rate,
                "events/s",
                Better::Higher,
                "raw INSERT",
                raw.rate,
            )
            .ratio_at_least(0.9)
            .note(cpu_note(annal, raw, "raw")),
        );
    }
    // Group commit (as configured, or the default one when off) against each append alone, same
    // store and pool, alternating in rounds.
    let alone = store.clone().with_group_commit(None);
    let grouped = store.clone().with_group_commit(Some(store.group_commit().unwrap_or_default()));
    for writers in [4, 16] {
        let shape = Shape { writers, batch: 1 };
        let (without, with) =
            alternate(&Target::Annal(alone.clone()), &Target::Annal(grouped.clone()), shape, plan).await?;
        rows.push(
            Measurement::against(
                format!("PostgreSQL append, {writers} writers, 1-event batches, group commit against each alone"),
                with.rate,
                "events/s",
                Better::Higher,
                "Annal without group commit",
                without.rate,
            )
            .note(format!("{:?}; {}", grouped.group_commit(), cpu_note(with, without, "alone"))),
        );
    }
    // What the cross-process wake-up costs, and what the naive one would cost.
    let shape = Shape { writers: 16, batch: 1 };
    let quiet = store.clone().notify_other_processes(false);
    let (without, with) = alternate(&Target::Annal(quiet.clone()), &Target::Annal(store.clone()), shape, plan).await?;
    quiet.notify_other_processes(true);
    rows.push(Measurement::against(
        "PostgreSQL append, 16 writers, with coalesced NOTIFY after commit",
        with.rate,
        "events/s",
        Better::Higher,
        "Annal without NOTIFY",
        without.rate,
    ));
    let (raw, naive) =
        alternate(&Target::Raw(raw_pool.clone()), &Target::RawNotifyInTransaction(raw_pool.clone()), shape, plan)
            .await?;
    rows.push(Measurement::against(
        "raw INSERT + pg_notify in the same transaction, 16 writers",
        naive.rate,
        "events/s",
        Better::Higher,
        "raw INSERT",
        raw.rate,
    ));
    store.close().await;
    raw_pool.close().await;
    drop_schema(admin, "bench_annal").await?;
    drop_schema(admin, "bench_raw").await?;
    Ok((rows, throughput))
}

/// The store has no bulk-import API: a large import is appends of large batches. This measures
/// one writer appending 1000-event batches against `COPY` of the same rows, 1000 per `COPY`.
pub(crate) async fn bulk(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let (store, raw_pool) = stores(admin, url, plan).await?;
    let shape = Shape { writers: 1, batch: 1000 };
    let plan = Plan { duration: plan.duration * 2, ..plan };
    let (copy, annal) =
        alternate(&Target::RawCopy(raw_pool.clone()), &Target::Annal(store.clone()), shape, plan).await?;
    store.close().await;
    raw_pool.close().await;
    drop_schema(admin, "bench_annal").await?;
    drop_schema(admin, "bench_raw").await?;
    Ok(vec![
        Measurement::against(
            "PostgreSQL bulk import: append in 1000-event batches vs COPY",
            annal.rate,
            "events/s",
            Better::Higher,
            "raw COPY (1000 rows each)",
            copy.rate,
        )
        .ratio_at_least(0.8)
        .note(cpu_note(annal, copy, "COPY")),
    ])
}

/// SQLite, embedded: Annal against raw inserts into an identical table (same migration) in
/// another file with the same settings.
pub(crate) async fn sqlite(plan: Plan) -> anyhow::Result<Vec<Measurement>> {
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
    let mut rows = Vec::new();
    for shape in [(1, 1), (4, 1), (1, 50)].map(|(writers, batch)| Shape { writers, batch }) {
        let (raw, annal) =
            alternate(&Target::RawSqlite(raw_sqlite.clone()), &Target::AnnalSqlite(sqlite_store.clone()), shape, plan)
                .await?;
        rows.push(
            Measurement::against(
                format!("SQLite append, {} writers, {}-event batches", shape.writers, shape.batch),
                annal.rate,
                "events/s",
                Better::Higher,
                "raw INSERT",
                raw.rate,
            )
            // Embedded: all of SQLite's work is in this process.
            .note(cpu_note(Side { server_us: None, ..annal }, Side { server_us: None, ..raw }, "raw")),
        );
    }
    sqlite_store.close().await;
    raw_sqlite.close().await;
    Ok(rows)
}

/// One side's figures: events per second, and CPU per event in this process (the client) and
/// in the server.
#[derive(Clone, Copy, Debug, Default)]
struct Side {
    rate: f64,
    client_us: f64,
    server_us: Option<f64>,
}

impl Side {
    fn add(&mut self, other: Side) {
        self.rate += other.rate;
        self.client_us += other.client_us;
        self.server_us = other.server_us.map(|us| us + self.server_us.unwrap_or_default());
    }

    fn mean(self, rounds: u32) -> Side {
        let n = f64::from(rounds);
        Side { rate: self.rate / n, client_us: self.client_us / n, server_us: self.server_us.map(|us| us / n) }
    }

    /// "client 12 µs + server 80 µs of CPU per event".
    fn cpu(&self) -> String {
        match self.server_us {
            Some(server) => format!("client {:.0} µs + server {server:.0} µs", self.client_us),
            None => format!("{:.0} µs", self.client_us),
        }
    }
}

/// "CPU per event: Annal ..., raw ...": where the time goes, on a machine where client and server
/// share two cores.
fn cpu_note(annal: Side, raw: Side, baseline: &str) -> String {
    format!("CPU per event: Annal {}, {baseline} {}", annal.cpu(), raw.cpu())
}

/// Runs `a` and `b` for `plan.rounds` rounds each, alternating which goes first; returns each
/// one's mean figures.
async fn alternate(a: &Target, b: &Target, shape: Shape, plan: Plan) -> anyhow::Result<(Side, Side)> {
    let (mut sum_a, mut sum_b) = (Side::default(), Side::default());
    for round in 0..plan.rounds {
        if round % 2 == 0 {
            sum_a.add(run(a, shape, plan.duration).await?);
            sum_b.add(run(b, shape, plan.duration).await?);
        } else {
            sum_b.add(run(b, shape, plan.duration).await?);
            sum_a.add(run(a, shape, plan.duration).await?);
        }
    }
    Ok((sum_a.mean(plan.rounds), sum_b.mean(plan.rounds)))
}

/// `writers` tasks append to their own fresh streams for `duration`.
async fn run(target: &Target, shape: Shape, duration: Duration) -> anyhow::Result<Side> {
    let run_id = run_id();
    let start = Arc::new(tokio::sync::Barrier::new(shape.writers + 1));
    let mut tasks = Vec::new();
    for w in 0..shape.writers {
        let (target, start) = (target.clone(), start.clone());
        let stream = StreamName::new(format!("bench-{run_id}{w}"))?;
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let deadline = Instant::now() + duration;
            let mut written = 0u64;
            while Instant::now() < deadline {
                append(&target, &stream, written, shape.batch).await?;
                written += shape.batch as u64;
            }
            anyhow::Ok(written)
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let (client, server) = crate::cpu::used();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let seconds = began.elapsed().as_secs_f64();
    let (client_after, server_after) = crate::cpu::used();
    let per_event = |cpu: f64| cpu * 1e6 / total.max(1) as f64;
    Ok(Side {
        rate: total as f64 / seconds,
        client_us: per_event(client_after - client),
        server_us: server.zip(server_after).map(|(before, after)| per_event(after - before)),
    })
}

pub(crate) const RAW_INSERT: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::jsonb[], $8::jsonb[])";
const RAW_INSERT_NOTIFY: &str = "WITH ins AS (INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::jsonb[], $8::jsonb[]) RETURNING 1) \
    SELECT pg_notify('bench', '') FROM ins LIMIT 1";
const RAW_COPY: &str =
    "COPY annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) FROM STDIN";

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
        Target::RawCopy(pool) => {
            let data = copy_rows(stream, version, &events)?;
            let mut copy = pool.copy_in_raw(RAW_COPY).await?;
            copy.send(data.into_bytes()).await?;
            copy.finish().await?;
        }
        Target::RawSqlite(pool) => {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, recorded_at) ",
            );
            let now = 0i64;
            let metadata = events.iter().map(|e| serde_json::to_string(&e.metadata)).collect::<Result<Vec<_>, _>>()?;
            q.push_values(events.iter().zip(metadata).enumerate(), |mut row, (i, (e, metadata))| {
                row.push_bind(e.id)
                    .push_bind(stream.as_str())
                    .push_bind(stream.category())
                    .push_bind(version as i64 + i as i64)
                    .push_bind(e.event_type.as_str())
                    .push_bind(1i64)
                    .push_bind(e.data.to_string())
                    .push_bind(metadata)
                    .push_bind(now);
            });
            q.build().execute(pool).await?;
        }
    }
    Ok(())
}

/// The rows in `COPY`'s text format: tab-separated, with backslash, tab and line breaks escaped.
fn copy_rows(stream: &StreamName, version: u64, events: &[NewEvent]) -> anyhow::Result<String> {
    fn escape(out: &mut String, text: &str) {
        for c in text.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
    }
    let mut out = String::with_capacity(events.len() * 256);
    for (i, e) in events.iter().enumerate() {
        let fields = [
            e.id.to_string(),
            stream.as_str().to_owned(),
            stream.category().to_owned(),
            (version + i as u64).to_string(),
            e.event_type.clone(),
            e.schema_version.to_string(),
            e.data.to_string(),
            serde_json::to_string(&e.metadata)?,
        ];
        for (n, field) in fields.iter().enumerate() {
            if n > 0 {
                out.push('\t');
            }
            escape(&mut out, field);
        }
        out.push('\n');
    }
    Ok(out)
}
