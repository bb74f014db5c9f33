//! What operators see of a running `annal-runner`: `/metrics` scraped and parsed, and
//! `/health/ready` failing with each of its reasons.
#![cfg(feature = "sqlite")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::SqliteEventStore;
use serde_json::{Value, json};

/// A ledger whose handler refuses negative amounts: `amount = -1` is a poison event.
#[path = "support/local.rs"]
mod local;

const LEDGER: &str = r#"
[[projection]]
name = "ledger"
categories = ["account"]
batch_size = 10
RETRY
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, account TEXT NOT NULL, amount INTEGER NOT NULL CHECK (amount > 0))"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, account, amount) VALUES (:event_id, :stream_id, :data ->> 'amount')"
"#;

struct Runner {
    _dir: tempfile::TempDir,
    address: String,
    _child: local::KillOnDrop,
}

use local::free_port;

/// Starts `run` on a fresh SQLite database with `extra` top-level settings and `retry` lines in
/// the projection.
async fn start(extra: &str, retry: &str) -> (Runner, SqliteEventStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let address = format!("127.0.0.1:{}", free_port());
    let text = format!(
        "database = \"sqlite://{}\"\nlisten = \"{address}\"\nlease_seconds = 1.0\n{extra}\n{}",
        db.display(),
        LEDGER.replace("RETRY", retry)
    );
    std::fs::write(&config, text).unwrap();
    let store = SqliteEventStore::open(&db).await.unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_annal-runner"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runner = Runner { _dir: dir, address, _child: local::KillOnDrop(child) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&runner.address, "/health/live").is_none() {
        assert!(Instant::now() < deadline, "the runner never answered /health/live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (runner, store)
}

/// GET `path`: the status code and body, or `None` if nothing listens yet.
fn get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // The body may be chunked: keep the JSON or text lines, not the chunk sizes.
    let body = if response.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    Some((status, body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

async fn deposit(store: &SqliteEventStore, account: u32, amounts: &[i64]) {
    local::deposit(store, &local::account(account), amounts).await;
}

/// A parsed Prometheus text exposition: `name{labels}` → value, with the `# TYPE` of each name.
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                scrape.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"));
            let name = series.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad metric name in {line:?}");
            scrape.samples.insert(series.to_owned(), value);
        }
        scrape
    }

    /// The value of the one series of `name` whose labels include every one of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(series, _)| {
                series.split('{').next() == Some(name)
                    && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(matching.len() <= 1, "{name} {labels:?} matches several series: {self:#?}");
        matching.first().copied()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|s| s.split('{').next() == Some(name))
    }
}

