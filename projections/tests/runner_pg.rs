//! `annal-runner` processes on PostgreSQL: three share a partitioned projection and one is
//! killed; a poison event is parked, then retried once after the fix; the server restarts under
//! a running runner. Needs the throwaway server of `scripts/test` (it restarts it).
#![cfg(feature = "runner")]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, PgEventStore, StreamName};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

const PATIENCE: Duration = Duration::from_secs(90);

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("these tests need DATABASE_URL: run scripts/test, which starts a throwaway PostgreSQL")
    })
}

struct Setup {
    dir: tempfile::TempDir,
    url: String,
    pool: PgPool,
    events: PgEventStore,
}

/// A fresh schema, an event store in it, and a URL that points runners at it.
async fn setup() -> Setup {
    let base = database_url();
    let schema = format!("runner_{}", uuid::Uuid::new_v4().simple());
    let admin = PgPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    admin.close().await;
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
    let options = PgConnectOptions::from_str(&url).unwrap();
    let pool = PgPoolOptions::new().max_connections(5).connect_with(options).await.unwrap();
    let events = PgEventStore::from_pool(pool.clone()).await.unwrap();
    Setup { dir: tempfile::tempdir().unwrap(), url, pool, events }
}

impl Setup {
    fn config(&self, name: &str, body: &str) -> PathBuf {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!("database = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nlease_seconds = 1.0\n{body}", self.url);
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn ledger(&self) -> (i64, i64) {
        sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::bigint FROM ledger")
            .fetch_one(&self.pool)
            .await
            .unwrap_or((0, 0))
    }

    async fn until(&self, what: &str, check: impl Fn((i64, i64)) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        // Runners are other processes: their progress can only be polled.
        while !check(self.ledger().await) {
            assert!(Instant::now() < deadline, "{what}: the ledger stayed at {:?}", self.ledger().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Appends `count` deposits over `accounts` accounts, in 10-event batches; returns the sum.
    async fn deposit(&self, accounts: usize, count: usize, amount: impl Fn(usize) -> i64) -> i64 {
        let mut total = 0;
        for start in (0..count).step_by(10) {
            let batch: Vec<NewEvent> = (start..start + 10)
                .map(|i| {
                    total += amount(i);
                    NewEvent::new("Deposited", json!({ "amount": amount(i) }))
                })
                .collect();
            let stream = StreamName::from_parts("account", (start / 10) % accounts).unwrap();
            self.events.append(&stream, ExpectedVersion::Any, batch).await.unwrap();
        }
        total
    }
}

fn ledger_config(extra: &str) -> String {
    format!(
        r#"
[[projection]]
name = "ledger"
categories = ["account"]
{extra}
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id uuid PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL CONSTRAINT positive CHECK (amount > 0))"]

[projection.handlers]
Deposited = "INSERT INTO ledger VALUES (:event_id, :stream_id, (:data ->> 'amount')::bigint)"
"#
    )
}

/// Starts a runner; its log goes beside its configuration, for when a test fails.
fn start(config: &PathBuf) -> Child {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_annal-runner"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn annal(config: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_annal-runner")).arg("--config").arg(config).args(args).output().unwrap()
}

fn terminate(mut child: Child) {
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success(), "a runner did not stop cleanly on SIGTERM");
}

