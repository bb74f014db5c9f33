//! The `annal-runner` binary as operators use it: bad configurations refused before anything
//! runs, a declarative SQL projection run, inspected and stopped with SIGTERM, and kill -9
//! mid-batch, over and over, without a single event lost or applied twice.
#![cfg(feature = "sqlite")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::json;

fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_annal-runner"))
}

fn annal(config: &Path, args: &[&str]) -> Output {
    runner().arg("--config").arg(config).args(args).output().expect("annal-runner runs")
}

const LEDGER: &str = r#"
[[projection]]
name = "ledger"
categories = ["account"]
batch_size = 200
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL)"]
reset = ["DELETE FROM ledger"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, account, amount) VALUES (:event_id, :stream_id, :data ->> 'amount')"
"#;

struct Setup {
    _dir: tempfile::TempDir,
    db: PathBuf,
    config: PathBuf,
}

fn setup(projections: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!("database = \"sqlite://{}\"\nlisten = \"{listen}\"\nlease_seconds = 1.0\n{projections}", db.display()),
    )
    .unwrap();
    Setup { _dir: dir, db, config }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn deposit(store: &SqliteEventStore, accounts: usize, count: usize, batch: usize) -> i64 {
    let mut total = 0;
    for start in (0..count).step_by(batch) {
        let events: Vec<NewEvent> = (start..(start + batch).min(count))
            .map(|i| {
                total += (i % 97) as i64 + 1;
                NewEvent::new("Deposited", json!({ "amount": (i % 97) + 1 }))
            })
            .collect();
        let stream = StreamName::from_parts("account", (start / batch) % accounts).unwrap();
        store.append(&stream, ExpectedVersion::Any, events).await.unwrap();
    }
    total
}

async fn ledger(store: &SqliteEventStore) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0) FROM ledger")
        .fetch_one(store.writer())
        .await
        .unwrap_or((0, 0))
}

