//! Every example run as a user runs it, in its short mode, with its outcome checked: the exit
//! status and the lines that state what it proved. On SQLite always, and on PostgreSQL with the
//! `postgres` feature (`scripts/test`), where a missing server fails the test instead of
//! skipping it.
//!
//! The binaries are the ones Cargo builds beside the test binaries (`target/<profile>/examples/`,
//! wherever `CARGO_TARGET_DIR` puts `target`): `cargo test` builds every example. When one is
//! missing, or older than a source it was built from (say, under `cargo test --test examples`,
//! which builds no examples), the test builds it first with the same features and profile.
#![cfg(all(feature = "sqlite", feature = "derive", feature = "projections"))]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Generous: a short run takes a few seconds, but the machine may be busy building.
const LIMIT: Duration = Duration::from_secs(180);

/// `<target>/<profile>`, from this test binary's place in `<target>/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("the test binary lives in <target>/<profile>/deps").to_owned()
}

/// The files an artifact was built from, by the dep-info file Cargo writes beside it.
fn sources(dep_info: &Path) -> Option<Vec<PathBuf>> {
    let text = std::fs::read_to_string(dep_info).ok()?;
    let (_, deps) = text.lines().next()?.split_once(": ")?;
    // Paths are separated by spaces; a space inside a path is escaped as `\ `.
    let deps = deps.replace("\\ ", "\u{0}");
    Some(deps.split_whitespace().map(|p| PathBuf::from(p.replace('\u{0}', " "))).collect())
}

/// `true` when the binary is missing or older than one of its sources.
fn stale(binary: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(binary) else { return true };
    match sources(&binary.with_extension("d")) {
        Some(sources) => sources.iter().any(|s| modified(s).is_none_or(|m| m > built)),
        None => false,
    }
}

/// The example's binary, built first if it is missing or stale.
fn example(name: &str) -> PathBuf {
    // One build at a time: tests run in parallel, and each build would wait for Cargo's lock.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = profile_dir();
    let binary = dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if stale(&binary) {
        let features: Vec<&str> = [
            ("sqlite", cfg!(feature = "sqlite")),
            ("postgres", cfg!(feature = "postgres")),
            ("derive", cfg!(feature = "derive")),
            ("projections", cfg!(feature = "projections")),
            ("runner", cfg!(feature = "runner")),
        ]
        .into_iter()
        .filter_map(|(feature, on)| on.then_some(feature))
        .collect();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "annal", "--example", name, "--profile", &profile])
            .args(["--no-default-features", "--features", &features.join(",")])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(dir.parent().expect("<target>/<profile> has a parent"))
            .status()
            .expect("run cargo");
        assert!(status.success(), "building example {name} failed");
    }
    binary
}

/// Runs an example in short mode (on PostgreSQL at `database_url` if given) and returns its
/// output, after checking that it succeeded.
fn run(name: &str, database_url: Option<&str>) -> String {
    let mut command = Command::new(example(name));
    command.arg("--short").env("ANNAL_EXAMPLE_SHORT", "1").env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start the example");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    // The example's stdout ends when it exits: wait for that, up to the limit.
    let (sender, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        let _ = sender.send(text);
    });
    let Ok(stdout) = ended.recv_timeout(LIMIT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("example {name} did not finish within {LIMIT:?}:\n{}", stderr.join().unwrap_or_default());
    };
    let status = child.wait().expect("wait for the example");
    let stderr = stderr.join().unwrap_or_default();
    assert!(status.success(), "example {name} failed ({status}):\n{stdout}\n{stderr}");
    let backend = if database_url.is_some() { "backend: PostgreSQL" } else { "backend: SQLite" };
    assert!(stdout.starts_with(backend), "example {name} did not run on the backend asked for:\n{stdout}");
    stdout
}

/// The line that starts (after indentation) with `prefix`.
fn line<'a>(output: &'a str, prefix: &str) -> &'a str {
    output
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{output}"))
}

/// The numbers in a line, in order (`1.5` counts as 1 and 5; only whole numbers are asked for).
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

/// A latency line (`p50 .. ms, p99 .. ms, max .. ms (N samples)`) with at least one sample.
fn has_samples(output: &str, prefix: &str) {
    let latency = line(output, prefix);
    assert!(latency.contains("p50") && latency.contains("p99"), "{latency}");
    let samples = numbers(latency).last().copied().unwrap_or_default();
    assert!(samples > 0, "no samples: {latency}");
}

fn check_collab(output: &str) {
    let edits = output.lines().find(|l| l.contains("edits ordered")).unwrap_or_else(|| panic!("no edits:\n{output}"));
    let ordered = numbers(edits).first().copied().unwrap_or_default();
    assert!(ordered >= 50, "too few edits for fifty clients:\n{output}");
    let converged = line(output, "every client's text equals the server's: 50 clients");
    assert_eq!(numbers(converged).last().copied(), Some(ordered), "every edit is a version: {converged}");
    has_samples(output, "commit to arrival at all 50 clients:");
    line(output, "published: sync with remote users typically within 50-200 ms");
}

