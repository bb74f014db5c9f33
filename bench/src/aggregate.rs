//! Aggregate load: `Repository::load` of one 10k-event stream, by an aggregate without
//! snapshots (replays all 10,000 events) and by the same aggregate with a snapshot every 1,000
//! events (reads the snapshot at the last event and no events), alternating.

use std::time::Instant;

use annal_eventstore::{
    Aggregate, Decide, Event, EventStore, ExpectedVersion, PgEventStore, Repository, SnapshotPolicy, StreamName,
};
use serde_json::Value;
use sqlx::PgPool;

use crate::Plan;
use crate::db::{drop_schema, schema_pool};
use crate::latency::Latencies;
use crate::report::{Better, Measurement};

const EVENTS: u64 = 10_000;

/// A deposit of some amount.
#[derive(Clone, Debug)]
struct Deposited(i64);

impl Event for Deposited {
    const EVENT_TYPES: &'static [&'static str] = &["Deposited"];

    fn event_type(&self) -> &'static str {
        "Deposited"
    }

    fn schema_version(&self) -> u32 {
        1
    }

    fn to_data(&self) -> annal_eventstore::Result<Value> {
        Ok(serde_json::json!({ "amount": self.0, "currency": "EUR", "note": "benchmark payload" }))
    }

    fn from_stored(_event_type: &str, _schema_version: u32, data: Value) -> annal_eventstore::Result<Self> {
        Ok(Deposited(data["amount"].as_i64().unwrap_or_default()))
    }
}

/// An account's balance, never snapshotted.
#[derive(Default)]
struct Account {
    balance: i64,
}

/// The same account, snapshotted every 1,000 events. Same category, so both load one stream.
#[derive(Default)]
struct SnapshottedAccount {
    balance: i64,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Id = u32;
    type Event = Deposited;
}

impl Aggregate for SnapshottedAccount {
    const CATEGORY: &'static str = "account";
    type Id = u32;
    type Event = Deposited;

    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::every(1000)
    }

    fn to_snapshot(&self) -> annal_eventstore::Result<Value> {
        Ok(serde_json::json!({ "balance": self.balance }))
    }

    fn from_snapshot(snapshot: Value) -> annal_eventstore::Result<Self> {
        Ok(SnapshottedAccount { balance: snapshot["balance"].as_i64().unwrap_or_default() })
    }
}

impl Decide for Account {
    type Command = i64;
    type Error = std::convert::Infallible;

    fn handle(&self, amount: i64) -> Result<Vec<Deposited>, Self::Error> {
        Ok(vec![Deposited(amount)])
    }

    fn apply(&mut self, event: &Deposited) {
        self.balance += event.0;
    }
}

impl Decide for SnapshottedAccount {
    type Command = i64;
    type Error = std::convert::Infallible;

    fn handle(&self, amount: i64) -> Result<Vec<Deposited>, Self::Error> {
        Ok(vec![Deposited(amount)])
    }

    fn apply(&mut self, event: &Deposited) {
        self.balance += event.0;
    }
}

pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let pool = schema_pool(admin, url, "bench_aggregate", 4).await?;
    let store = PgEventStore::from_pool(pool).await?;
    let id = 1;
    let stream = StreamName::from_parts(Account::CATEGORY, id)?;
    // 9,999 events appended directly, the 10,000th through the repository, which writes the
    // snapshot as its policy says.
    let mut version = None;
    for chunk in 0..10 {
        let n = if chunk == 9 { 999 } else { 1000 };
        let batch = (0..n).map(|i| Deposited(i % 100 + 1).to_new_event()).collect::<Result<Vec<_>, _>>()?;
        version = Some(store.append(&stream, ExpectedVersion::from_current(version), batch).await?.version);
    }
    let plain = Repository::<Account, _>::new(store.clone());
    let snapshotted = Repository::<SnapshottedAccount, _>::new(store.clone());
    snapshotted.execute(&id, 7).await?;
    let snapshot = store.load_snapshot(&stream).await?;
    anyhow::ensure!(
        snapshot.is_some_and(|s| s.version == EVENTS - 1),
        "the repository wrote no snapshot at the last event"
    );

    let (mut without, mut with) = (Latencies::new()?, Latencies::new()?);
    for round in 0..plan.aggregate_loads {
        for snap in if round % 2 == 0 { [false, true] } else { [true, false] } {
            let began = Instant::now();
            let balance =
                if snap { snapshotted.load(&id).await?.state.balance } else { plain.load(&id).await?.state.balance };
            let done = Instant::now();
            if snap {
                with.record(began, done)
            } else {
                without.record(began, done)
            }
            anyhow::ensure!(balance > 0, "an empty account was loaded");
        }
    }
    store.close().await;
    drop_schema(admin, "bench_aggregate").await?;
    let note = format!("{} loads each, alternating", plan.aggregate_loads);
    Ok(vec![
        Measurement::against(
            "aggregate load, 10k-event stream, with snapshot, p99",
            with.ms(0.99),
            "ms",
            Better::Lower,
            "without snapshot, p99",
            without.ms(0.99),
        )
        .note(note.clone()),
        Measurement::against(
            "aggregate load, 10k-event stream, with snapshot, p50",
            with.ms(0.5),
            "ms",
            Better::Lower,
            "without snapshot, p50",
            without.ms(0.5),
        )
        .note(note),
    ])
}