async fn scrape_until(runner: &Runner, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = get(&runner.address, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200, "{text}");
        let scrape = Scrape::parse(&text);
        if done(&scrape) {
            return scrape;
        }
        assert!(Instant::now() < deadline, "never saw {what} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_counters_gauges_and_histograms() {
    let (runner, store) = start("", "retry_attempts = 2\nretry_initial_ms = 1").await;
    // Nothing applied yet: gauges, but no latency histogram (no fake p99 of 0).
    let idle = scrape_until(&runner, "the lease gauge", |s| {
        s.value("annal_projection_lease_held", &[("projection", "ledger"), ("partition", "0")]) == Some(1.0)
    })
    .await;
    assert!(!idle.has("annal_projection_latency_seconds_bucket"), "{idle:#?}");
    assert_eq!(idle.value("annal_projection_running", &[("projection", "ledger")]), Some(1.0));
    assert_eq!(idle.value("annal_log_readable", &[]), Some(1.0));
    // The store's append histogram is there before any append: registered at start.
    assert_eq!(
        idle.types.get("annal_store_append_duration_seconds").map(String::as_str),
        Some("histogram"),
        "{idle:#?}"
    );
    let appends = [("backend", "sqlite"), ("outcome", "ok")];
    assert_eq!(idle.value("annal_store_append_duration_seconds_count", &appends), Some(0.0), "{idle:#?}");

    deposit(&store, 1, &[5, 7, 9]).await;
    deposit(&store, 2, &[-1]).await;
    let part = [("projection", "ledger"), ("partition", "0")];
    let scrape = scrape_until(&runner, "three applied and one parked", |s| {
        s.value("annal_projection_events_parked_total", &part) == Some(1.0)
            && s.value("annal_projection_events_applied_total", &part) == Some(3.0)
            && s.value("annal_projection_events_behind", &part) == Some(0.0)
    })
    .await;
    // The poison event failed twice (as part of its batch, then alone), was retried once.
    assert!(scrape.value("annal_projection_events_failed_total", &part).unwrap() >= 2.0, "{scrape:#?}");
    assert_eq!(scrape.value("annal_projection_events_retried_total", &part), Some(1.0));
    assert_eq!(scrape.value("annal_projection_dead_letters", &part), Some(1.0));
    assert_eq!(scrape.value("annal_projection_checkpoint_position", &part), Some(4.0));
    assert_eq!(scrape.value("annal_log_head_position", &[]), Some(4.0));
    assert!(scrape.value("annal_projection_seconds_behind", &part).is_some());
    assert_eq!(scrape.types["annal_projection_events_applied_total"], "counter");
    assert_eq!(scrape.types["annal_projection_events_behind"], "gauge");
    // Histograms with buckets, labelled by phase: cumulative bucket counts end at the count.
    assert_eq!(scrape.types["annal_projection_latency_seconds"], "histogram");
    assert_eq!(scrape.types["annal_projection_batch_duration_seconds"], "histogram");
    let live = [("projection", "ledger"), ("partition", "0"), ("phase", "live")];
    let count = scrape.value("annal_projection_latency_seconds_count", &live).expect("a live latency count");
    assert_eq!(count, 3.0);
    let le = |bound: &str| {
        let mut labels = live.to_vec();
        labels.push(("le", bound));
        scrape.value("annal_projection_latency_seconds_bucket", &labels).expect("a bucket")
    };
    assert!(le("0.001") <= le("1") && le("1") <= le("+Inf"), "{scrape:#?}");
    assert_eq!(le("+Inf"), count);
    assert!(scrape.value("annal_projection_batch_duration_seconds_count", &live).unwrap() >= 1.0);
    assert!(scrape.value("annal_store_oldest_transaction_seconds", &[]).is_some());
    drop(runner);
}

async fn ready_until(runner: &Runner, reason: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&runner.address, "/health/ready").expect("/health/ready answers");
        let json: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
        let reasons = json["reasons"].as_array().cloned().unwrap_or_default();
        if let Some(found) = reasons.iter().find(|r| r["reason"] == reason) {
            assert_eq!(status, 503, "{body}");
            assert_eq!(json["status"], "not_ready");
            // /health is the same check.
            let (alias, _) = get(&runner.address, "/health").unwrap();
            assert_eq!(alias, 503);
            return found.clone();
        }
        assert!(Instant::now() < deadline, "/health/ready never gave {reason}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(runner: &Runner) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&runner.address, "/health/ready").unwrap();
        if status == 200 {
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "ready");
            assert_eq!(get(&runner.address, "/health").unwrap().0, 200);
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_when_a_projection_stops() {
    let (runner, store) = start("", "retry_attempts = 1\non_failure = \"stop\"").await;
    ready(&runner).await;
    deposit(&store, 1, &[-1]).await;
    let reason = ready_until(&runner, "stopped").await;
    assert_eq!(reason["projection"], "ledger");
    assert_eq!(get(&runner.address, "/health/live").unwrap().0, 200, "a stopped projection is no reason to restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_when_the_log_cannot_be_read() {
    let (runner, store) = start("", "").await;
    ready(&runner).await;
    sqlx::query("ALTER TABLE annal_events RENAME TO annal_events_gone").execute(store.writer()).await.unwrap();
    let reason = ready_until(&runner, "log_unreadable").await;
    assert!(reason["error"].as_str().unwrap().contains("annal_events"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_past_the_lag_thresholds() {
    // The poison event is retried after a minute: the partition stays behind meanwhile.
    let health = "[health]\nmax_events_behind = 0\nmax_seconds_behind = 0.5";
    let (runner, store) = start(health, "retry_attempts = 7\nretry_initial_ms = 600000").await;
    ready(&runner).await;
    deposit(&store, 1, &[-1, 5]).await;
    let reason = ready_until(&runner, "events_behind").await;
    assert_eq!(
        (reason["projection"].clone(), reason["events_behind"].clone(), reason["max"].clone()),
        (json!("ledger"), json!(2), json!(0))
    );
    let reason = ready_until(&runner, "seconds_behind").await;
    assert!(reason["seconds_behind"].as_f64().unwrap() > 0.5, "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_past_the_dead_letter_threshold() {
    let (runner, store) = start("[health]\nmax_dead_letters = 1", "retry_attempts = 1").await;
    ready(&runner).await;
    deposit(&store, 1, &[-1]).await;
    // One dead letter is tolerated...
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrape = Scrape::parse(&get(&runner.address, "/metrics").unwrap().1);
        if scrape.value("annal_projection_dead_letters", &[("projection", "ledger")]) == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&runner.address, "/health/ready").unwrap().0, 200);
    // ...two are not.
    deposit(&store, 2, &[-2]).await;
    let reason = ready_until(&runner, "dead_letters").await;
    assert_eq!((reason["dead_letters"].clone(), reason["max"].clone()), (json!(2), json!(1)));
}