async fn lease_owners(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT owner FROM annal_leases WHERE expires_at > clock_timestamp() ORDER BY partition")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runners_share_partitions_and_survive_one_killed() {
    let setup = setup().await;
    // One configuration per runner: each serves /metrics on a port of its own.
    let configs: Vec<PathBuf> =
        (0..3).map(|i| setup.config(&format!("shared{i}"), &ledger_config("partitions = 6"))).collect();
    let config = configs[0].clone();
    let mut total = setup.deposit(30, 1500, |i| (i % 50) as i64 + 1).await;
    let mut runners: Vec<Child> = configs.iter().map(start).collect();
    // Each runner ends up with two of the six partitions.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let owners = lease_owners(&setup.pool).await;
        let mut distinct = owners.clone();
        distinct.sort();
        distinct.dedup();
        if owners.len() == 6 && distinct.len() == 3 {
            break;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> =
                configs.iter().map(|c| std::fs::read_to_string(c.with_extension("log")).unwrap_or_default()).collect();
            panic!("partitions never spread over three runners: {owners:?}\nlogs: {logs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    total += setup.deposit(30, 1500, |i| (i % 50) as i64 + 1).await;
    // Kill one without warning; the others take its partitions once its leases run out.
    let mut victim = runners.remove(0);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed_at = Instant::now();
    total += setup.deposit(30, 1500, |i| (i % 50) as i64 + 1).await;
    setup.until("after the kill", |(count, _)| count == 4500).await;
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(10), "the survivors took {took:?} to finish a 1 s lease's work");
    for runner in runners {
        terminate(runner);
    }
    assert_eq!(setup.ledger().await, (4500, total), "the read model differs from a replay");
    let dead = annal(&config, &["dead-letters", "list", "ledger"]);
    assert_eq!(String::from_utf8_lossy(&dead.stdout).lines().count(), 1, "nothing may be parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_parked_then_retried_once_after_the_fix() {
    let setup = setup().await;
    let config = setup.config("poison", &ledger_config("retry_attempts = 7\nretry_initial_ms = 5"));
    // Event 25 (in stream account-2, with events 20..30) violates the ledger's check.
    let total = setup.deposit(5, 100, |i| if i == 25 { -5 } else { 1 }).await;
    let runner = start(&config);
    // Everything but account-2 from event 25 on: 5 events of that batch and 10 of a later one.
    setup.until("flowing around the poison event", |(count, _)| count == 85).await;
    let output = annal(&config, &["dead-letters", "list", "ledger"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed = String::from_utf8_lossy(&output.stdout).to_string();
    let ids: Vec<i64> = listed.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    assert_eq!(ids.len(), 15, "the poison event and the later events of its stream:\n{listed}");
    assert!(listed.lines().nth(1).unwrap().contains("       7 "), "retried 7 times:\n{listed}");
    assert!(listed.contains("positive"), "the error is kept:\n{listed}");
    // Not fixed yet: the retry fails and changes nothing.
    assert!(!annal(&config, &["dead-letters", "retry", "ledger", &ids[0].to_string()]).status.success());
    // The fix, then every dead letter retried in order, each applied exactly once.
    sqlx::query("ALTER TABLE ledger DROP CONSTRAINT positive").execute(&setup.pool).await.unwrap();
    for id in &ids {
        let out = annal(&config, &["dead-letters", "retry", "ledger", &id.to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let again = annal(&config, &["dead-letters", "retry", "ledger", &id.to_string()]);
        assert!(!again.status.success(), "a second retry of {id} must find nothing");
    }
    assert_eq!(setup.ledger().await, (100, total));
    terminate(runner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_under_a_running_runner_loses_and_duplicates_nothing() {
    let (Ok(bindir), Ok(data)) = (std::env::var("ANNAL_PG_BINDIR"), std::env::var("ANNAL_PG_DATA")) else {
        panic!("this test restarts the server: run it through scripts/test (its throwaway PostgreSQL)");
    };
    let user = std::env::var("ANNAL_PG_USER").unwrap_or_default();
    let log = std::env::var("ANNAL_PG_LOG").unwrap_or_else(|_| format!("{data}/restart.log"));
    let setup = setup().await;
    let config = setup.config("restart", &ledger_config(""));
    let mut total = setup.deposit(10, 2000, |i| (i % 7) as i64 + 1).await;
    let runner = start(&config);
    setup.until("some progress", |(count, _)| count > 0).await;
    let pg_ctl = format!("{bindir}/pg_ctl");
    let args = ["-D", data.as_str(), "-l", log.as_str(), "-w", "-m", "fast", "restart"];
    let status = if user.is_empty() {
        Command::new(&pg_ctl).args(args).status()
    } else {
        Command::new("runuser").args(["-u", user.as_str(), "--", pg_ctl.as_str()]).args(args).status()
    };
    assert!(status.unwrap().success(), "could not restart PostgreSQL");
    // The test's own pool reconnects too; more events arrive after the restart.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let batch = vec![NewEvent::new("Deposited", json!({ "amount": 3 }))];
        match setup.events.append(&StreamName::new("account-x").unwrap(), ExpectedVersion::Any, batch).await {
            Ok(_) => {
                total += 3;
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "the server never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    total += setup.deposit(10, 1000, |i| (i % 7) as i64 + 1).await;
    setup.until("after the restart", |(count, _)| count == 3001).await;
    terminate(runner);
    assert_eq!(setup.ledger().await, (3001, total));
}
