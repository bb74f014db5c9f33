//! Fan-out: one writer at a modest fixed rate, followed by 1 and then by 500 concurrent
//! subscriptions in this process (each through `EventStore::subscribe`); the delivery latency of
//! every event to every subscription, from the moment the writer gets the append's reply to
//! the moment the subscription yields it. Then the same writer followed by 1 and by 50
//! projections in one runner, counting the log reads: projection workers follow the log
//! through the same follower and shared tail as subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use annal_eventstore::{
    AppendResult, Direction, EventStore, ExpectedVersion, Filter, NewEvent, Page, PgEventStore, Position,
    RecordedEvent, StreamName, Wakeup,
};
use annal_projections::{MemoryProjectionStore, Projection, ProjectionRunner, Tx, WorkerOptions};
use async_trait::async_trait;
use futures::StreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use crate::Plan;
use crate::db::{drop_schema, run_id, schema_pool};
use crate::latency::{Curve, Latencies};
use crate::report::{Better, Measurement};

/// Events per second the writer appends.
const RATE: u32 = 50;
/// The many subscriptions.
const MANY: usize = 500;
/// The many projections.
const MANY_PROJECTIONS: usize = 50;

/// The store, counting the subscriptions' reads of the log: where fan-out's time goes.
struct Counted {
    inner: PgEventStore,
    reads: AtomicU64,
    empty: AtomicU64,
}

#[async_trait]
impl EventStore for Counted {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> annal_eventstore::Result<AppendResult> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> annal_eventstore::Result<Vec<RecordedEvent>> {
        self.inner.read_stream_page(stream, direction, from, limit).await
    }

    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> annal_eventstore::Result<Page> {
        let page = self.inner.read_all_page(from, filter, limit).await?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        if page.events.is_empty() {
            self.empty.fetch_add(1, Ordering::Relaxed);
        }
        Ok(page)
    }

    async fn read_event(&self, id: uuid::Uuid) -> annal_eventstore::Result<Option<RecordedEvent>> {
        self.inner.read_event(id).await
    }
    async fn head(&self) -> annal_eventstore::Result<Position> {
        self.inner.head().await
    }

    fn wakeup(&self) -> Wakeup {
        self.inner.wakeup()
    }
}

/// One fan-out run's figures.
struct Fanout {
    latencies: Latencies,
    /// Reads of the log per event delivered to one subscription.
    reads_per_delivery: f64,
    /// The share of those reads that found nothing.
    empty: f64,
}

pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<(Vec<Measurement>, Vec<Curve>)> {
    // The default pool size of `PgEventStore::connect`: subscriptions share it.
    let pool = schema_pool(admin, url, "bench_fanout", 10).await?;
    let store = PgEventStore::from_pool(pool).await?;
    let one = measure(&store, 1, plan).await?;
    let many = measure(&store, MANY, plan).await?;
    let one_projection = projection_reads(&store, 1, plan).await?;
    let many_projections = projection_reads(&store, MANY_PROJECTIONS, plan).await?;
    let (one_reads, many_reads, many_empty) = (one.reads_per_delivery, many.reads_per_delivery, many.empty);
    let (one, many) = (one.latencies, many.latencies);
    store.close().await;
    drop_schema(admin, "bench_fanout").await?;
    let note = format!("1 writer at {RATE} events/s for {} s", plan.fanout_duration.as_secs());
    let measurements = vec![
        Measurement::against(
            format!("fan-out delivery p50, {MANY} subscriptions"),
            many.ms(0.5),
            "ms",
            Better::Lower,
            "1 subscription",
            one.ms(0.5),
        )
        .note(note.clone()),
        Measurement::against(
            format!("fan-out delivery p99, {MANY} subscriptions"),
            many.ms(0.99),
            "ms",
            Better::Lower,
            "1 subscription",
            one.ms(0.99),
        )
        .note(note),
        Measurement::new(
            format!("fan-out: p99 added by {MANY} subscriptions"),
            many.ms(0.99) - one.ms(0.99),
            "ms",
            Better::Lower,
        )
        .below(5.0),
        Measurement::against(
            format!("fan-out: log reads per delivered event, {MANY} subscriptions"),
            many_reads,
            "reads",
            Better::Lower,
            "1 subscription",
            one_reads,
        )
        .note(format!("{:.0}% of them found nothing new", 100.0 * many_empty)),
        Measurement::against(
            format!("fan-out: log reads per appended event, {MANY_PROJECTIONS} projections"),
            many_projections,
            "reads",
            Better::Lower,
            "1 projection",
            one_projection,
        )
        .note(format!(
            "1 writer at {RATE} events/s for {} s; one wake-up per event; checkpoints in memory",
            (plan.fanout_duration / 2).as_secs()
        )),
    ];
    let curves = vec![one.curve("1 subscription"), many.curve(format!("{MANY} subscriptions"))];
    Ok((measurements, curves))
}

