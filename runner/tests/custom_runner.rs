//! `examples/custom_runner.rs` with the configuration shipped beside it, as the docs run it: its
//! Rust projection runs beside the configured SQL one with the `annal-runner` command line,
//! shows in `status`, stops cleanly on SIGTERM and rebuilds.
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

/// The configuration the repository ships beside the example, which the docs' command uses.
fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join("custom_runner.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_runner_example_runs_reports_and_rebuilds_its_rust_projection() {
    // The shipped file, as the docs run it; its database is relative to the file's directory,
    // so the test runs a copy in a fresh one (and serves HTTP on a free port, not the default).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("custom_runner.toml");
    std::fs::copy(shipped_config(), &config).unwrap();
    let db = dir.path().join("custom_runner.db");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = SqliteEventStore::open(&db).await.unwrap();
    for i in 0..3 {
        let stream = StreamName::from_parts("account", i).unwrap();
        let opened = NewEvent::new("AccountOpened", json!({ "owner": format!("owner {i}") }));
        let deposited = NewEvent::new("Deposited", json!({ "amount": 10 }));
        store.append(&stream, ExpectedVersion::NoStream, vec![opened, deposited]).await.unwrap();
    }
    let custom_runner = |args: &[&str]| -> Output {
        Command::new(example()).current_dir(dir.path()).arg("--config").arg(&config).args(args).output().unwrap()
    };
    // `status` only reads: the schema must be there before `run` has started.
    let migrate = custom_runner(&["migrate"]);
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(
        Command::new(example())
            .current_dir(dir.path())
            .arg("--config")
            .arg(&config)
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The runner is another process: its progress can only be polled, through `status`.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = custom_runner(&["status"]);
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        let table = String::from_utf8_lossy(&status.stdout).to_string();
        let caught_up = |name: &str| {
            let row: Vec<&str> =
                table.lines().find(|l| l.starts_with(name)).unwrap_or_default().split_whitespace().collect();
            row.len() > 5 && row[2] == "running" && row[5] == "0"
        };
        // The Rust projection and the configured SQL one, side by side.
        if caught_up("welcome_mails ") && caught_up("accounts ") {
            break;
        }
        if Instant::now() > deadline {
            panic!("the projections never caught up:\n{table}\n{}", std::fs::read_to_string(&log).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().unwrap().success());
    assert!(child.0.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
    let mails = std::fs::read_to_string(&log).unwrap().matches("sending a welcome mail").count();
    assert_eq!(mails, 3, "one welcome mail per opened account");
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT owner FROM accounts ORDER BY id").fetch_all(store.writer()).await.unwrap();
    assert_eq!(owners, ["owner 0", "owner 1", "owner 2"]);

    // The Rust projection rebuilds in place (it has no tables the runner knows of).
    let rebuilt = custom_runner(&["rebuild", "welcome_mails"]);
    assert!(rebuilt.status.success(), "{}", String::from_utf8_lossy(&rebuilt.stderr));
    let stdout = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(stdout.contains("rebuilt welcome_mails in place: 3 events replayed"), "{stdout}");
}
