//! A runner frozen with SIGSTOP on SQLite, where no server can end its transaction: two runner
//! processes share a 4-partition projection on one file while a writer appends; one is frozen,
//! again and again, for three lease periods each, sometimes inside a write transaction (a batch
//! or a lease renewal: proven by a probe that cannot take the write lock for two lease periods)
//! and sometimes between batches (then the other runner takes its leases and applies). Resumed,
//! its stale work cannot commit: the read model, kept without a unique key so that an event
//! applied twice would show, equals a replay.
#![cfg(feature = "sqlite")]

use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Executor};

#[path = "support/local.rs"]
mod local;

use local::KillOnDrop;

const PATIENCE: Duration = Duration::from_secs(90);

/// No unique key on `event_id`: an event applied twice is a second row, not a refused batch.
const LEDGER: &str = r#"
[[projection]]
name = "ledger"
categories = ["account"]
partitions = 4
batch_size = 20
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB NOT NULL, account TEXT NOT NULL, amount INTEGER NOT NULL)"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, account, amount) VALUES (:event_id, :stream_id, :data ->> 'amount')"
"#;

fn signal(child: &Child, signal: &str) {
    assert!(Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap().success());
}

async fn ledger(store: &SqliteEventStore) -> (i64, i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT event_id), coalesce(sum(amount), 0) FROM ledger")
        .fetch_one(store.writer())
        .await
        .unwrap()
}

/// Whether some process holds the file's write lock for two lease periods on end: only a frozen
/// one can (every transaction of a running one lasts milliseconds).
async fn write_lock_held(db: &std::path::Path) -> bool {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))
        .unwrap()
        .busy_timeout(Duration::from_secs(2));
    let mut probe = SqliteConnection::connect_with(&options).await.unwrap();
    let held = match probe.execute("BEGIN IMMEDIATE").await {
        Ok(_) => {
            probe.execute("ROLLBACK").await.unwrap();
            false
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("5") => true,
        Err(e) => panic!("probe: {e}"),
    };
    probe.close().await.unwrap();
    held
}

async fn leases_of(store: &SqliteEventStore, pid: u32) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM annal_leases WHERE projection = 'ledger' AND owner LIKE ?1")
        .bind(format!("%:{pid}:%"))
        .fetch_one(store.writer())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_runner_on_sqlite_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let configs: Vec<_> = (0..2)
        .map(|i| {
            let config = dir.path().join(format!("runner{i}.toml"));
            let text = format!(
                "database = \"sqlite://{}\"\nlisten = \"127.0.0.1:{}\"\nlease_seconds = 1.0\n{LEDGER}",
                db.display(),
                local::free_port()
            );
            std::fs::write(&config, text).unwrap();
            config
        })
        .collect();
    let migrate =
        Command::new(env!("CARGO_BIN_EXE_annal-runner")).arg("-c").arg(&configs[0]).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let store = SqliteEventStore::open(&db).await.unwrap();
    let runners: Vec<KillOnDrop> = configs
        .iter()
        .map(|config| {
            let log = std::fs::File::create(config.with_extension("log")).unwrap();
            KillOnDrop(
                Command::new(env!("CARGO_BIN_EXE_annal-runner"))
                    .arg("-c")
                    .arg(config)
                    .arg("run")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, writing) = (store.clone(), writing.clone());
        tokio::spawn(async move {
            let mut appended = 0i64;
            let mut n = 0usize;
            while writing.load(Ordering::Relaxed) {
                let stream = StreamName::from_parts("account", n % 40).unwrap();
                let batch: Vec<NewEvent> = (0..5).map(|_| NewEvent::new("Deposited", json!({ "amount": 1 }))).collect();
                // Waits (busy timeout, 10 s) while a frozen runner holds the write lock.
                store.append(&stream, ExpectedVersion::Any, batch).await.unwrap();
                appended += 5;
                n += 1;
                // The workload's pace: about 1,000 events a second.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            appended
        })
    };
    let until = |what: &'static str, check: Box<dyn Fn((i64, i64, i64)) -> bool + Send>| {
        let store = store.clone();
        async move {
            let deadline = Instant::now() + PATIENCE;
            while !check(ledger(&store).await) {
                assert!(Instant::now() < deadline, "{what}: the ledger stayed at {:?}", ledger(&store).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until("both runners working", Box::new(|(count, _, _)| count > 200)).await;
    let frozen = &runners[0].0;
    let (mut inside, mut between) = (0, 0);
    for _ in 0..15 {
        if inside >= 2 && between >= 1 {
            break;
        }
        signal(frozen, "STOP");
        let stopped = Instant::now();
        if write_lock_held(&db).await {
            inside += 1;
        } else {
            between += 1;
            // Not holding the lock: the other runner takes its leases and applies meanwhile.
            let before = ledger(&store).await.0;
            until("the other runner applies", Box::new(move |(count, _, _)| count > before + 100)).await;
        }
        // Frozen for three lease periods in all.
        while stopped.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal(frozen, "CONT");
        // Resumed, it rejoins: some partitions come back to it.
        let deadline = Instant::now() + PATIENCE;
        while leases_of(&store, frozen.id()).await == 0 {
            assert!(Instant::now() < deadline, "the resumed runner never got a partition back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("frozen inside a write transaction {inside} times, between transactions {between} times");
    assert!(inside >= 1 && between >= 1, "frozen inside {inside} times, between {between} times");
    writing.store(false, Ordering::Relaxed);
    let appended = writer.await.unwrap();
    until("everything applied", Box::new(move |(count, _, _)| count >= appended)).await;
    for mut runner in runners {
        signal(&runner.0, "TERM");
        assert!(runner.0.wait().unwrap().success(), "a runner did not stop cleanly on SIGTERM");
    }
    assert_eq!(ledger(&store).await, (appended, appended, appended), "the read model differs from a replay");
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM annal_dead_letters").fetch_one(store.writer()).await.unwrap();
    assert_eq!(dead, 0, "nothing may be parked");
}