async fn measure(store: &PgEventStore, subscriptions: usize, plan: Plan) -> anyhow::Result<Fanout> {
    let store = Arc::new(Counted { inner: store.clone(), reads: AtomicU64::new(0), empty: AtomicU64::new(0) });
    let from = store.head().await?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(subscriptions);
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(subscriptions);
    for _ in 0..subscriptions {
        let (store, mut stop, ready, received) = (store.clone(), stop.clone(), ready_tx.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut events = store.subscribe(from, Filter::all());
            let mut seen: Vec<(Uuid, Instant)> = Vec::new();
            let mut warm = false;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    next = events.next() => match next {
                        Some(Ok(event)) => {
                            let at = Instant::now();
                            if warm {
                                seen.push((event.id, at));
                                received.fetch_add(1, Ordering::Relaxed);
                            } else {
                                // The warm-up event: this subscription is live.
                                warm = true;
                                let _ = ready.send(()).await;
                            }
                        }
                        Some(Err(error)) => return Err(anyhow::Error::from(error)),
                        None => break,
                    },
                }
            }
            anyhow::Ok(seen)
        }));
    }
    drop(ready_tx);

    let stream = StreamName::new(format!("fanout-{}", run_id()))?;
    store.append(&stream, ExpectedVersion::NoStream, crate::db::events(1)).await?;
    for _ in 0..subscriptions {
        tokio::time::timeout(Duration::from_secs(60), ready.recv()).await?;
    }

    // Reads of the warm-up are not counted.
    let (reads_before, empty_before) = (store.reads.load(Ordering::Relaxed), store.empty.load(Ordering::Relaxed));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    let deadline = Instant::now() + plan.fanout_duration;
    let mut committed = Vec::new();
    let mut version = 0;
    while Instant::now() < deadline {
        tick.tick().await;
        let batch = crate::db::events(1);
        let id = batch[0].id;
        version = store.append(&stream, ExpectedVersion::Exact(version), batch).await?.version;
        committed.push((id, Instant::now()));
    }
    let expected = (committed.len() * subscriptions) as u64;
    let waited = Instant::now();
    while received.load(Ordering::Relaxed) < expected {
        anyhow::ensure!(waited.elapsed() < Duration::from_secs(120), "subscriptions did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(true)?;
    let reads = store.reads.load(Ordering::Relaxed) - reads_before;
    let empty = store.empty.load(Ordering::Relaxed) - empty_before;
    let mut latencies = Latencies::new()?;
    for task in tasks {
        let seen = task.await??;
        let one = Latencies::join(&committed, seen)?;
        latencies.merge(&one)?;
    }
    Ok(Fanout {
        latencies,
        reads_per_delivery: reads as f64 / expected.max(1) as f64,
        empty: empty as f64 / reads.max(1) as f64,
    })
}

/// A projection that does nothing: what is measured is how it follows the log.
struct Idle(String);

#[async_trait]
impl Projection for Idle {
    fn name(&self) -> &str {
        &self.0
    }

    async fn handle(&self, _events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), annal_eventstore::BoxError> {
        Ok(())
    }
}

/// Reads of the log per appended event while `count` projections in one runner follow it live
/// (checkpoints in memory, so that only the log's reads reach the database).
async fn projection_reads(store: &PgEventStore, count: usize, plan: Plan) -> anyhow::Result<f64> {
    let counted = Arc::new(Counted { inner: store.clone(), reads: AtomicU64::new(0), empty: AtomicU64::new(0) });
    let names: Vec<String> = (0..count).map(|i| format!("fanout_{i}")).collect();
    let mut runner = ProjectionRunner::new(counted.clone(), Arc::new(MemoryProjectionStore::new()));
    for name in &names {
        runner = runner.with(Arc::new(Idle(name.clone())), WorkerOptions::default())?;
    }
    let running = runner.start();
    let stream = StreamName::new(format!("fanout-{}", run_id()))?;
    // Warm-up: every projection has caught up with the log and follows its head.
    let mut last = counted.append(&stream, ExpectedVersion::NoStream, crate::db::events(1)).await?;
    for name in &names {
        running.wait_for(name, last.position(), Duration::from_secs(60)).await?;
    }
    let reads_before = counted.reads.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    let deadline = Instant::now() + plan.fanout_duration / 2;
    let mut appended = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        last = counted.append(&stream, ExpectedVersion::Exact(last.version), crate::db::events(1)).await?;
        appended += 1;
    }
    for name in &names {
        running.wait_for(name, last.position(), Duration::from_secs(60)).await?;
    }
    let reads = counted.reads.load(Ordering::Relaxed) - reads_before;
    running.shutdown().await?;
    Ok(reads as f64 / appended.max(1) as f64)
}
