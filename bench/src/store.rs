//! The store's own costs that no baseline shares: an idempotent retry of a big batch against its
//! original append (same run, same store), and how fast a subscriber in another process hears
//! of an append (PostgreSQL's coalesced `NOTIFY`; SQLite's poll interval).

use std::time::{Duration, Instant};

use annal_eventstore::{
    EventStore, ExpectedVersion, Filter, MemoryEventStore, PgEventStore, Position, SqliteEventStore, StreamName,
    SubscriptionOptions,
};
use futures::StreamExt;
use sqlx::PgPool;

use crate::Plan;
use crate::db::{drop_schema, events, run_id, schema_pool};
use crate::latency::Latencies;
use crate::report::{Better, Measurement};

/// The store suite on every backend.
pub(crate) async fn all(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let batch = if plan.quick { 20_000 } else { 100_000 };
    let mut rows = Vec::new();
    let pg = PgEventStore::from_pool(schema_pool(admin, url, "bench_store", 8).await?).await?;
    rows.push(retry("PostgreSQL", &pg, batch).await?);
    let dir = tempfile::tempdir()?;
    let sqlite = SqliteEventStore::open(dir.path().join("store.db")).await?;
    rows.push(retry("SQLite", &sqlite, batch).await?);
    let memory = MemoryEventStore::new();
    rows.push(retry("memory", &memory, batch).await?);
    rows.push(blocked_writer(&memory, batch).await?);

    let appends = if plan.quick { 50 } else { 300 };
    let other = PgEventStore::from_pool(schema_pool_again(url, "bench_store").await?).await?;
    rows.push(wakeup("PostgreSQL, another process (NOTIFY)", &pg, &other, appends, Duration::from_secs(3600)).await?);
    let other = SqliteEventStore::open(dir.path().join("store.db")).await?;
    let poll = Duration::from_millis(100);
    rows.push(wakeup("SQLite, another process (poll interval 100 ms)", &sqlite, &other, appends / 5, poll).await?);
    pg.close().await;
    drop_schema(admin, "bench_store").await?;
    Ok(rows)
}

/// A second pool on a schema `schema_pool` made: a store on it is another process's store.
async fn schema_pool_again(url: &str, schema: &str) -> anyhow::Result<PgPool> {
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    Ok(sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(options).await?)
}

/// Appends a `batch`-event batch, then the same batch again (an idempotent retry).
async fn retry<S: EventStore>(backend: &str, store: &S, batch: usize) -> anyhow::Result<Measurement> {
    let stream = StreamName::new(format!("retry-{}", run_id()))?;
    let events = events(batch);
    let started = Instant::now();
    store.append(&stream, ExpectedVersion::NoStream, events.clone()).await?;
    let original = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let again = store.append(&stream, ExpectedVersion::NoStream, events).await?;
    let retried = started.elapsed().as_secs_f64();
    anyhow::ensure!(again.already_written, "the retry wrote something");
    Ok(Measurement::against(
        format!("{backend}: idempotent retry of a {batch}-event batch"),
        retried,
        "s",
        Better::Lower,
        "the original append",
        original,
    )
    .ratio_at_most(1.0)
    .note("a retry costs O(n): checking the batch and finding its ids, no more than writing it"))
}

/// How long a one-event append to another stream waits while the memory store answers a retry
/// of a big batch (it holds its write lock for that long).
async fn blocked_writer(store: &MemoryEventStore, batch: usize) -> anyhow::Result<Measurement> {
    let stream = StreamName::new(format!("block-{}", run_id()))?;
    let events = events(batch);
    store.append(&stream, ExpectedVersion::NoStream, events.clone()).await?;
    let retry = {
        let (store, stream) = (store.clone(), stream.clone());
        tokio::spawn(async move { store.append(&stream, ExpectedVersion::NoStream, events).await })
    };
    let mut worst = Duration::ZERO;
    while !retry.is_finished() {
        let started = Instant::now();
        store
            .append(&StreamName::new(format!("other-{}", run_id()))?, ExpectedVersion::NoStream, crate::db::events(1))
            .await?;
        worst = worst.max(started.elapsed());
        tokio::task::yield_now().await;
    }
    retry.await??;
    Ok(Measurement::new(
        format!("memory: longest wait of a writer during a {batch}-event retry"),
        worst.as_secs_f64() * 1000.0,
        "ms",
        Better::Lower,
    )
    .below(100.0))
}

/// Appends through `writer` one event at a time, `pace` apart, and measures when a subscriber
/// of `reader` (another store on the same database or file, as in another process), idle and
/// waiting, receives each.
async fn wakeup<S: EventStore, R: EventStore + Clone + 'static>(
    name: &str,
    writer: &S,
    reader: &R,
    appends: usize,
    poll: Duration,
) -> anyhow::Result<Measurement> {
    let category = format!("wake{}", run_id());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = {
        let (reader, category) = (reader.clone(), category.clone());
        tokio::spawn(async move {
            let options = SubscriptionOptions::default().poll_interval(poll);
            let mut sub = reader.subscribe_with(Position::START, Filter::categories([category]), options);
            while let Some(Ok(event)) = sub.next().await {
                if seen_tx.send((event.stream, Instant::now())).is_err() {
                    return;
                }
            }
        })
    };
    let patience = poll + Duration::from_secs(30);
    // Warm-up: until the subscriber hears an append at once, its store may not be listening.
    for n in 0.. {
        anyhow::ensure!(n < 100, "{name}: the subscriber never heard an append within a second");
        let stream = StreamName::from_parts(&category, format!("warm{n}"))?;
        writer.append(&stream, ExpectedVersion::NoStream, events(1)).await?;
        if tokio::time::timeout(poll.min(Duration::from_secs(1)), seen.recv()).await.is_ok() {
            // Take the warm-ups that were heard late, up to this one.
            while seen.try_recv().is_ok() {}
            break;
        }
    }
    let pace = (poll / 3).min(Duration::from_millis(20));
    let mut latencies = Latencies::new()?;
    for n in 0..appends {
        // The workload's pace, so that the subscriber is idle when each append lands.
        tokio::time::sleep(pace).await;
        let stream = StreamName::from_parts(&category, n)?;
        let appended = Instant::now();
        writer.append(&stream, ExpectedVersion::NoStream, events(1)).await?;
        loop {
            let (got, at) = tokio::time::timeout(patience, seen.recv())
                .await
                .map_err(|_| anyhow::anyhow!("{name}: the subscriber heard nothing"))?
                .ok_or_else(|| anyhow::anyhow!("{name}: the subscription ended"))?;
            if got == stream {
                latencies.record(appended, at);
                break;
            }
        }
    }
    subscriber.abort();
    Ok(Measurement::new(format!("wake-up, {name}: append to delivery, p50"), latencies.ms(0.5), "ms", Better::Lower)
        .note(format!("p99 {:.2} ms, max {:.2} ms over {appends} appends", latencies.ms(0.99), latencies.max_ms())))
}
