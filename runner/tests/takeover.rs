//! Pause, resume, `reset --to` and `rebuild --in-place` beside live `annal-runner` processes,
//! on SQLite and on PostgreSQL alike (each case runs on both; PostgreSQL needs DATABASE_URL,
//! which `scripts/with-postgres` provides, and fails loudly without it).
#![cfg(all(feature = "sqlite", feature = "postgres"))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use annal_eventstore::{
    EventStore, ExpectedVersion, Filter, NewEvent, PgEventStore, Position, SqliteEventStore, StreamName,
};
use serde_json::json;

#[path = "support/local.rs"]
mod local;

const PATIENCE: Duration = Duration::from_secs(90);
const LEASE: Duration = Duration::from_secs(1);

enum Pool {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

/// One database under test, with the ledger projection's SQL spelled for it.
struct Db {
    dir: tempfile::TempDir,
    url: String,
    pool: Pool,
    events: Arc<dyn EventStore>,
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path).await.unwrap();
    let pool = Pool::Sqlite(store.writer().clone());
    Db { url: format!("sqlite://{}", path.display()), dir, pool, events: Arc::new(store) }
}

async fn postgres() -> Db {
    let base = std::env::var("DATABASE_URL")
        .expect("the PostgreSQL cases need DATABASE_URL: run them under scripts/with-postgres");
    let schema = format!("takeover_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    admin.close().await;
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect_with(options).await.unwrap();
    let store = PgEventStore::from_pool(pool.clone()).await.unwrap();
    Db { dir: tempfile::tempdir().unwrap(), url, pool: Pool::Pg(pool), events: Arc::new(store) }
}

impl Db {
    fn is_pg(&self) -> bool {
        matches!(self.pool, Pool::Pg(_))
    }

    /// A configuration file with its own HTTP port. `amount` is the handler's amount expression.
    fn config(&self, name: &str, extra: &str, amount: &str) -> PathBuf {
        let port = local::free_port();
        let (id, int, cast) = if self.is_pg() { ("uuid", "bigint", "::bigint") } else { ("BLOB", "INTEGER", "") };
        let text = format!(
            r#"database = "{url}"
listen = "127.0.0.1:{port}"
lease_seconds = {lease}
console_token = "letmein"

[[projection]]
name = "ledger"
categories = ["account"]
retry_attempts = 1
{extra}
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id {id} PRIMARY KEY, account text NOT NULL, amount {int} NOT NULL)"]

[projection.handlers]
Deposited = "INSERT INTO ledger VALUES (:event_id, :stream_id, ({amount}){cast})"
"#,
            url = self.url,
            lease = LEASE.as_secs_f64(),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A number from the database; -1 when the query fails (a table not created yet).
    async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1),
            Pool::Pg(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1),
        }
    }

    /// Rows and sum of the ledger.
    async fn ledger(&self) -> (i64, i64) {
        let sum = if self.is_pg() { "coalesce(sum(amount), 0)::bigint" } else { "coalesce(sum(amount), 0)" };
        (self.scalar("SELECT count(*) FROM ledger").await, self.scalar(&format!("SELECT {sum} FROM ledger")).await)
    }

    async fn checkpoints(&self) -> Vec<String> {
        let sql = "SELECT partition, position_tx, position_seq FROM annal_checkpoints WHERE projection = 'ledger' \
                   ORDER BY partition";
        let rows: Vec<(i64, i64, i64)> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
            Pool::Pg(pool) => sqlx::query_as::<_, (i32, i64, i64)>(sql)
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .map(|(p, t, s)| (i64::from(p), t, s))
                .collect(),
        };
        rows.into_iter().map(|(p, t, s)| format!("{p}:{t}/{s}")).collect()
    }

    /// Appends `count` deposits of `amount(i)` over 8 accounts in 10-event appends; the sum.
    async fn deposit(&self, count: usize, amount: impl Fn(usize) -> i64) -> i64 {
        let mut total = 0;
        for start in (0..count).step_by(10) {
            let batch: Vec<NewEvent> = (start..(start + 10).min(count))
                .map(|i| {
                    total += amount(i);
                    NewEvent::new("Deposited", json!({ "amount": amount(i) }))
                })
                .collect();
            let stream = StreamName::from_parts("account", (start / 10) % 8).unwrap();
            self.events.append(&stream, ExpectedVersion::Any, batch).await.unwrap();
        }
        total
    }

    async fn until(&self, what: &str, check: impl Fn((i64, i64)) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        // Runners are other processes: their progress can only be polled.
        while !check(self.ledger().await) {
            assert!(Instant::now() < deadline, "{what}: the ledger stayed at {:?}", self.ledger().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn annal(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_annal-runner")).arg("--config").arg(config).args(args).output().unwrap()
}

fn ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

fn refused(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted; expected a refusal with {expected:?}");
    assert!(stderr.contains(expected), "expected {expected:?} in:\n{stderr}");
}

/// Starts `annal-runner run`; its log goes beside its configuration.
fn start(config: &Path) -> local::KillOnDrop {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    local::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_annal-runner"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn terminate(mut runner: local::KillOnDrop, config: &Path) {
    let child: &mut Child = &mut runner.0;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let log = || std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
    assert!(child.wait().unwrap().success(), "a runner did not stop cleanly:\n{}", log());
}

async fn until_leases(db: &Db, what: &str, check: impl Fn(i64) -> bool) {
    let now = if db.is_pg() { "clock_timestamp()" } else { "(unixepoch('subsec') * 1000000)" };
    let sql = format!("SELECT count(*) FROM annal_leases WHERE projection = 'ledger' AND expires_at > {now}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let live = db.scalar(&sql).await;
        if check(live) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {live} live lease(s)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(super::sqlite().await).await; })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(super::postgres().await).await; })*
        }
    };
}

