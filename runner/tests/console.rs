//! The web console over HTTP: the page is served with no network assets, reading needs no
//! token, and actions are refused without the configured token and work with it.
#![cfg(feature = "sqlite")]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::{Value, json};

#[path = "support/local.rs"]
mod local;

const CONFIG: &str = r#"
console_token = "${ANNAL_TEST_TOKEN}"

[[projection]]
name = "ledger"
retry_attempts = 1
setup = ["CREATE TABLE IF NOT EXISTS ledger (event_id BLOB PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount > 0))"]

[projection.handlers]
Deposited = "INSERT INTO ledger (event_id, amount) VALUES (:event_id, :data ->> 'amount')"
"#;

use local::KillOnDrop as Runner;

fn request(address: &str, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {address}\r\n{auth}Content-Length: 0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_reads_freely_and_acts_only_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    std::fs::write(&config, format!("database = \"sqlite://{}\"\nlisten = \"{address}\"\n{CONFIG}", db.display()))
        .unwrap();
    let store = SqliteEventStore::open(&db).await.unwrap();
    let stream = StreamName::new("account-1").unwrap();
    store
        .append(&stream, ExpectedVersion::Any, vec![NewEvent::new("Deposited", json!({ "amount": -4 }))])
        .await
        .unwrap();
    let _runner = Runner(
        Command::new(env!("CARGO_BIN_EXE_annal-runner"))
            .args(["run", "-c"])
            .arg(&config)
            .env("ANNAL_TEST_TOKEN", "letmein")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some((200, body)) = request(&address, "GET", "/api/dead-letters/ledger", None) {
            let dead: Value = serde_json::from_str(&body).unwrap();
            if let Some(id) = dead[0]["id"].as_i64() {
                break id;
            }
        }
        assert!(Instant::now() < deadline, "the event was never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (status, page) = request(&address, "GET", "/", None).unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<canvas id=\"lag\"") && !page.contains("http://") && !page.contains("https://"));
    let (_, shown) = request(&address, "GET", &format!("/api/dead-letters/ledger/{id}"), None).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&shown).unwrap()["event"]["data"], json!({ "amount": -4 }));
    let (_, streams) = request(&address, "GET", "/api/streams", None).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&streams).unwrap()[0]["stream"], "account-1");
    // Actions: refused without the token or with a wrong one.
    let retry = format!("/api/dead-letters/ledger/{id}/retry");
    assert_eq!(request(&address, "POST", &retry, None).unwrap().0, 401);
    assert_eq!(request(&address, "POST", &retry, Some("guess")).unwrap().0, 401);
    assert_eq!(request(&address, "POST", &format!("/api/dead-letters/ledger/{id}/skip"), None).unwrap().0, 401);
    // Fixed, then retried with the token: the read model has it.
    sqlx::query("DROP TABLE ledger").execute(store.writer()).await.unwrap();
    sqlx::query("CREATE TABLE ledger (event_id BLOB PRIMARY KEY, amount INTEGER NOT NULL)")
        .execute(store.writer())
        .await
        .unwrap();
    let (status, body) = request(&address, "POST", &retry, Some("letmein")).unwrap();
    assert_eq!(status, 200, "{body}");
    let sum: i64 = sqlx::query_scalar("SELECT sum(amount) FROM ledger").fetch_one(store.writer()).await.unwrap();
    assert_eq!(sum, -4);
}
