//! The command line as an operator uses it, one behaviour per test: options anywhere, status
//! as JSON, filtered and watched, dead letters shown, retried in bulk and skipped, streams
//! browsed and tailed, `run --only --listen`, `${ENV}` in the configuration, errors that name
//! what failed, quiet broken pipes, plain logs off a terminal, rebuild progress in the log, and
//! an event's first failure at WARN.
#![cfg(feature = "sqlite")]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Output, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::{Value, json};

#[path = "support/local.rs"]
mod local;

const LEDGER: &str = r#"
[[projection]]
name = "ledger"
categories = ["account"]
batch_size = 10
retry_attempts = 1
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL CHECK (amount > 0))"]
reset = ["DELETE FROM ledger"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, account, amount) VALUES (:event_id, :stream_id, :data ->> 'amount')"

[[projection]]
name = "audit"
setup = ["CREATE TABLE IF NOT EXISTS audit (event_id BLOB PRIMARY KEY)"]

[projection.handlers]
Deposited = "INSERT INTO audit (event_id) VALUES (:event_id)"
"#;

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    listen: String,
    store: SqliteEventStore,
}

use local::free_port;

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    let text =
        format!("database = \"sqlite://{}\"\nlisten = \"{listen}\"\nlease_seconds = 1.0\n{LEDGER}", db.display());
    std::fs::write(&config, text).unwrap();
    let store = SqliteEventStore::open(&db).await.unwrap();
    // The projection store's tables too: only `migrate` and `run` create them.
    annal_projections::SqliteProjectionStore::new(&store).await.unwrap();
    Setup { _dir: dir, config, listen, store }
}

fn runner() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_annal-runner"));
    command.env_remove("RUST_LOG");
    command
}

/// Runs a command with the configuration given *after* the subcommand (global options).
fn annal(setup: &Setup, args: &[&str]) -> Output {
    runner().args(args).arg("-c").arg(&setup.config).output().expect("annal-runner runs")
}

fn ok(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failed(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded, expected {expected:?}: {}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

async fn deposit(store: &SqliteEventStore, account: u32, amounts: &[i64]) {
    local::deposit(store, &local::account(account), amounts).await;
}

async fn scalar(store: &SqliteEventStore, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(store.writer()).await.unwrap()
}

/// `run`, with its stderr readable line by line.
fn run(setup: &Setup, args: &[&str]) -> (Child, BufReader<ChildStderr>) {
    let mut child = runner()
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&setup.config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    (child, stderr)
}

/// Reads lines until one contains `needle`; returns everything read.
fn read_until(reader: &mut impl BufRead, needle: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "ended before {needle:?}:\n{seen}");
        seen.push_str(&line);
        if line.contains(needle) {
            return seen;
        }
    }
}

fn stop(mut child: Child) {
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    assert!(child.wait().unwrap().success());
}