on_both!(
    a_pause_stops_two_live_runners_and_resume_catches_up_exactly,
    rebuild_in_place_takes_over_from_a_live_runner_with_its_own_configuration,
    in_place_rebuilds_are_refused_without_reset_statements_and_keep_a_pause,
    reset_moves_forward_with_a_count_and_refuses_to_go_back_without_allow_replay,
);

const AMOUNT: &str = ":data ->> 'amount'";

/// Two runners share the projection while a writer appends; `pause` makes both let go within
/// a lease period, no checkpoint moves while paused, `status` says paused, and after `resume`
/// the read model is the replay: every event once.
async fn a_pause_stops_two_live_runners_and_resume_catches_up_exactly(db: Db) {
    let (a, b) = (db.config("a", "partitions = 4", AMOUNT), db.config("b", "partitions = 4", AMOUNT));
    ok(&annal(&a, &["migrate"]));
    let (runner_a, runner_b) = (start(&a), start(&b));
    let mut total = db.deposit(200, |i| (i % 7) as i64 + 1).await;
    db.until("caught up", |(rows, _)| rows == 200).await;
    until_leases(&db, "both run", |live| live == 4).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (events, stop) = (db.events.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut count, mut sum) = (0i64, 0i64);
            while !stop.load(Ordering::SeqCst) {
                let stream = StreamName::from_parts("account", count % 8).unwrap();
                events
                    .append(&stream, ExpectedVersion::Any, vec![NewEvent::new("Deposited", json!({ "amount": 3 }))])
                    .await
                    .unwrap();
                (count, sum) = (count + 1, sum + 3);
            }
            (count, sum)
        })
    };
    let started = Instant::now();
    let paused = ok(&annal(&a, &["pause", "ledger", "--reason", "maintenance"]));
    let took = started.elapsed();
    assert!(paused.contains("no runner holds its partitions"), "{paused}");
    eprintln!("pause: every runner let go in {took:?} (lease {LEASE:?})");
    // Watched for three lease periods: not one checkpoint moves, though events keep coming.
    let before = db.checkpoints().await;
    let head = db.events.head().await.unwrap();
    tokio::time::sleep(LEASE * 3).await;
    assert_eq!(db.checkpoints().await, before, "a checkpoint moved while paused");
    assert!(db.events.head().await.unwrap() > head, "the writer kept appending");
    let status = ok(&annal(&a, &["status"]));
    assert!(status.contains(" paused ") && status.contains("ledger is paused by operator"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&ok(&annal(&a, &["status", "--json"]))).unwrap();
    assert_eq!(json["partitions"][0]["state"], "paused");
    assert_eq!(json["partitions"][0]["paused"]["reason"], "maintenance");
    assert!(ok(&annal(&a, &["resume", "ledger"])).contains("resumed ledger"));
    stop.store(true, Ordering::SeqCst);
    let (count, sum) = writer.await.unwrap();
    total += sum;
    let rows = 200 + count;
    db.until("resumed", |ledger| ledger == (rows, total)).await;
    until_leases(&db, "both run again", |live| live == 4).await;
    terminate(runner_a, &a);
    terminate(runner_b, &b);
    assert_eq!(db.ledger().await, (rows, total), "the read model differs from a replay");
}

