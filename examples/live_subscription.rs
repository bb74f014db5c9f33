//! Several tasks append to their own streams while a subscriber follows the global log live.
//! Prints what the subscriber sees and how long each event took from the append call to
//! delivery.
//!
//! ```text
//! cargo run --example live_subscription            # on SQLite; --short for fewer events
//! DATABASE_URL=postgres://... cargo run --example live_subscription --features postgres
//! ```

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use annal::{ExpectedVersion, Filter, NewEvent, Position, StreamName};
use futures::StreamExt;
use serde_json::json;
use support::Store;

const WRITERS: u64 = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    on_backend!("live_subscription", run)
}

async fn run<S: Store>(store: S, _projections: support::Projections, _db: support::Db) -> anyhow::Result<()> {
    let events_per_writer: u64 = if support::short() { 50 } else { 250 };
    let started = Instant::now();

    // The subscriber starts before any event exists: it catches up (nothing), then follows live.
    let subscriber = tokio::spawn({
        let store = store.clone();
        async move {
            let mut events = store.subscribe(Position::START, Filter::categories(["sensor"]));
            let mut latencies = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut last = Position::START;
            while latencies.len() < (WRITERS * events_per_writer) as usize {
                let event = events.next().await.expect("a subscription does not end")?;
                anyhow::ensure!(seen.insert(event.id), "event {} delivered twice", event.id);
                anyhow::ensure!(event.position > last, "out of order at {}", event.position);
                last = event.position;
                let sent = Duration::from_micros(event.data["sent_us"].as_u64().unwrap_or_default());
                let latency = started.elapsed().saturating_sub(sent);
                if event.version % 50 == 0 {
                    println!(
                        "seen {:>4}: {} v{:<3} at {} after {:.2} ms",
                        latencies.len(),
                        event.stream,
                        event.version,
                        event.position,
                        latency.as_secs_f64() * 1e3
                    );
                }
                latencies.push(latency);
            }
            anyhow::Ok(latencies)
        }
    });

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamName::from_parts("sensor", w)?;
                let mut expected = ExpectedVersion::NoStream;
                for i in 0..events_per_writer {
                    let sent_us = started.elapsed().as_micros() as u64;
                    let event = NewEvent::new("Measured", json!({ "writer": w, "i": i, "sent_us": sent_us }));
                    let written = store.append(&stream, expected, vec![event]).await?;
                    expected = ExpectedVersion::Exact(written.version);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let appended = started.elapsed();
    let latencies = subscriber.await??;
    println!(
        "\n{} events from {WRITERS} concurrent writers in {:.2} s ({:.0} appends/s), all delivered once, in order",
        latencies.len(),
        appended.as_secs_f64(),
        latencies.len() as f64 / appended.as_secs_f64()
    );
    println!("append-to-delivery latency: {}", support::distribution(latencies));
    Ok(())
}