#[test]
fn bad_configurations_are_refused_before_anything_runs() {
    let good = LEDGER.to_owned();
    let cases = [
        (good.replace("batch_size = 200", "batch_size = 200\nbach_size = 1"), "unknown field `bach_size`"),
        (format!("{good}{good}"), "two projections are named \"ledger\""),
        (good.replace("name = \"ledger\"", "name = \"ledger; DROP TABLE x\""), "invalid projection name"),
        (good.replace(":stream_id", ":stream_idd"), "unknown parameter :stream_idd"),
        (good.replace("INSERT INTO ledger (", "INSERT INTO ledgr ("), "no such table: ledgr"),
        (good.replace("VALUES (", "VALUESS ("), "syntax error"),
    ];
    for (projections, expected) in cases {
        let setup = setup(&projections);
        // `migrate` first, so that `check` then finds the store's tables (it creates nothing).
        for command in ["migrate", "check", "run"] {
            let output = annal(&setup.config, &[command]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{command} accepted a bad configuration ({expected})");
            assert!(stderr.contains(expected), "{command}: expected {expected:?} in:\n{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_sql_projection_reports_status_and_stops_on_sigterm() {
    let setup = setup(LEDGER);
    let store = SqliteEventStore::open(&setup.db).await.unwrap();
    let total = deposit(&store, 5, 500, 10).await;
    let child = runner().arg("--config").arg(&setup.config).arg("run").stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The runner is another process: its progress can only be polled.
    while ledger(&store).await != (500, total) {
        assert!(Instant::now() < deadline, "the read model never caught up: {:?}", ledger(&store).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Status: running, nothing behind, and (once the runner has reported it) a p99 latency.
    loop {
        let status = annal(&setup.config, &["status"]);
        let table = String::from_utf8_lossy(&status.stdout).to_string();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        let row: Vec<&str> =
            table.lines().find(|l| l.starts_with("ledger")).unwrap_or_default().split_whitespace().collect();
        if row.len() > 8 && row[7] != "-" {
            assert_eq!((row[2], row[5], row[8]), ("running", "0", "0"), "{table}");
            assert!(row[7].parse::<f64>().is_ok(), "{table}");
            assert!(table.contains("held"), "a running runner holds its lease:\n{table}");
            break;
        }
        assert!(Instant::now() < deadline, "status never showed a latency:\n{table}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGTERM: the runner finishes its batch, releases its lease and exits cleanly.
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&annal(&setup.config, &["status"]).stdout).to_string();
    assert!(table.contains("expired") && table.contains("stopped"), "the lease was not released:\n{table}");
    // Rebuild: empty the read model, replay everything.
    let rebuilt = annal(&setup.config, &["rebuild", "ledger"]);
    assert!(rebuilt.status.success(), "{}", String::from_utf8_lossy(&rebuilt.stderr));
    assert_eq!(ledger(&store).await, (500, total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_loses_and_duplicates_nothing() {
    const EVENTS: usize = 50_000;
    const KILLS: usize = 20;
    let setup = setup(LEDGER);
    let store = SqliteEventStore::open(&setup.db).await.unwrap();
    let total = deposit(&store, 50, EVENTS, 100).await;
    let mut kills = 0;
    let started = Instant::now();
    loop {
        let mut child = runner()
            .arg("--config")
            .arg(&setup.config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if kills == KILLS {
            let deadline = Instant::now() + Duration::from_secs(120);
            while ledger(&store).await.0 < EVENTS as i64 {
                assert!(Instant::now() < deadline, "the read model never caught up: {:?}", ledger(&store).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
            child.wait().unwrap();
            break;
        }
        // Let it get into its stride, then kill it without warning, in the middle of whatever
        // batch it is applying. The pause varies so kills land at different points.
        tokio::time::sleep(Duration::from_millis(150 + (kills as u64 * 37) % 200)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let (count, sum) = ledger(&store).await;
    assert_eq!((count, sum), (EVENTS as i64, total), "read model differs from a replay after {kills} kills");
    let dead = annal(&setup.config, &["dead-letters", "list", "ledger"]);
    let listed = String::from_utf8_lossy(&dead.stdout);
    assert_eq!(listed.lines().count(), 1, "nothing may be parked (a duplicate would be):\n{listed}");
    eprintln!("{kills} kills over {EVENTS} events in {:?}", started.elapsed());
}

/// The rebuild record of `projection`, as `status --json` (another process) shows it.
fn rebuild_record(config: &Path, projection: &str) -> Option<serde_json::Value> {
    let output = annal(config, &["status", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    status["rebuilds"]
        .as_array()
        .expect("status --json lists rebuilds")
        .iter()
        .find(|r| r["projection"] == projection)
        .cloned()
}

/// Whether a rebuild record's owner (`host:pid:suffix`) contains `pid` (as `:PID:`).
fn owned_by(record: &serde_json::Value, pid: &str) -> bool {
    record["owner"].as_str().is_some_and(|owner| owner.contains(pid))
}

async fn scalar(store: &SqliteEventStore, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(store.writer()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_into_shadow_tables_keeps_serving_resumes_after_kill_9_and_swaps_in() {
    const EVENTS: usize = 50_000;
    let setup = setup(&LEDGER.replace("batch_size = 200", "batch_size = 200\ntables = [\"ledger\"]"));
    let store = SqliteEventStore::open(&setup.db).await.unwrap();
    let mut total = deposit(&store, 50, EVENTS, 100).await;
    let live = runner().arg("--config").arg(&setup.config).arg("run").stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ledger(&store).await.0 < EVENTS as i64 {
        assert!(Instant::now() < deadline, "the live read model never caught up: {:?}", ledger(&store).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A bug corrupted the live read model: the rebuild must replace it, not patch it.
    sqlx::query("UPDATE ledger SET amount = amount + 1000").execute(store.writer()).await.unwrap();
    let corrupted = ledger(&store).await;

    // The first rebuild is killed once its progress has been seen to move in its record, as
    // another process's `status --json` shows it; the live read model serves, whole, all along.
    let mut rebuild = runner()
        .arg("--config")
        .arg(&setup.config)
        .args(["rebuild", "ledger"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first_owner = format!(":{}:", rebuild.id());
    let mut seen = None;
    loop {
        assert_eq!(ledger(&store).await, corrupted, "the live read model changed before the swap");
        // (Its first write, before the events are counted, says 0 of 0.)
        let record = rebuild_record(&setup.config, "ledger").filter(|r| owned_by(r, &first_owner) && r["total"] != 0);
        if let Some(record) = record {
            assert_eq!((record["mode"].as_str(), record["outcome"].as_str()), (Some("shadow"), Some("running")));
            assert_eq!(record["stale"], false, "{record}");
            let (done, total) = (record["done"].as_u64().unwrap(), record["total"].as_u64().unwrap());
            assert!(done <= total && total >= EVENTS as u64, "{record}");
            // Seen at one figure (0 at the replay's start, written at once), then at a higher
            // one a write or more later: the record is written every second while it runs.
            match seen {
                None => seen = Some(done),
                Some(first) if done > first => {
                    assert!(record["rate"].as_f64().unwrap() > 0.0 && record["eta_seconds"].is_number(), "{record}");
                    break;
                }
                _ => {}
            }
        }
        assert!(rebuild.try_wait().unwrap().is_none(), "the rebuild ended before its progress was seen to move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rebuild.kill().unwrap(); // SIGKILL
    rebuild.wait().unwrap();
    let shadow_rows = scalar(&store, "SELECT count(*) FROM ledger__rebuild").await;
    assert!(shadow_rows > 0 && shadow_rows < EVENTS as i64, "killed mid-way: {shadow_rows} shadow rows");
    let status = String::from_utf8_lossy(&annal(&setup.config, &["status"]).stdout).to_string();
    assert!(status.lines().any(|l| l.starts_with("ledger__rebuild")), "status shows the rebuild:\n{status}");
    // Nobody writes the dead process's record any more: it turns stale (after max(lease, 3 s)).
    let deadline = Instant::now() + Duration::from_secs(60);
    while rebuild_record(&setup.config, "ledger").is_none_or(|r| r["stale"] != true) {
        assert!(Instant::now() < deadline, "the killed rebuild's record never went stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = String::from_utf8_lossy(&annal(&setup.config, &["status"]).stdout).to_string();
    let line = status.lines().find(|l| l.starts_with("rebuild of ledger (shadow)")).unwrap_or_default();
    assert!(line.contains(&first_owner) && line.contains("STALE"), "status says the rebuild died:\n{status}");

    // Events keep coming while the second rebuild resumes and swaps the shadow in.
    total += deposit(&store, 50, 1_000, 100).await;
    let output = annal(&setup.config, &["rebuild", "ledger"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("resuming the rebuild of ledger"), "{stdout}");
    assert!(stdout.contains("swapped them in"), "{stdout}");
    let record = rebuild_record(&setup.config, "ledger").unwrap();
    assert!(!owned_by(&record, &first_owner), "a new rebuild's record: {record}");
    assert_eq!((record["outcome"].as_str(), record["stale"].as_bool()), (Some("swapped_in"), Some(false)), "{record}");
    assert!(record["done"] == record["total"] && record["total"].as_u64() > Some(EVENTS as u64), "{record}");
    total += deposit(&store, 50, 1_000, 100).await;
    let count = (EVENTS + 2_000) as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ledger(&store).await != (count, total) {
        assert!(Instant::now() < deadline, "the read model is not a replay: {:?}", ledger(&store).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leftovers = "SELECT (SELECT count(*) FROM sqlite_master WHERE name LIKE '%rebuild%' \
        AND name NOT LIKE '%annal_rebuilds%') \
        + (SELECT count(*) FROM annal_checkpoints WHERE projection LIKE '%rebuild%')";
    assert_eq!(scalar(&store, leftovers).await, 0, "shadow tables or checkpoints left behind");
    Command::new("kill").arg("-TERM").arg(live.id().to_string()).status().unwrap();
    assert!(live.wait_with_output().unwrap().status.success());
}

/// A ledger that refuses negative amounts, with a line to swap its failure policy in.
const CHECKED: &str = r#"
[[projection]]
name = "ledger"
categories = ["account"]
batch_size = 50
# policy
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL CHECK (amount > 0))"]
reset = ["DELETE FROM ledger"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, account, amount) VALUES (:event_id, :stream_id, :data ->> 'amount')"
"#;

/// Runs `rebuild --in-place ledger` to its end; its exit status and its record.
fn rebuild_in_place(config: &Path) -> (bool, serde_json::Value) {
    let output = annal(config, &["rebuild", "--in-place", "ledger"]);
    let record = rebuild_record(config, "ledger").expect("a rebuild record");
    (output.status.success(), record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_rebuild_records_how_it_ended() {
    let setup = setup(CHECKED);
    let base = std::fs::read_to_string(&setup.config).unwrap();
    let policy = |policy: &str| std::fs::write(&setup.config, base.replace("# policy", policy)).unwrap();
    let store = SqliteEventStore::open(&setup.db).await.unwrap();
    let total = deposit(&store, 5, 500, 10).await;
    assert!(annal(&setup.config, &["migrate"]).status.success());

    // Caught up: the projection is resumed, every event replayed.
    let (ok, record) = rebuild_in_place(&setup.config);
    assert!(ok, "{record}");
    assert_eq!((record["mode"].as_str(), record["outcome"].as_str()), (Some("in_place"), Some("resumed")), "{record}");
    assert_eq!((record["done"].as_u64(), record["total"].as_u64()), (Some(500), Some(500)), "{record}");
    assert_eq!(record["stale"], false);
    assert_eq!(ledger(&store).await, (500, total));
    let status = String::from_utf8_lossy(&annal(&setup.config, &["status"]).stdout).to_string();
    assert!(status.contains("rebuild of ledger (in-place) by ") && status.contains("500/500 events"), "{status}");

    // An operator's pause is put back at the end: it says so.
    assert!(annal(&setup.config, &["pause", "ledger"]).status.success());
    let (ok, record) = rebuild_in_place(&setup.config);
    assert!(ok && record["outcome"] == "left_paused", "{record}");
    assert!(annal(&setup.config, &["resume", "ledger"]).status.success());

    // A poison event under on_failure = "stop": failed, with the projection's reason.
    deposit_amount(&store, -1).await;
    policy("retry_attempts = 1\non_failure = \"stop\"");
    let (ok, record) = rebuild_in_place(&setup.config);
    assert!(!ok, "a failed rebuild exits with an error");
    assert_eq!(record["outcome"], "failed", "{record}");
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("stopped at event") && reason.contains("CHECK"), "{record}");
    assert_eq!((record["done"].as_u64(), record["total"].as_u64()), (Some(500), Some(501)), "{record}");
    let status = String::from_utf8_lossy(&annal(&setup.config, &["status"]).stdout).to_string();
    assert!(status.lines().any(|l| l.starts_with("rebuild of ledger") && l.contains("failed: ")), "{status}");

    // Held at the poison event by a ten-minute back-off, then SIGTERM: interrupted.
    policy("retry_attempts = 2\nretry_initial_ms = 600000");
    let child = runner()
        .arg("--config")
        .arg(&setup.config)
        .args(["rebuild", "--in-place", "ledger"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let owner = format!(":{}:", child.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    while rebuild_record(&setup.config, "ledger").is_none_or(|r| !owned_by(&r, &owner) || r["done"] != 500) {
        assert!(Instant::now() < deadline, "the rebuild never reached the poison event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    assert!(!child.wait_with_output().unwrap().status.success(), "an interrupted rebuild exits with an error");
    let record = rebuild_record(&setup.config, "ledger").unwrap();
    assert!(owned_by(&record, &owner), "{record}");
    assert_eq!((record["outcome"].as_str(), record["stale"].as_bool()), (Some("interrupted"), Some(false)), "{record}");
}

async fn deposit_amount(store: &SqliteEventStore, amount: i64) {
    let stream = StreamName::from_parts("account", 0).unwrap();
    store
        .append(&stream, ExpectedVersion::Any, vec![NewEvent::new("Deposited", json!({ "amount": amount }))])
        .await
        .unwrap();
}
