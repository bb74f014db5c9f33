//! The console end to end in headless Chromium, driven over chromedriver's WebDriver protocol
//! (a few JSON requests, so no driver crate): the page loads, the lag chart follows appends, a
//! retry without the token is refused, and a retry with it reaches the read model; a pause
//! without the token is refused, with it the runner lets go, and a resume catches up; rebuild
//! records show as progress bars with their figures, and a stale one as stale.
//! `scripts/test` and `.ci/run` install Debian's `chromium` and `chromium-driver` when missing.
#![cfg(feature = "sqlite")]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::{SqliteEventStore, StreamName};
use annal_projections::ProjectionStore;
use serde_json::{Value, json};

#[path = "support/local.rs"]
mod local;

const CONFIG: &str = r#"
console_token = "letmein"

[[projection]]
name = "ledger"
retry_attempts = 1
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount > 0))"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, amount) VALUES (:event_id, :data ->> 'amount')"

# Held at its first event (a ten-minute back-off), so the events behind it grow with appends.
[[projection]]
name = "stuck"
categories = ["stuck"]
retry_attempts = 2
retry_initial_ms = 600000
setup = ["CREATE TABLE IF NOT EXISTS stuck (n INTEGER NOT NULL CHECK (n > 0))"]

[projection.handlers]
Deposited = "INSERT INTO stuck (n) VALUES (:data ->> 'amount')"
"#;

use local::KillOnDrop as Killed;

use local::free_port;

/// One HTTP/1.1 request with an optional JSON body; the status and the JSON answer, read by its
/// Content-Length (chromedriver keeps the connection open).
fn http(address: &str, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|n| n.trim().parse::<usize>().ok());
    let mut body = Vec::new();
    match length {
        Some(length) => {
            body.resize(length, 0);
            stream.read_exact(&mut body).ok()?;
        }
        None => {
            stream.read_to_end(&mut body).ok()?;
        }
    }
    Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

struct Browser {
    driver: String,
    session: String,
}

impl Browser {
    fn run(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        let (status, answer) = http(&self.driver, "POST", &path, Some(&json!({ "script": script, "args": [] })))
            .expect("chromedriver answers");
        assert_eq!(status, 200, "{script}: {answer}");
        answer["value"].clone()
    }

