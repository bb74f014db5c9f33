//! Catch-up reads: a subscription from the start over a long log (1M events of about 300 bytes,
//! 200k under `--quick`), events decoded to `RecordedEvent`, against the same rows read by a
//! plain keyset query through sqlx in the same run, page by page of the subscription's default
//! size; then the same subscription in pages of 4096. The figure a new projection or a rebuild
//! lives on.

use std::time::Instant;

use annal_eventstore::{
    DEFAULT_PAGE_SIZE, EventStore, ExpectedVersion, Filter, NewEvent, PgEventStore, Position, SqliteEventStore,
    StreamName, SubscriptionOptions,
};
use futures::StreamExt;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use crate::Plan;
use crate::db::{drop_schema, schema_pool};
use crate::report::{Better, Measurement};

/// Events per append while filling the log.
const BATCH: usize = 1000;

fn events_to_store(plan: Plan) -> u64 {
    if plan.quick { 200_000 } else { 1_000_000 }
}

/// About 300 bytes of JSON per event.
fn batch() -> Vec<NewEvent> {
    let pad = "x".repeat(267);
    (0..BATCH).map(|i| NewEvent::new("Incremented", serde_json::json!({ "by": i, "pad": pad }))).collect()
}

async fn fill<S: EventStore>(store: &S, n: u64) -> anyhow::Result<()> {
    for chunk in 0..n / BATCH as u64 {
        let stream = StreamName::new(format!("counter-{chunk}"))?;
        store.append(&stream, ExpectedVersion::NoStream, batch()).await?;
    }
    Ok(())
}

/// Pages of the second subscription measured: would larger pages while catching up pay?
const LARGE_PAGE: usize = 4096;

/// Events/s of a subscription from the start, in pages of `page_size`, until it has delivered
/// `n` events.
async fn subscribe<S: EventStore>(store: &S, n: u64, page_size: usize) -> anyhow::Result<f64> {
    let began = Instant::now();
    let mut events =
        store.subscribe_with(Position::START, Filter::all(), SubscriptionOptions::default().page_size(page_size));
    let (mut seen, mut bytes) = (0u64, 0usize);
    while seen < n {
        let event = events.next().await.ok_or_else(|| anyhow::anyhow!("the subscription ended"))??;
        bytes += event.stream.as_str().len();
        seen += 1;
    }
    anyhow::ensure!(bytes > 0, "no event was read");
    Ok(n as f64 / began.elapsed().as_secs_f64())
}

/// A page of the keyset baseline: the columns a `RecordedEvent` is made of.
type PgRow = (i64, i64, uuid::Uuid, String, i64, String, i32, String, String, chrono::DateTime<chrono::Utc>);
type SqliteRow = (i64, uuid::Uuid, String, i64, String, i64, String, String, i64);

pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let n = events_to_store(plan);
    let pool = schema_pool(admin, url, "bench_catchup", 4).await?;
    let store = PgEventStore::from_pool(pool.clone()).await?;
    fill(&store, n).await?;
    sqlx::query("VACUUM ANALYZE annal_events").execute(&pool).await?;
    let keyset = || async {
        let began = Instant::now();
        let (mut from, mut seen) = ((0i64, 0i64), 0u64);
        loop {
            let rows: Vec<PgRow> = sqlx::query_as(
                "SELECT tx_id, seq, event_id, stream, version, event_type, schema_version, data::text, metadata::text, \
                 recorded_at FROM annal_events WHERE (tx_id, seq) > ($1, $2) ORDER BY tx_id, seq LIMIT $3",
            )
            .bind(from.0)
            .bind(from.1)
            .bind(DEFAULT_PAGE_SIZE as i64)
            .fetch_all(&pool)
            .await?;
            let Some(last) = rows.last() else { break };
            from = (last.0, last.1);
            for row in &rows {
                let _: serde_json::Value = serde_json::from_str(&row.7)?;
            }
            seen += rows.len() as u64;
        }
        anyhow::ensure!(seen == n, "the keyset read saw {seen} of {n} events");
        anyhow::Ok(n as f64 / began.elapsed().as_secs_f64())
    };
    let raw = keyset().await?;
    let annal = subscribe(&store, n, DEFAULT_PAGE_SIZE).await?;
    let large = subscribe(&store, n, LARGE_PAGE).await?;
    store.close().await;
    drop_schema(admin, "bench_catchup").await?;
    Ok(measurements("PostgreSQL", n, (annal, large, raw), "; goal also ≥ 300,000 events/s"))
}

pub(crate) async fn sqlite(plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let n = events_to_store(plan);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("catchup.db");
    let store = SqliteEventStore::open(&path).await?;
    fill(&store, n).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(&path).read_only(true))
        .await?;
    let began = Instant::now();
    let (mut from, mut seen) = (0i64, 0u64);
    loop {
        let rows: Vec<SqliteRow> = sqlx::query_as(
            "SELECT position, event_id, stream, version, event_type, schema_version, data, metadata, recorded_at \
             FROM annal_events WHERE position > ? ORDER BY position LIMIT ?",
        )
        .bind(from)
        .bind(DEFAULT_PAGE_SIZE as i64)
        .fetch_all(&pool)
        .await?;
        let Some(last) = rows.last() else { break };
        from = last.0;
        for row in &rows {
            let _: serde_json::Value = serde_json::from_str(&row.6)?;
        }
        seen += rows.len() as u64;
    }
    anyhow::ensure!(seen == n, "the keyset read saw {seen} of {n} events");
    let raw = n as f64 / began.elapsed().as_secs_f64();
    let annal = subscribe(&store, n, DEFAULT_PAGE_SIZE).await?;
    let large = subscribe(&store, n, LARGE_PAGE).await?;
    store.close().await;
    pool.close().await;
    Ok(measurements("SQLite", n, (annal, large, raw), ""))
}

/// A backend's two figures against its keyset read `raw`: the subscription in default pages
/// (judged against the goal) and in pages of [`LARGE_PAGE`].
fn measurements(backend: &str, n: u64, (annal, large, raw): (f64, f64, f64), goal: &str) -> Vec<Measurement> {
    vec![
        Measurement::against(
            format!("{backend} catch-up subscription from the start, {n} events"),
            annal,
            "events/s",
            Better::Higher,
            "keyset query through sqlx",
            raw,
        )
        .ratio_at_least(0.9)
        .note(format!("pages of {DEFAULT_PAGE_SIZE}; ~300-byte events{goal}")),
        Measurement::against(
            format!("{backend} catch-up subscription from the start in pages of {LARGE_PAGE}, {n} events"),
            large,
            "events/s",
            Better::Higher,
            &format!("keyset query through sqlx (pages of {DEFAULT_PAGE_SIZE})"),
            raw,
        )
        .note("would larger pages while catching up pay?"),
    ]
}