async fn caught_up(setup: &Setup, parked: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: Value = serde_json::from_str(&ok(&annal(setup, &["status", "ledger", "--json"]))).unwrap();
        let row = &status["partitions"][0];
        if row["events_behind"] == 0 && row["dead_letters"] == parked {
            return;
        }
        assert!(Instant::now() < deadline, "never caught up: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_filter_watch_owner_and_unknown_names() {
    let setup = setup().await;
    deposit(&setup.store, 1, &[5, 6]).await;
    let (child, mut stderr) = run(&setup, &[]);
    caught_up(&setup, 0).await;
    let status: Value = serde_json::from_str(&ok(&annal(&setup, &["status", "--json", "ledger"]))).unwrap();
    let rows = status["partitions"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "only ledger: {status}");
    let row = &rows[0];
    assert_eq!((row["projection"].as_str(), row["state"].as_str()), (Some("ledger"), Some("running")));
    assert_eq!(row["checkpoint"], "0/2");
    // The lease owner names the host and the pid.
    let owner = row["lease"]["owner"].as_str().unwrap().to_owned();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    assert!(owner.starts_with(&format!("{host}:{}:", child.id())), "{owner}");
    // Unfiltered, as a table: both projections.
    let table = ok(&annal(&setup, &["status"]));
    assert!(table.contains("ledger") && table.contains("audit") && table.contains(&owner), "{table}");
    // Unknown projections are errors everywhere.
    failed(&annal(&setup, &["status", "nope"]), "no projection named \"nope\"");
    failed(&annal(&setup, &["dead-letters", "list", "nope"]), "no projection named \"nope\"");
    failed(&annal(&setup, &["dead-letters", "show", "nope", "1"]), "no projection named \"nope\"");
    failed(&annal(&setup, &["dead-letters", "skip", "nope", "1"]), "no projection named \"nope\"");
    failed(&annal(&setup, &["status", "--watch", "0"]), "--watch 0: give a positive number of seconds");
    // --watch prints again and again, until SIGTERM.
    let mut watch = runner()
        .args(["status", "ledger", "--watch", "0.1", "-c"])
        .arg(&setup.config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap());
    read_until(&mut out, "ledger");
    read_until(&mut out, "ledger");
    stop(watch);
    // Logs off a terminal carry no colour codes.
    stop(child);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("INFO") && !rest.contains('\x1b'), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_show_retry_all_or_by_stream_and_skip() {
    let setup = setup().await;
    deposit(&setup.store, 1, &[-1]).await;
    deposit(&setup.store, 2, &[-2]).await;
    deposit(&setup.store, 3, &[-3]).await;
    let (child, _stderr) = run(&setup, &[]);
    caught_up(&setup, 3).await;
    stop(child);
    let list = ok(&annal(&setup, &["dead-letters", "list", "ledger"]));
    let ids: Vec<i64> = list.lines().skip(1).map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{list}");
    // show: the event with its payload and metadata, the error, attempts and parked time.
    let shown: Value =
        serde_json::from_str(&ok(&annal(&setup, &["dead-letters", "show", "ledger", &ids[0].to_string()]))).unwrap();
    assert_eq!(shown["event"]["type"], "Deposited");
    assert_eq!(shown["event"]["data"], json!({ "amount": -1 }));
    assert!(shown["event"]["metadata"].is_object(), "{shown}");
    assert!(shown["error"].as_str().unwrap().contains("CHECK"), "{shown}");
    assert_eq!(shown["attempts"], 1);
    assert!(chrono::DateTime::parse_from_rfc3339(shown["parked_at"].as_str().unwrap()).is_ok());
    failed(&annal(&setup, &["dead-letters", "show", "ledger", "999"]), "999");
    // Retried while the "bug" is still there: they fail again and stay parked.
    failed(&annal(&setup, &["dead-letters", "retry", "ledger", "--all"]), "dead letters are still parked");
    // Fix the "bug" (allow negative amounts), then retry one stream, skip one, retry the rest.
    sqlx::query("DROP TABLE ledger").execute(setup.store.writer()).await.unwrap();
    sqlx::query("CREATE TABLE ledger (event_id BLOB PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL)")
        .execute(setup.store.writer())
        .await
        .unwrap();
    ok(&annal(&setup, &["dead-letters", "retry", "ledger", "--stream", "account-2"]));
    assert_eq!(scalar(&setup.store, "SELECT coalesce(sum(amount), 0) FROM ledger").await, -2);
    ok(&annal(&setup, &["dead-letters", "skip", "ledger", &ids[0].to_string()]));
    ok(&annal(&setup, &["dead-letters", "retry", "ledger", "--all"]));
    assert_eq!(scalar(&setup.store, "SELECT coalesce(sum(amount), 0) FROM ledger").await, -5);
    assert_eq!(ok(&annal(&setup, &["dead-letters", "list", "ledger"])).lines().count(), 1);
    failed(&annal(&setup, &["dead-letters", "retry", "ledger"]), "<ID>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_read_and_tail() {
    let setup = setup().await;
    deposit(&setup.store, 1, &[1, 2, 3]).await;
    deposit(&setup.store, 2, &[4]).await;
    let other = StreamName::new("order-9").unwrap();
    setup.store.append(&other, ExpectedVersion::Any, vec![NewEvent::new("Placed", json!({}))]).await.unwrap();
    let streams = ok(&annal(&setup, &["streams"]));
    let rows: Vec<Vec<&str>> = streams.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows, [["account", "account-1", "3"], ["account", "account-2", "1"], ["order", "order-9", "1"]]);
    assert_eq!(ok(&annal(&setup, &["streams", "--category", "order"])).lines().count(), 2);
    let read = ok(&annal(&setup, &["read", "account-1", "--from", "1"]));
    let events: Vec<Value> = read.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.iter().map(|e| e["data"]["amount"].as_i64().unwrap()).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(events[0]["version"], 1);
    failed(&annal(&setup, &["read", "account-404"]), "no stream named \"account-404\"");
    failed(&annal(&setup, &["read", ""]), "invalid stream name \"\"");
    // tail --filter: only new events of the category, as they are appended.
    let mut tail = runner()
        .args(["tail", "--filter", "order", "--config"])
        .arg(&setup.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap());
    let mut err = BufReader::new(tail.stderr.take().unwrap());
    // Tail announces that it follows from the head, then appends are seen.
    read_until(&mut err, "following");
    deposit(&setup.store, 1, &[7]).await;
    setup.store.append(&other, ExpectedVersion::Any, vec![NewEvent::new("Shipped", json!({}))]).await.unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((event["stream"].as_str(), event["type"].as_str()), (Some("order-9"), Some("Shipped")));
    stop(tail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_only_and_listen() {
    let setup = setup().await;
    deposit(&setup.store, 1, &[5]).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let (child, mut stderr) = run(&setup, &["--only", "audit", "--listen", &listen]);
    read_until(&mut stderr, &listen);
    assert!(std::net::TcpStream::connect(&listen).is_ok());
    assert!(std::net::TcpStream::connect(&setup.listen).is_err(), "the configured address is overridden");
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar(&setup.store, "SELECT count(*) FROM audit").await != 1 {
        assert!(Instant::now() < deadline, "audit never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: Value = serde_json::from_str(&ok(&annal(&setup, &["status", "--json"]))).unwrap();
    let ledger = status["partitions"].as_array().unwrap().iter().find(|r| r["projection"] == "ledger").unwrap().clone();
    assert_eq!(ledger["lease"], Value::Null, "ledger was not run: {status}");
    stop(child);
    let (mut child, mut stderr) = run(&setup, &["--only", "nope"]);
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    assert!(!child.wait().unwrap().success() && text.contains("no projection named \"nope\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_in_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("annal.toml");
    std::fs::write(&config, format!("database = \"sqlite://${{ANNAL_TEST_DIR}}/events.db\"\n{LEDGER}")).unwrap();
    let migrate = runner().args(["migrate", "-c"]).arg(&config).env("ANNAL_TEST_DIR", dir.path()).output().unwrap();
    assert!(ok(&migrate).contains("up to date"));
    assert!(dir.path().join("events.db").exists());
    let with = runner().args(["check", "-c"]).arg(&config).env("ANNAL_TEST_DIR", dir.path()).output().unwrap();
    assert!(ok(&with).contains("valid"));
    let without = runner().args(["check", "-c"]).arg(&config).env_remove("ANNAL_TEST_DIR").output().unwrap();
    failed(&without, "line 1: environment variable ANNAL_TEST_DIR is not set");
}

#[test]
fn connection_errors_name_the_file_or_host_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("annal.toml");
    std::fs::write(&config, "database = \"sqlite:///no/such/dir/events.db\"\n").unwrap();
    let output = runner().args(["status", "-c"]).arg(&config).output().unwrap();
    failed(&output, "SQLite database /no/such/dir/events.db does not exist");
    let output = runner().args(["migrate", "-c"]).arg(&config).output().unwrap();
    failed(&output, "/no/such/dir/events.db");
    failed(&output, "unable to open database file");
    #[cfg(feature = "postgres")]
    {
        // Nothing listens on port 1: refused at once, not after a 30 s pool timeout.
        std::fs::write(&config, "database = \"postgres://app@127.0.0.1:1/app\"\n").unwrap();
        let started = Instant::now();
        let output = runner().args(["status", "-c"]).arg(&config).output().unwrap();
        failed(&output, "PostgreSQL at 127.0.0.1:1");
        failed(&output, "refused");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_the_command_quietly() {
    let setup = setup().await;
    // More output than a pipe holds, so the command must write into a closed pipe.
    deposit(&setup.store, 1, &vec![5; 3000]).await;
    let mut child = runner()
        .args(["read", "account-1", "--limit", "3000", "-c"])
        .arg(&setup.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    drop(out);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.is_empty(), "{:?}: {stderr}", output.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_progress_is_logged_without_a_terminal() {
    let setup = setup().await;
    deposit(&setup.store, 1, &[5, 6, 7]).await;
    ok(&annal(&setup, &["migrate"]));
    let output = annal(&setup, &["rebuild", "ledger", "--in-place"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ok(&output);
    assert!(stderr.contains("rebuild progress") && stderr.contains("total=3"), "{stderr}");
    assert!(stderr.contains("rebuild replayed every event"), "{stderr}");
    assert_eq!(scalar(&setup.store, "SELECT count(*) FROM ledger").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_failure_of_an_event_is_logged_at_warn() {
    let setup = setup().await;
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        text.replacen("retry_attempts = 1", "retry_attempts = 3\nretry_initial_ms = 600000", 1),
    )
    .unwrap();
    deposit(&setup.store, 1, &[-1]).await;
    let (child, mut stderr) = run(&setup, &[]);
    // Logged before the ten-minute back-off, not after it.
    let log = read_until(&mut stderr, "event failed; retrying");
    assert!(log.lines().last().unwrap().contains("WARN"), "{log}");
    stop(child);
}
