//! Read-only commands on SQLite never write: on a missing file they fail, saying to run
//! `annal-runner migrate`, and create nothing; a relative path is relative to the
//! configuration file, wherever the command runs from; a schema that is missing or older is
//! refused (naming the migrations) and left as it was; on an up-to-date file, every read-only
//! command works and leaves the file's bytes as they were. And an event the store cannot decode
//! does not break `status`, `streams`, `read` or `tail`: it is reported in its place.
#![cfg(feature = "sqlite")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::{Value, json};

#[path = "support/local.rs"]
mod local;

const LEDGER: &str = r#"
[[projection]]
name = "ledger"
categories = ["account"]
retry_attempts = 1
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount > 0))"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, amount) VALUES (:event_id, :data ->> 'amount')"
"#;

/// Every read-only command, with the arguments it needs (`ID` stands for a dead letter's id).
const READ_ONLY: &[&[&str]] = &[
    &["status"],
    &["status", "--json", "ledger"],
    &["check"],
    &["streams"],
    &["read", "account-1"],
    &["dead-letters", "list", "ledger"],
    &["dead-letters", "show", "ledger", "ID"],
];

/// A configuration naming the database by a path relative to its own directory.
fn config_in(dir: &Path) -> PathBuf {
    let config = dir.join("annal.toml");
    let text = format!(
        "database = \"sqlite://shop.db\"\nlisten = \"127.0.0.1:{}\"\nlease_seconds = 1.0\n{LEDGER}",
        local::free_port()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Runs a command from `cwd`.
fn annal(cwd: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_annal-runner")).current_dir(cwd).arg("-c").arg(config).args(args).output().unwrap()
}

fn ok(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failed(output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded, expected {expected:?}: {}", String::from_utf8_lossy(&output.stdout));
    for text in expected {
        assert!(stderr.contains(text), "expected {text:?} in {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn with_id<'a>(args: &[&'a str], id: &'a str) -> Vec<&'a str> {
    args.iter().map(|a| if *a == "ID" { id } else { a }).collect()
}

/// The first `n` lines `tail --from-start` prints (fewer if it ends first); then it is killed.
fn tail_lines(cwd: &Path, config: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let mut child = local::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_annal-runner"))
            .current_dir(cwd)
            .arg("-c")
            .arg(config)
            .args(["tail", "--from-start"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut lines = Vec::new();
    while lines.len() < n {
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            break;
        }
        lines.push(line);
    }
    Ok(lines)
}

/// The first line `tail --from-start` prints (empty if it prints none).
fn tail_first_line(cwd: &Path, config: &Path) -> std::io::Result<String> {
    Ok(tail_lines(cwd, config, 1)?.pop().unwrap_or_default())
}

/// Runs `annal-runner run` until `parked` finds a dead letter's id, then stops it with SIGTERM
/// (it must exit cleanly) and returns that id.
async fn run_until_parked<F, Fut>(config: &Path, mut parked: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<i64>>,
{
    let mut run = local::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_annal-runner"))
            .arg("-c")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some(id) = parked().await {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "the poison deposit was never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(Command::new("kill").arg("-TERM").arg(run.0.id().to_string()).status().unwrap().success());
    assert!(run.0.wait().unwrap().success());
    id
}

#[test]
fn a_missing_file_is_an_error_and_never_created_wherever_the_command_runs() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let config = config_in(home.path());
    let write_commands: &[&[&str]] =
        &[&["rebuild", "ledger"], &["dead-letters", "retry", "ledger", "1"], &["dead-letters", "skip", "ledger", "1"]];
    for args in READ_ONLY.iter().chain(write_commands) {
        let output = annal(elsewhere.path(), &config, &with_id(args, "1"));
        let expected = home.path().join("shop.db");
        failed(
            &output,
            &[&format!("SQLite database {} does not exist", expected.display()), "run `annal-runner migrate`"],
        );
    }
    let line = tail_first_line(elsewhere.path(), &config).unwrap();
    assert!(line.is_empty(), "tail printed {line:?}");
    for dir in [home.path(), elsewhere.path()] {
        let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(files.iter().all(|f| f == "annal.toml"), "created: {files:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_older_schema_is_refused_and_left_as_it_was() {
    let home = tempfile::tempdir().unwrap();
    let config = config_in(home.path());
    let file = home.path().join("shop.db");
    // A SQLite file that is no event store yet.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&file).create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query("CREATE TABLE unrelated (x INTEGER)").execute(&pool).await.unwrap();
    pool.close().await;
    let before = std::fs::read(&file).unwrap();
    for args in READ_ONLY {
        let output = annal(home.path(), &config, &with_id(args, "1"));
        failed(&output, &["is not set up for this runner", "run `annal-runner migrate`", "annal_migrations"]);
    }
    assert_eq!(std::fs::read(&file).unwrap(), before, "a read-only command changed the file");
    // The event store's tables, not the projection store's: named as missing.
    SqliteEventStore::open(&file).await.unwrap().close().await;
    for args in READ_ONLY {
        let output = annal(home.path(), &config, &with_id(args, "1"));
        failed(
            &output,
            &["projection store is not set up", "run `annal-runner migrate`", "annal_projection_migrations"],
        );
    }
    // Migrated, then the last projection migration forgotten: an older schema.
    ok(&annal(home.path(), &config, &["migrate"]));
    let store = SqliteEventStore::open(&file).await.unwrap();
    let last: i64 = sqlx::query_scalar("SELECT max(version) FROM annal_projection_migrations")
        .fetch_one(store.writer())
        .await
        .unwrap();
    sqlx::query("DELETE FROM annal_projection_migrations WHERE version = ?1")
        .bind(last)
        .execute(store.writer())
        .await
        .unwrap();
    store.close().await;
    let output = annal(home.path(), &config, &["status"]);
    failed(&output, &["run `annal-runner migrate`", &format!("migrations [{last}] of annal_projection_migrations")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_work_from_anywhere_and_leave_the_file_as_it_was() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let config = config_in(home.path());
    // `migrate` run from elsewhere creates the file beside the configuration.
    ok(&annal(elsewhere.path(), &config, &["migrate"]));
    let file = home.path().join("shop.db");
    assert!(file.exists() && !elsewhere.path().join("shop.db").exists());
    let store = SqliteEventStore::open(&file).await.unwrap();
    local::deposit(&store, &local::account(1), &[5, -1, 7]).await;
    // A run parks the poison deposit, so that there is a dead letter to list and show.
    let id = run_until_parked(&config, || async {
        sqlx::query_scalar("SELECT min(id) FROM annal_dead_letters").fetch_one(store.writer()).await.unwrap()
    })
    .await;
    store.close().await;
    let wal = home.path().join("shop.db-wal");
    let wal_bytes = || std::fs::read(&wal).unwrap_or_default();
    let (before, wal_before) = (std::fs::read(&file).unwrap(), wal_bytes());
    for args in READ_ONLY {
        let out = ok(&annal(elsewhere.path(), &config, &with_id(args, &id)));
        assert!(!out.is_empty(), "{args:?} printed nothing");
    }
    let status: Value =
        serde_json::from_str(&ok(&annal(elsewhere.path(), &config, &["status", "--json", "ledger"]))).unwrap();
    // The poison deposit, and the later one of its stream parked behind it.
    assert_eq!(status["partitions"][0]["dead_letters"], 2, "{status}");
    let line = tail_first_line(elsewhere.path(), &config).unwrap();
    assert!(line.contains("account-1"), "{line}");
    assert_eq!(std::fs::read(&file).unwrap(), before, "a read-only command changed the file");
    assert!(wal_bytes() == wal_before, "a read-only command wrote to the WAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_event_is_reported_in_its_place_by_status_streams_read_and_tail() {
    let home = tempfile::tempdir().unwrap();
    let config = config_in(home.path());
    ok(&annal(home.path(), &config, &["migrate"]));
    let store = SqliteEventStore::open(home.path().join("shop.db")).await.unwrap();
    // Written by hand, first in the log: data that is not JSON.
    sqlx::query(
        "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, \
         recorded_at, stream_hash) VALUES (?1, 'account-1', 'account', 0, 'Deposited', 1, 'not json', '{}', 0, 0)",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(store.writer())
    .await
    .unwrap();
    let s = StreamName::new("account-1").unwrap();
    store
        .append(&s, ExpectedVersion::Exact(0), vec![NewEvent::new("Deposited", json!({ "amount": 5 }))])
        .await
        .unwrap();
    unreadable_in_its_place(home.path(), &config);
}

/// The checks of an unreadable first event of `account-1`, followed by one good one.
fn unreadable_in_its_place(cwd: &Path, config: &Path) {
    let status: Value = serde_json::from_str(&ok(&annal(cwd, config, &["status", "--json", "ledger"]))).unwrap();
    assert_eq!(status["partitions"][0]["events_behind"], 2, "{status}");
    let streams = ok(&annal(cwd, config, &["streams"]));
    assert!(streams.lines().any(|l| l.contains("account-1") && l.trim_end().ends_with(" 2")), "{streams}");
    let read = ok(&annal(cwd, config, &["read", "account-1"]));
    let lines: Vec<Value> = read.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{read}");
    assert!(lines[0]["unreadable"].is_string() && lines[0]["version"] == 0, "{read}");
    assert_eq!(lines[1]["data"]["amount"], 5, "{read}");
    let lines = tail_lines(cwd, config, 2).unwrap();
    assert_eq!(lines.len(), 2, "tail ended after {lines:?}");
    let tail: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(tail[0]["unreadable"].is_string() && tail[1]["data"]["amount"] == 5, "{tail:?}");
}

#[cfg(feature = "postgres")]
#[path = "support/runner_pg.rs"]
mod support;

#[cfg(feature = "postgres")]
mod postgres {
    //! The same rules on PostgreSQL, with a role that has `SELECT` rights and nothing more.
    use super::*;
    use sqlx::{AssertSqlSafe, PgPool};

    /// A fresh, empty schema; the admin's URL and pool on it.
    async fn schema() -> (String, String, PgPool) {
        let base = support::database_url();
        let schema = format!("ro_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&base).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
        admin.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
        let pool = PgPool::connect(&url).await.unwrap();
        (schema, url, pool)
    }

    /// A role that may connect and read the schema's tables, and nothing else; its URL.
    async fn reader(pool: &PgPool, schema: &str, url: &str) -> String {
        let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
        for statement in [
            format!("CREATE ROLE {role} LOGIN"),
            format!(
                "GRANT CONNECT ON DATABASE {} TO {role}",
                url.rsplit('/').next().unwrap().split('?').next().unwrap()
            ),
            format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}"),
        ] {
            sqlx::query(AssertSqlSafe(statement)).execute(pool).await.unwrap();
        }
        let (scheme, rest) = url.split_once("://").unwrap();
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{role}@{host}")
    }

    fn config(dir: &Path, name: &str, url: &str) -> PathBuf {
        let config = dir.join(format!("{name}.toml"));
        let text = format!(
            "database = \"{url}\"\nlisten = \"127.0.0.1:{}\"\nlease_seconds = 1.0\n{}",
            local::free_port(),
            LEDGER.replace("BLOB", "uuid")
        );
        std::fs::write(&config, text.replace(":data ->> 'amount'", "(:data ->> 'amount')::bigint")).unwrap();
        config
    }

    async fn table_count(pool: &PgPool, schema: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1")
            .bind(schema)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_only_role_runs_every_read_only_command_and_a_missing_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (schema, url, pool) = schema().await;
        let admin = config(dir.path(), "admin", &url);
        // Nothing there yet: refused, and nothing created.
        for args in READ_ONLY {
            failed(
                &annal(dir.path(), &admin, &with_id(args, "1")),
                &["is not set up for this runner", "run `annal-runner migrate`", "annal_migrations"],
            );
        }
        assert_eq!(table_count(&pool, &schema).await, 0, "a read-only command created tables");
        ok(&annal(dir.path(), &admin, &["migrate"]));
        let events = annal_eventstore::PgEventStore::from_pool(pool.clone()).await.unwrap();
        let s = StreamName::new("account-1").unwrap();
        let deposits = [5, -1, 7].map(|amount| NewEvent::new("Deposited", json!({ "amount": amount })));
        events.append(&s, ExpectedVersion::NoStream, deposits.to_vec()).await.unwrap();
        let id = run_until_parked(&admin, || async {
            sqlx::query_scalar("SELECT min(id)::bigint FROM annal_dead_letters").fetch_one(&pool).await.unwrap()
        })
        .await;
        let reader = config(dir.path(), "reader", &reader(&pool, &schema, &url).await);
        for args in READ_ONLY {
            let out = ok(&annal(dir.path(), &reader, &with_id(args, &id)));
            assert!(!out.is_empty(), "{args:?} printed nothing");
        }
        let line = tail_first_line(dir.path(), &reader).unwrap();
        assert!(line.contains("account-1"), "{line}");
        // The role really cannot write: a command that writes fails on a permission.
        failed(&annal(dir.path(), &reader, &["dead-letters", "skip", "ledger", &id]), &["permission denied"]);
        // An older schema: the last projection migration forgotten.
        let last: i64 =
            sqlx::query_scalar("SELECT max(version) FROM annal_projection_migrations").fetch_one(&pool).await.unwrap();
        sqlx::query("DELETE FROM annal_projection_migrations WHERE version = $1")
            .bind(last)
            .execute(&pool)
            .await
            .unwrap();
        failed(
            &annal(dir.path(), &reader, &["status"]),
            &["run `annal-runner migrate`", &format!("migrations [{last}] of annal_projection_migrations")],
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_event_is_reported_in_its_place_on_postgres() {
        let dir = tempfile::tempdir().unwrap();
        let (_, url, pool) = schema().await;
        let config = config(dir.path(), "unreadable", &url);
        ok(&annal(dir.path(), &config, &["migrate"]));
        let events = annal_eventstore::PgEventStore::from_pool(pool.clone()).await.unwrap();
        // Written by hand, first in the log: JSON too deep for any decoder.
        let deep = format!("{}1{}", "[".repeat(150), "]".repeat(150));
        sqlx::query(
            "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, \
             stream_hash) VALUES ($1, 'account-1', 'account', 0, 'Deposited', 1, $2::jsonb, '{}', 0)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(deep)
        .execute(&pool)
        .await
        .unwrap();
        let s = StreamName::new("account-1").unwrap();
        events
            .append(&s, ExpectedVersion::Exact(0), vec![NewEvent::new("Deposited", json!({ "amount": 5 }))])
            .await
            .unwrap();
        unreadable_in_its_place(dir.path(), &config);
    }
}
