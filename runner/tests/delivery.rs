//! Delivery modes under crashes, process-level, on SQLite and PostgreSQL: a runner with Rust
//! projections whose effect is outside the database (`examples/side_effects.rs`: a line per
//! event in a file) is killed with SIGKILL inside a batch, after its first event's effect, again
//! and again until the log is done. At-least-once: every event took effect at least once, and
//! the batches cut short took effect again (duplicates seen, so the crash window was hit).
//! At-most-once: no event took effect twice, and the rest of each batch cut short is lost.
#![cfg(feature = "sqlite")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, StreamName};
use serde_json::{Value, json};

#[path = "support/local.rs"]
mod local;

use local::KillOnDrop;

/// Events appended before the first run: 6 streams × 10, handled in batches of 10.
const EVENTS: usize = 60;

/// The example's binary (built beside the tests by `cargo test -p annal-runner`, or by
/// `cargo build -p annal-runner --all-features --example side_effects`).
fn example() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_owned();
    let path = deps.parent().unwrap().join("examples").join(format!("side_effects{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo build -p annal-runner --all-features --example side_effects`",
        path.display()
    );
    path
}

async fn append_all(events: &impl EventStore) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    for stream in 0..EVENTS / 10 {
        let batch: Vec<NewEvent> = (0..10).map(|n| NewEvent::new("Deposited", json!({ "n": n }))).collect();
        ids.extend(batch.iter().map(|e| e.id));
        let stream = StreamName::from_parts("account", stream).unwrap();
        events.append(&stream, ExpectedVersion::NoStream, batch).await.unwrap();
    }
    ids
}

fn held(dir: &Path, projection: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(&format!("held-{projection}-")))
        .count()
}

fn caught_up(config: &Path, projection: &str) -> bool {
    let output =
        Command::new(example()).arg("--config").arg(config).args(["status", projection, "--json"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    status["partitions"][0]["events_behind"] == 0
}

/// Runs `projection` until it has caught up, killing the runner with SIGKILL each time a batch
/// holds after its first event's effect (and once more when it has caught up); returns how often
/// each event took effect, and the kills inside batches.
fn run_with_kills(config: &Path, effects: &Path, projection: &str) -> (HashMap<String, usize>, usize) {
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    'runs: loop {
        let before = held(effects, projection);
        let log = std::fs::File::create(effects.join(format!("run-{projection}-{kills}.log"))).unwrap();
        let mut runner = KillOnDrop(
            Command::new(example())
                .arg("--config")
                .arg(config)
                .args(["run", "--only", projection])
                .env("ANNAL_EFFECTS", effects)
                .env("ANNAL_HOLD", "1")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        // Another process: its progress can only be polled.
        loop {
            assert!(Instant::now() < deadline, "{projection}: never caught up after {kills} kills");
            if held(effects, projection) > before {
                runner.0.kill().unwrap();
                runner.0.wait().unwrap();
                kills += 1;
                continue 'runs;
            }
            if caught_up(config, projection) {
                // Killed too: an at-most-once runner may already hold in its last batch (its
                // checkpoint moved first), and would never finish it for a SIGTERM.
                runner.0.kill().unwrap();
                runner.0.wait().unwrap();
                break 'runs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let text = std::fs::read_to_string(effects.join(format!("{projection}.log"))).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    (counts, kills)
}

/// Both modes on one database (each projection runs alone, killed in its own batches).
async fn both_modes(config: &Path, effects: &Path, ids: &[uuid::Uuid]) {
    let (counts, kills) = run_with_kills(config, effects, "at_least_once");
    assert!(kills >= EVENTS / 10, "at-least-once: a kill in every batch, {kills} kills");
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(&id.to_string())).collect();
    assert!(lost.is_empty(), "at-least-once lost {} events after {kills} kills: {lost:?}", lost.len());
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    assert!(duplicates >= kills, "{kills} batches were cut short, but only {duplicates} effects repeated");
    eprintln!("at-least-once: {kills} kills, {} events, {duplicates} repeated effects, none lost", ids.len());

    let (counts, kills) = run_with_kills(config, effects, "at_most_once");
    // The last batch may be cut short by the kill that ends the run instead.
    assert!(kills + 1 >= EVENTS / 10, "at-most-once: a kill in every batch, {kills} kills");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "at-most-once delivered events twice after {kills} kills: {twice:?}");
    assert!(counts.keys().all(|id| ids.iter().any(|i| i.to_string() == *id)), "effects of unknown events");
    let lost = ids.len() - counts.len();
    // Each batch cut short after its first event loses the other nine: the window was hit.
    assert!(lost >= kills, "{kills} batches were cut short, but only {lost} events lost");
    eprintln!("at-most-once: {kills} kills, {} events, {lost} lost, none twice", ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_modes_under_kill_9_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let text = format!(
        "database = \"sqlite://{}\"\nlisten = \"127.0.0.1:{}\"\nlease_seconds = 1.0\n",
        db.display(),
        local::free_port()
    );
    std::fs::write(&config, text).unwrap();
    let store = annal_eventstore::SqliteEventStore::open(&db).await.unwrap();
    let ids = append_all(&store).await;
    store.close().await;
    let migrate = Command::new(example()).arg("--config").arg(&config).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let effects = dir.path().join("effects");
    std::fs::create_dir(&effects).unwrap();
    both_modes(&config, &effects, &ids).await;
}

#[cfg(feature = "postgres")]
#[path = "support/runner_pg.rs"]
mod pg;

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_modes_under_kill_9_on_postgres() {
    let setup = pg::setup().await;
    let config = setup.config("delivery", "");
    let ids = append_all(&setup.events).await;
    let migrate = Command::new(example()).arg("--config").arg(&config).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let effects = setup.dir.path().join("effects");
    std::fs::create_dir(&effects).unwrap();
    both_modes(&config, &effects, &ids).await;
}