fn check_chat(output: &str) {
    line(output, "linus writes in ada_grace: refused");
    line(output, "she has read everything. Unread: ada 0, grace 0, linus 0");
    has_samples(output, "commit to delivery receipt:");
    has_samples(output, "read to read state on the reader's other device:");
    line(output, "published: delivery receipts in 3-8 ms");
    line(output, "published: read receipts across devices in 15-45 ms");
    for device in ["phone", "laptop"] {
        let caught_up = output.lines().find(|l| l.contains(&format!("'s {device} caught up on"))).unwrap_or_default();
        let queued = numbers(caught_up.split("caught up on").nth(1).unwrap_or_default()).first().copied();
        assert!(queued.is_some_and(|n| (25..=45).contains(&n)), "the {device} caught up on 25 to 45:\n{output}");
    }
    line(output, "read models: 0 receipts not delivered and read, 0 messages unread");
}

fn check_bank(output: &str) {
    line(output, "refused: insufficient funds: the balance is 70, 500 was requested");
    let grace = line(output, "Grace's balance:");
    let [total, before, deposited] = numbers(grace)[..] else { panic!("{grace}") };
    assert_eq!(total, before + deposited, "{grace}");
    for name in ["Ada", "Grace"] {
        let agree = line(output, &format!("{name}: read model"));
        let [projected, loaded] = numbers(agree)[..] else { panic!("{agree}") };
        assert_eq!(projected, loaded, "{agree}");
    }
    line(output, "every balance in the read model is 25");
    line(output, "Figures");
    assert_eq!(output.lines().filter(|l| l.contains("commands/s")).count(), 2, "{output}");
    line(output, "read-model lag: 0 events behind");
}

fn check_live_subscription(output: &str) {
    let summary = line(output, "200 events from 4 concurrent writers");
    assert!(summary.ends_with("all delivered once, in order"), "{summary}");
    has_samples(output, "append-to-delivery latency:");
}

fn check_dispatch(output: &str) {
    let exact = line(output, "every driver was offered exactly the requests inside its box:");
    let [drivers, resubscribed] = numbers(exact)[..] else { panic!("{exact}") };
    assert!(drivers >= 300 && resubscribed > 0, "{exact}");
    let reach = line(output, "each request reached");
    let [fewest, most, of] = numbers(reach)[..] else { panic!("{reach}") };
    assert!(15 <= fewest && most <= 35 && of == drivers, "{reach}");
    has_samples(output, "commit to the last nearby driver's notification:");
    line(output, "published: nearby drivers notified within 2-3 s of the request");
    let airport = line(output, "airport pickups in the read model:");
    let [counted, requested] = numbers(airport)[..] else { panic!("{airport}") };
    assert!(counted == requested && counted > 0, "{airport}");
    line(output, "airport_pickups: 0 events behind");
}

#[test]
fn collab_converges_on_sqlite() {
    check_collab(&run("collab", None));
}

#[test]
fn chat_delivers_reads_and_catches_up_on_sqlite() {
    check_chat(&run("chat", None));
}

#[test]
fn bank_keeps_its_rules_and_prints_its_figures_on_sqlite() {
    check_bank(&run("bank", None));
}

#[test]
fn dispatch_offers_each_request_to_exactly_the_drivers_near_it_on_sqlite() {
    check_dispatch(&run("dispatch", None));
}

#[test]
fn live_subscription_delivers_every_event_once_on_sqlite() {
    check_live_subscription(&run("live_subscription", None));
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    /// The server the tests use: PostgreSQL tests never pass by being skipped.
    fn url() -> String {
        std::env::var("DATABASE_URL").expect("the PostgreSQL tests need DATABASE_URL: run `scripts/test`")
    }

    #[test]
    fn collab_converges_on_postgres() {
        check_collab(&run("collab", Some(&url())));
    }

    #[test]
    fn chat_delivers_reads_and_catches_up_on_postgres() {
        check_chat(&run("chat", Some(&url())));
    }

    #[test]
    fn bank_keeps_its_rules_and_prints_its_figures_on_postgres() {
        check_bank(&run("bank", Some(&url())));
    }

    #[test]
    fn dispatch_offers_each_request_to_exactly_the_drivers_near_it_on_postgres() {
        check_dispatch(&run("dispatch", Some(&url())));
    }

    #[test]
    fn live_subscription_delivers_every_event_once_on_postgres() {
        check_live_subscription(&run("live_subscription", Some(&url())));
    }
}

#[test]
fn dep_info_paths_with_spaces_are_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("x.d");
    std::fs::write(&info, "/t/x: /src/a.rs /my\\ dir/b.rs\n").unwrap();
    assert_eq!(sources(&info).unwrap(), [PathBuf::from("/src/a.rs"), PathBuf::from("/my dir/b.rs")]);
    assert!(stale(&dir.path().join("missing")), "a missing binary is stale");
}
