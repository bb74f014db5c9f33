//! `examples/custom_runner.rs` as an operator uses it: its Rust projection runs beside the
//! configured ones with the `annal-runner` command line, shows in `status`, stops cleanly on
//! SIGTERM and rebuilds.
#![cfg(feature = "sqlite")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::json;

/// The example's binary, which `cargo test` builds beside the test binaries
/// (`target/<profile>/examples/`). (`cargo test --test custom_runner` alone does not rebuild
/// examples: run the whole suite, or build the example first, after changing the library.)
fn example() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_owned();
    let path = deps.parent().unwrap().join("examples").join(format!("custom_runner{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p annal-runner` builds it, or `cargo build -p annal-runner --example custom_runner`",
        path.display()
    );
    path
}

/// Kills the runner process if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn custom_runner(config: &Path, args: &[&str]) -> Output {
    Command::new(example()).arg("--config").arg(config).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_runner_example_runs_reports_and_rebuilds_its_rust_projection() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let config = dir.path().join("annal.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(&config, format!("database = \"sqlite://{}\"\nlisten = \"127.0.0.1:{port}\"\n", db.display()))
        .unwrap();
    let store = SqliteEventStore::open(&db).await.unwrap();
    for i in 0..3 {
        let stream = StreamName::from_parts("account", i).unwrap();
        let opened = NewEvent::new("AccountOpened", json!({ "owner": format!("owner {i}") }));
        let deposited = NewEvent::new("Deposited", json!({ "amount": 10 }));
        store.append(&stream, ExpectedVersion::NoStream, vec![opened, deposited]).await.unwrap();
    }
    store.close().await;
    let migrate = custom_runner(&config, &["migrate"]);
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(
        Command::new(example())
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The runner is another process: its progress can only be polled, through `status`.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = custom_runner(&config, &["status"]);
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        let table = String::from_utf8_lossy(&status.stdout).to_string();
        let row: Vec<&str> =
            table.lines().find(|l| l.starts_with("welcome_mails")).unwrap_or_default().split_whitespace().collect();
        if row.len() > 5 && row[2] == "running" && row[5] == "0" {
            break;
        }
        if Instant::now() > deadline {
            panic!("the Rust projection never caught up:\n{table}\n{}", std::fs::read_to_string(&log).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().unwrap().success());
    assert!(child.0.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
    let mails = std::fs::read_to_string(&log).unwrap().matches("sending a welcome mail").count();
    assert_eq!(mails, 3, "one welcome mail per opened account");

    // The Rust projection rebuilds in place (it has no tables the runner knows of).
    let rebuilt = custom_runner(&config, &["rebuild", "welcome_mails"]);
    assert!(rebuilt.status.success(), "{}", String::from_utf8_lossy(&rebuilt.stderr));
    let stdout = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(stdout.contains("rebuilt welcome_mails in place: 3 events replayed"), "{stdout}");
}
