//! Helpers for the tests that run `annal-runner` processes against PostgreSQL.
#![allow(dead_code, unreachable_pub)]

pub use std::path::PathBuf;
pub use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
pub use std::time::{Duration, Instant};

pub use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, PgEventStore, StreamName};
pub use serde_json::json;
pub use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub const PATIENCE: Duration = Duration::from_secs(90);

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("these tests need DATABASE_URL: run scripts/test, which starts a throwaway PostgreSQL")
    })
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub pool: PgPool,
    pub events: PgEventStore,
}

/// A fresh schema, an event store in it, and a URL that points runners at it.
pub async fn setup() -> Setup {
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
    pub fn config(&self, name: &str, body: &str) -> PathBuf {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!("database = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nlease_seconds = 1.0\n{body}", self.url);
        std::fs::write(&path, text).unwrap();
        path
    }

    pub async fn ledger(&self) -> (i64, i64) {
        sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::bigint FROM ledger")
            .fetch_one(&self.pool)
            .await
            .unwrap_or((0, 0))
    }

    pub async fn until(&self, what: &str, check: impl Fn((i64, i64)) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        // Runners are other processes: their progress can only be polled.
        while !check(self.ledger().await) {
            assert!(Instant::now() < deadline, "{what}: the ledger stayed at {:?}", self.ledger().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Appends `count` deposits over `accounts` accounts, in 10-event batches; returns the sum.
    pub async fn deposit(&self, accounts: usize, count: usize, amount: impl Fn(usize) -> i64) -> i64 {
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

pub fn ledger_config(extra: &str) -> String {
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
pub fn start(config: &PathBuf) -> Child {
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

pub fn annal(config: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_annal-runner")).arg("--config").arg(config).args(args).output().unwrap()
}

pub fn terminate(mut child: Child) {
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success(), "a runner did not stop cleanly on SIGTERM");
}

pub async fn lease_owners(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT owner FROM annal_leases WHERE expires_at > clock_timestamp() ORDER BY partition")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

/// The value of the unlabelled gauge `name` on the `/metrics` of the runner run with `config`,
/// or `None` while it does not answer (or shows no such gauge).
pub fn gauge(config: &PathBuf, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let text = std::fs::read_to_string(config).unwrap();
    let address = text.lines().find_map(|l| l.strip_prefix("listen = \"")?.strip_suffix('"')).unwrap().to_owned();
    let mut stream = std::net::TcpStream::connect(&address).ok()?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