/// RFC 3339 time after `label ` in the rebuild's report.
fn time_after(text: &str, label: &str) -> chrono::DateTime<chrono::Utc> {
    let start = text.find(label).unwrap_or_else(|| panic!("no {label:?} in {text}")) + label.len();
    let end = text[start..].find([',', ')']).map_or(text.len(), |e| start + e);
    chrono::DateTime::parse_from_rfc3339(text[start..end].trim()).unwrap().to_utc()
}

/// A live runner parks a poison event (its handler misreads it). `rebuild --in-place` from a
/// separate process with a configuration that fixes the handler takes the projection over,
/// replays with the fix (no new event needed), and hands it back: the poison event is applied,
/// no dead letter is left, the live runner applies new events again, the read model is the
/// replay, and it was incomplete only while the replay ran.
async fn rebuild_in_place_takes_over_from_a_live_runner_with_its_own_configuration(db: Db) {
    let reset = "reset = [\"DELETE FROM ledger\"]";
    let live = db.config("live", reset, AMOUNT);
    let fixed = db.config("fixed", reset, "coalesce(:data ->> 'amount', :data ->> 'value')");
    ok(&annal(&live, &["migrate"]));
    let runner = start(&live);
    let mut total = db.deposit(2000, |i| (i % 5) as i64 + 1).await;
    // The poison: its amount is under another key, which the live handler does not read.
    let poison = StreamName::from_parts("account", 99).unwrap();
    db.events
        .append(&poison, ExpectedVersion::Any, vec![NewEvent::new("Deposited", json!({ "value": 1000 }))])
        .await
        .unwrap();
    total += 1000;
    let parked = "SELECT count(*) FROM annal_dead_letters WHERE projection = 'ledger'";
    let deadline = Instant::now() + PATIENCE;
    while db.scalar(parked).await != 1 || db.ledger().await.0 != 2000 {
        assert!(Instant::now() < deadline, "the live runner never parked the poison: {:?}", db.ledger().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Watch the read model while the rebuild runs: when was it incomplete (fewer rows than
    // the live runner had)?
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (watching, db) = (watching.clone(), Arc::new(db));
        let handle = tokio::spawn({
            let db = db.clone();
            async move {
                let mut incomplete = Vec::new();
                while watching.load(Ordering::SeqCst) {
                    let rows = db.scalar("SELECT count(*) FROM ledger").await;
                    if rows < 2000 {
                        incomplete.push(chrono::Utc::now());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                incomplete
            }
        });
        (handle, db)
    };
    let (watcher, db) = watcher;
    let fixed_for_rebuild = fixed.clone();
    let output = tokio::task::spawn_blocking(move || annal(&fixed_for_rebuild, &["rebuild", "ledger", "--in-place"]))
        .await
        .unwrap();
    watching.store(false, Ordering::SeqCst);
    let incomplete = watcher.await.unwrap();
    let report = ok(&output);
    assert!(report.contains("rebuilt ledger in place: 2001 events replayed"), "{report}");
    let (reset_at, caught_up) = (time_after(&report, "reset at "), time_after(&report, "caught up at "));
    // The fix is in: the poison applied, nothing parked.
    assert_eq!(db.ledger().await, (2001, total), "{report}");
    assert_eq!(db.scalar(parked).await, 0);
    // The read model was incomplete only between the reset and the end of the replay.
    for seen in &incomplete {
        assert!(*seen >= reset_at && *seen <= caught_up, "incomplete at {seen}, outside {reset_at}..{caught_up}");
    }
    let empty = incomplete.first().zip(incomplete.last()).map(|(a, b)| (*b - *a).to_std().unwrap_or_default());
    eprintln!(
        "rebuild in place: read model incomplete for {empty:?} ({} samples), replay took {:?}",
        incomplete.len(),
        (caught_up - reset_at).to_std().unwrap_or_default()
    );
    // Handed back: the live runner takes it again and applies new events.
    let status = ok(&annal(&live, &["status"]));
    assert!(!status.contains("paused"), "{status}");
    total += db.deposit(50, |_| 2).await;
    db.until("the live runner carries on", |ledger| ledger == (2051, total)).await;
    terminate(runner, &live);
}

/// `--in-place` for a projection without reset statements is refused (its rows would stay and
/// collide with the replay), changing nothing; a rebuild of a paused projection leaves it
/// paused, as the operator wanted.
async fn in_place_rebuilds_are_refused_without_reset_statements_and_keep_a_pause(db: Db) {
    let bare = db.config("bare", "", AMOUNT);
    ok(&annal(&bare, &["migrate"]));
    let total = db.deposit(30, |_| 1).await;
    let runner = start(&bare);
    db.until("caught up", |ledger| ledger == (30, total)).await;
    let before = db.checkpoints().await;
    refused(&annal(&bare, &["rebuild", "ledger", "--in-place"]), "has no `reset` statements");
    assert_eq!(db.checkpoints().await, before, "a refused rebuild changed the checkpoints");
    assert_eq!(db.ledger().await, (30, total));
    terminate(runner, &bare);
    let with_reset = db.config("reset", "reset = [\"DELETE FROM ledger\"]", AMOUNT);
    ok(&annal(&with_reset, &["pause", "ledger", "--reason", "hold"]));
    let report = ok(&annal(&with_reset, &["rebuild", "ledger", "--in-place"]));
    assert!(report.contains("30 events replayed") && report.contains("stays paused"), "{report}");
    let json: serde_json::Value = serde_json::from_str(&ok(&annal(&with_reset, &["status", "--json"]))).unwrap();
    assert_eq!(json["partitions"][0]["paused"]["reason"], "hold", "{json}");
    assert_eq!(db.ledger().await, (30, total));
}

/// `reset --to`: forward skips events (counted); backward is refused without --allow-replay,
/// changing nothing, and moves every partition with it; beyond the head is refused; --to-time
/// puts the checkpoints just before the first event recorded at or after the time.
async fn reset_moves_forward_with_a_count_and_refuses_to_go_back_without_allow_replay(db: Db) {
    let config = db.config("reset", "partitions = 2", AMOUNT);
    ok(&annal(&config, &["migrate"]));
    db.deposit(40, |_| 1).await;
    // On PostgreSQL committed events become readable once no older transaction can still
    // commit before them: polled.
    let deadline = Instant::now() + PATIENCE;
    let page = loop {
        let page = db.events.read_all_page(Position::START, &Filter::all(), 100).await.unwrap();
        if page.events.len() == 40 {
            break page;
        }
        assert!(Instant::now() < deadline, "only {} events readable", page.events.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let positions: Vec<Position> = page.events.iter().map(|e| e.position).collect();
    let (middle, head) = (positions[19], positions[39]);
    // Forward from the start (nothing applied yet): 20 events skipped, in both partitions.
    let moved = ok(&annal(&config, &["reset", "ledger", "--to", &middle.to_string()]));
    assert!(moved.contains("20 event(s) skipped, 0 to replay"), "{moved}");
    assert_eq!(db.checkpoints().await, vec![format!("0:{middle}"), format!("1:{middle}")]);
    // Back to the start: refused, nothing changes; allowed with --allow-replay.
    let start_text = Position::START.to_string();
    refused(&annal(&config, &["reset", "ledger", "--to", &start_text]), "--allow-replay");
    assert_eq!(db.checkpoints().await, vec![format!("0:{middle}"), format!("1:{middle}")]);
    let back = ok(&annal(&config, &["reset", "ledger", "--to", &start_text, "--allow-replay"]));
    assert!(back.contains("0 event(s) skipped, 20 to replay"), "{back}");
    assert_eq!(db.checkpoints().await, vec![format!("0:{start_text}"), format!("1:{start_text}")]);
    // Past the head, or not a position: refused.
    let beyond = Position::new(head.transaction(), head.sequence() + 1000).to_string();
    refused(&annal(&config, &["reset", "ledger", "--to", &beyond]), "after the head");
    refused(&annal(&config, &["reset", "ledger", "--to", "yesterday"]), "invalid position");
    refused(&annal(&config, &["reset", "ledger", "--to-time", "yesterday"]), "RFC 3339");
    // By time: just before the 31st event.
    let at = page.events[30].recorded_at.to_rfc3339();
    let timed = ok(&annal(&config, &["reset", "ledger", "--to-time", &at]));
    // (Events appended together may share a time: the checkpoint is before the first of them.)
    let first = page.events.iter().position(|e| e.recorded_at >= page.events[30].recorded_at).unwrap();
    let expected = if first == 0 { Position::START } else { positions[first - 1] };
    assert!(timed.contains(&format!(" {first} event(s) skipped")), "{timed}");
    assert_eq!(db.checkpoints().await, vec![format!("0:{expected}"), format!("1:{expected}")]);
    // A runner then applies exactly the events after the checkpoint.
    let runner = start(&config);
    let rows = positions.iter().filter(|p| **p > expected).count() as i64;
    db.until("applies the rest", |(count, _)| count == rows).await;
    terminate(runner, &config);
}