    /// Runs `script` until it returns something truthy.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = self.run(script);
            if !(value.is_null() || value == false || value == "") {
                return value;
            }
            assert!(Instant::now() < deadline, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn deposit(store: &SqliteEventStore, stream: &str, amounts: &[i64]) {
    local::deposit(store, &StreamName::new(stream).unwrap(), amounts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: scripts/test installs chromium and chromium-driver"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let address = format!("127.0.0.1:{}", free_port());
    std::fs::write(&config, format!("database = \"sqlite://{}\"\nlisten = \"{address}\"\n{CONFIG}", db.display()))
        .unwrap();
    let store = SqliteEventStore::open(&db).await.unwrap();
    deposit(&store, "account-1", &[-4]).await;
    deposit(&store, "stuck-1", &[-1]).await;
    let _runner = Killed(
        Command::new(env!("CARGO_BIN_EXE_annal-runner"))
            .args(["run", "-c"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver = format!("127.0.0.1:{}", free_port());
    let _chromedriver = Killed(
        Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={}", driver.rsplit(':').next().unwrap()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&driver, "GET", "/status", None).is_none_or(|(_, s)| s["value"]["ready"] != true)
        || http(&address, "GET", "/health/live", None).is_none()
    {
        assert!(Instant::now() < deadline, "chromedriver or the runner never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = dir.path().join("chromium-profile");
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,900",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let capabilities = json!({ "capabilities": { "alwaysMatch": {
        "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args } } } });
    let (status, session) = http(&driver, "POST", "/session", Some(&capabilities)).unwrap();
    assert_eq!(status, 200, "{session}");
    let browser = Browser { driver, session: session["value"]["sessionId"].as_str().unwrap().to_owned() };
    let url = json!({ "url": format!("http://{address}/") });
    assert_eq!(http(&browser.driver, "POST", &format!("/session/{}/url", browser.session), Some(&url)).unwrap().0, 200);

    // The lag chart: one event behind on the held projection, then four after three appends.
    browser.until("one event behind", "return document.getElementById('lagnow').dataset.behind === '1'").await;
    deposit(&store, "stuck-2", &[1, 2, 3]).await;
    browser.until("four events behind", "return document.getElementById('lagnow').dataset.behind === '4'").await;
    let drawn = browser.run("return history.some(p => p.behind === 1) && history.some(p => p.behind === 4)");
    assert_eq!(drawn, true, "the chart's history holds both");

    // A retry without the token is refused.
    browser.until("the dead letter", "return document.querySelector('.dead-letter .retry') !== null").await;
    browser.run("document.querySelector('.dead-letter .retry').click()");
    let refused = browser.until("a refusal", "return document.getElementById('result').textContent").await;
    assert!(refused.as_str().unwrap().contains("refused (401)"), "{refused}");

    // Fixed, then retried through the page with the token: the read model has the event.
    sqlx::query("DROP TABLE ledger").execute(store.writer()).await.unwrap();
    sqlx::query("CREATE TABLE ledger (event_id BLOB PRIMARY KEY, amount INTEGER NOT NULL)")
        .execute(store.writer())
        .await
        .unwrap();
    browser.run(
        "document.getElementById('token').value = 'letmein'; document.querySelector('.dead-letter .retry').click()",
    );
    let done = browser.until("the retry", "return document.getElementById('result').className === 'ok'").await;
    assert_eq!(done, true);
    let sum: i64 = sqlx::query_scalar("SELECT sum(amount) FROM ledger").fetch_one(store.writer()).await.unwrap();
    assert_eq!(sum, -4);

    // Pause through the page: refused without the token, done with it; the runner lets go of
    // the partition, events wait, and resume brings them in.
    let pause = "document.querySelector('.control[data-projection=ledger] .pause').click()";
    browser.run(&format!("document.getElementById('token').value = ''; {pause}"));
    let refused = browser.until("a refused pause", "return document.getElementById('result').className === 'bad' && document.getElementById('result').textContent").await;
    assert!(refused.as_str().unwrap().contains("refused (401)"), "{refused}");
    assert_eq!(browser.run("return document.querySelector('.control[data-projection=ledger]').dataset.paused"), "no");
    browser.run(&format!("document.getElementById('token').value = 'letmein'; {pause}"));
    browser
        .until("paused", "return document.querySelector('.control[data-projection=ledger]').dataset.paused === 'yes'")
        .await;
    let leases =
        "SELECT count(*) FROM annal_leases WHERE projection = 'ledger' AND expires_at > unixepoch('subsec') * 1000000";
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(leases).fetch_one(store.writer()).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the runner kept the paused projection's lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    deposit(&store, "account-2", &[10]).await;
    browser
        .until("the paused row", "return document.querySelector('#projections tbody').textContent.includes('paused')")
        .await;
    // Rebuilds: a running one's progress bar and figures, and a stale one (its process died).
    let records = annal_projections::SqliteProjectionStore::migrated(&store).await.unwrap();
    let owner = "builder-7:4242:5f1c09ab";
    let hour = Duration::from_secs(3600);
    records.start_rebuild("ledger", owner, annal_projections::RebuildMode::Shadow, hour).await.unwrap();
    let update = annal_projections::RebuildUpdate {
        total: 1000,
        done: 400,
        rate: 250.0,
        eta: Some(Duration::from_millis(2400)),
        outcome: annal_projections::RebuildOutcome::Running,
    };
    assert!(records.update_rebuild("ledger", owner, &update).await.unwrap());
    records
        .start_rebuild("stuck", "builder-8:99:0d1e2f3a", annal_projections::RebuildMode::InPlace, Duration::ZERO)
        .await
        .unwrap();
    let held = annal_projections::RebuildUpdate { total: 5000, done: 1800, rate: 900.0, ..update };
    assert!(records.update_rebuild("stuck", "builder-8:99:0d1e2f3a", &held).await.unwrap());
    let bar = "document.querySelector('#rebuilds tr.rebuild[data-projection=ledger] progress')";
    browser.until("the rebuild's progress bar", &format!("return {bar} !== null")).await;
    assert_eq!(browser.run(&format!("return [{bar}.value, {bar}.max]")), json!([400, 1000]));
    let row = browser.run("return document.querySelector('#rebuilds tr.rebuild[data-projection=ledger]').textContent");
    for shown in ["40.0%", "400 / 1000", "250 events/s", "2 s", owner, "running"] {
        assert!(row.as_str().unwrap().contains(shown), "{shown} in {row}");
    }
    browser
        .until(
            "the stale rebuild",
            "return document.querySelector('#rebuilds tr.rebuild[data-projection=stuck]')?.dataset.stale === 'yes'",
        )
        .await;
    // `ANNAL_CONSOLE_SCREENSHOT=docs/console.png` keeps this state as the docs' picture.
    if let Ok(path) = std::env::var("ANNAL_CONSOLE_SCREENSHOT") {
        use base64::Engine;
        let (status, shot) = http(&browser.driver, "GET", &format!("/session/{}/screenshot", browser.session), None)
            .expect("the screenshot");
        assert_eq!(status, 200, "{shot}");
        let png = base64::engine::general_purpose::STANDARD.decode(shot["value"].as_str().unwrap()).unwrap();
        std::fs::write(&path, png).unwrap();
    }
    browser.run("document.querySelector('.control[data-projection=ledger] .resume').click()");
    browser
        .until("resumed", "return document.querySelector('.control[data-projection=ledger]').dataset.paused === 'no'")
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>("SELECT sum(amount) FROM ledger").fetch_one(store.writer()).await.unwrap() != 6 {
        assert!(Instant::now() < deadline, "the resumed projection never applied the new event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = http(&browser.driver, "DELETE", &format!("/session/{}", browser.session), None);
}
