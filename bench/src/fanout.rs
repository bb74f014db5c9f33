//! Fan-out: one writer at a modest fixed rate, followed by 1 and then by 500 concurrent
//! subscriptions in this process (each through `EventStore::subscribe`); the delivery latency of
//! every event to every subscription, from the moment the writer gets the append's reply to
//! the moment the subscription yields it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, Filter, PgEventStore, StreamName};
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

pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<(Vec<Measurement>, Vec<Curve>)> {
    // The default pool size of `PgEventStore::connect`: subscriptions share it.
    let pool = schema_pool(admin, url, "bench_fanout", 10).await?;
    let store = PgEventStore::from_pool(pool).await?;
    let one = measure(&store, 1, plan).await?;
    let many = measure(&store, MANY, plan).await?;
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
    ];
    let curves = vec![one.curve("1 subscription"), many.curve(format!("{MANY} subscriptions"))];
    Ok((measurements, curves))
}

async fn measure(store: &PgEventStore, subscriptions: usize, plan: Plan) -> anyhow::Result<Latencies> {
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
    let mut latencies = Latencies::new()?;
    for task in tasks {
        let seen = task.await??;
        let one = Latencies::join(&committed, seen)?;
        latencies.merge(&one)?;
    }
    Ok(latencies)
}
