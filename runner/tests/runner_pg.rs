//! `annal-runner` processes on PostgreSQL: three share a partitioned projection and one is
//! killed; a runner joins a busy one; a poison event is parked, then retried once after the fix.
//! (The server restart test is in `runner_pg_restart.rs`, a binary of its own, so that the
//! restart cannot cut the connections of tests running beside it.)
#![cfg(feature = "postgres")]

#[path = "support/runner_pg.rs"]
mod support;

use support::*;

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
    // A figure, not an assertion: on a loaded machine the wall clock says nothing (the takeover's
    // cost is measured in the benchmarks).
    eprintln!("the survivors finished a 1 s lease's work {:?} after the kill", killed_at.elapsed());
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
async fn a_runner_that_joins_a_busy_one_gets_its_share() {
    let setup = setup().await;
    let configs: Vec<PathBuf> =
        (0..2).map(|i| setup.config(&format!("join{i}"), &ledger_config("partitions = 4"))).collect();
    let mut total = setup.deposit(20, 1000, |i| (i % 9) as i64 + 1).await;
    let first = start(&configs[0]);
    let spread = |want: usize| {
        let pool = setup.pool.clone();
        async move {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let owners = lease_owners(&pool).await;
                let mut distinct = owners.clone();
                distinct.sort();
                distinct.dedup();
                let even = distinct.iter().all(|o| owners.iter().filter(|x| *x == o).count() == 4 / want);
                if owners.len() == 4 && distinct.len() == want && even {
                    return;
                }
                assert!(Instant::now() < deadline, "leases never spread over {want} runner(s): {owners:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    spread(1).await;
    setup.until("the first runner alone", |(count, _)| count == 1000).await;
    // A second runner joins while events keep coming: the first hands over half its partitions.
    let second = start(&configs[1]);
    total += setup.deposit(20, 1000, |i| (i % 9) as i64 + 1).await;
    spread(2).await;
    total += setup.deposit(20, 1000, |i| (i % 9) as i64 + 1).await;
    setup.until("both runners", |(count, _)| count == 3000).await;
    terminate(first);
    terminate(second);
    assert_eq!(setup.ledger().await, (3000, total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_into_shadow_tables_swaps_in_under_a_live_partitioned_runner() {
    let setup = setup().await;
    let config = setup.config("shadow", &ledger_config("partitions = 2\ntables = [\"ledger\"]"));
    let mut total = setup.deposit(20, 3000, |i| (i % 50) as i64 + 1).await;
    let live = start(&config);
    setup.until("live runner", |(count, _)| count == 3000).await;
    // A bug corrupted the live read model: the rebuild must replace it, not patch it.
    sqlx::query("UPDATE ledger SET amount = amount + 1000").execute(&setup.pool).await.unwrap();
    // Events keep flowing into the live projection while the shadow is built and swapped in.
    let writer = {
        let events = setup.events.clone();
        tokio::spawn(async move {
            let mut total = 0;
            for i in 0..200usize {
                let amount = (i % 7) as i64 + 1;
                let stream = StreamName::from_parts("account", i % 20).unwrap();
                let event = NewEvent::new("Deposited", json!({ "amount": amount }));
                events.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
                total += amount;
                tokio::task::yield_now().await;
            }
            total
        })
    };
    let rebuilding = config.clone();
    let output = tokio::task::spawn_blocking(move || annal(&rebuilding, &["rebuild", "ledger"])).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("swapped them in"));
    total += writer.await.unwrap();
    setup.until("after the swap", |(count, sum)| (count, sum) == (3200, total)).await;
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE '%rebuild%' AND relname NOT LIKE 'annal_rebuilds%' \
                 AND pg_table_is_visible(oid)) \
         + (SELECT count(*) FROM annal_checkpoints WHERE projection LIKE '%rebuild%')",
    )
    .fetch_one(&setup.pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0, "shadow tables, indexes or checkpoints left behind");
    // The rebuild's record says how it ended, as another process's `status --json` shows it.
    let status = annal(&config, &["status", "--json"]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let record = &status["rebuilds"][0];
    assert_eq!((record["projection"].as_str(), record["mode"].as_str()), (Some("ledger"), Some("shadow")), "{status}");
    assert_eq!((record["outcome"].as_str(), record["stale"].as_bool()), (Some("swapped_in"), Some(false)), "{status}");
    assert!(record["total"].as_u64() >= Some(3000) && record["done"] == record["total"], "{status}");
    terminate(live);
}

/// Sends a signal to a runner process.
fn signal(child: &Child, signal: &str) {
    assert!(Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap().success());
}

/// The review's frozen-runner case: two runners share a 4-partition projection while a writer
/// appends; one is suspended with SIGSTOP (a GC pause or a frozen VM looks the same), several
/// times, for eight lease periods each. Its batch transaction, if it was in one, is ended by the
/// server within the bounds of `batch_timeouts` (a fraction of the 1 s lease): subscribers are
/// held back for about that long, not for the pause, and the other runner takes the leases and
/// keeps applying. Resumed, the frozen runner's batch cannot commit. At the end the read model
/// equals a replay: every deposit once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_runner_stalls_nobody_for_long_and_cannot_commit_after_losing_its_lease() {
    let setup = setup().await;
    let configs: Vec<PathBuf> = (0..2)
        .map(|i| setup.config(&format!("frozen{i}"), &ledger_config("partitions = 4\nbatch_size = 20")))
        .collect();
    let runners: Vec<Child> = configs.iter().map(start).collect();
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (events, writing) = (setup.events.clone(), writing.clone());
        tokio::spawn(async move {
            let mut appended = 0i64;
            let mut n = 0usize;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let stream = StreamName::from_parts("account", n % 40).unwrap();
                let batch: Vec<NewEvent> = (0..5).map(|_| NewEvent::new("Deposited", json!({ "amount": 1 }))).collect();
                events.append(&stream, ExpectedVersion::Any, batch).await.unwrap();
                appended += 5;
                n += 1;
                // The workload's pace: about 1,000 events a second.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            appended
        })
    };
    setup.until("both runners working", |(count, _)| count > 200).await;
    let pause = Duration::from_secs(8);
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        signal(&runners[0], "STOP");
        let frozen_at = Instant::now();
        // While it is frozen: how long does an event take to become visible to a subscriber?
        let mut sub = futures::StreamExt::boxed(
            setup.events.subscribe(setup.events.head().await.unwrap(), annal_eventstore::Filter::categories(["probe"])),
        );
        let mut probes = 0;
        // Frozen for the whole pause, and for at least ten probes however slow the machine is.
        while frozen_at.elapsed() < pause || probes < 10 {
            let stream = StreamName::from_parts("probe", uuid::Uuid::now_v7().simple()).unwrap();
            let appended = Instant::now();
            setup
                .events
                .append(&stream, ExpectedVersion::NoStream, vec![NewEvent::new("Probe", json!({}))])
                .await
                .unwrap();
            let seen =
                tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut sub)).await.unwrap().unwrap().unwrap();
            assert_eq!(seen.stream, stream);
            // The first probes may wait for the frozen transaction to be ended by the server.
            if frozen_at.elapsed() > Duration::from_secs(2) {
                worst = worst.max(appended.elapsed());
            }
            probes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The other runner holds all four partitions and applies while the first is frozen.
        let before = setup.ledger().await.0;
        setup.until("the other runner applies while one is frozen", |(count, _)| count > before + 100).await;
        assert_eq!(lease_owners(&setup.pool).await.len(), 4);
        signal(&runners[0], "CONT");
        tokio::time::sleep(Duration::from_secs(2)).await; // let it rejoin: workload, not synchronisation
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let appended = writer.await.unwrap();
    setup.until("everything applied", |(count, _)| count >= appended).await;
    for runner in runners {
        terminate(runner);
    }
    assert_eq!(setup.ledger().await, (appended, appended), "the read model differs from a replay");
    let dead = annal(&configs[0], &["dead-letters", "list", "ledger"]);
    assert_eq!(String::from_utf8_lossy(&dead.stdout).lines().count(), 1, "nothing may be parked");
    // The promise is a stall of about the batch bounds (77 ms worst on a quiet machine), not the
    // pause; the test asserts only the second, with room for a machine busy with other tests
    // (2.1 s was seen while the whole suite ran on two cores): the figure is printed below.
    assert!(worst < pause / 2, "a frozen runner held subscribers back {worst:?} (frozen for {pause:?})");
    let ended = std::env::var("ANNAL_PG_LOG")
        .ok()
        .and_then(|log| std::fs::read_to_string(log).ok())
        .map_or(0, |log| log.matches("idle-in-transaction timeout").count());
    eprintln!("worst probe delay while frozen: {worst:?}; frozen transactions ended by the server: {ended}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_print_no_postgres_notices() {
    let setup = setup().await;
    let config = setup.config("notices", &ledger_config(""));
    // The second migrate meets every table already there: PostgreSQL sends a notice for each
    // `IF NOT EXISTS`, which the default log level keeps out of the operator's way.
    for _ in 0..2 {
        let output = Command::new(env!("CARGO_BIN_EXE_annal-runner"))
            .args(["migrate", "-c"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(!stderr.contains("notice") && !stderr.contains("already exists"), "{stderr}");
    }
}

/// `annal_store_oldest_transaction_seconds` on `/metrics`: a transaction held open (with a
/// transaction id) shows as its age, growing; once it commits the gauge falls below that age.
/// (The gauge is cluster-wide: another test's transaction may show too, but never a younger one
/// in place of ours, so "at least our age" holds while ours is open.) The idle scrape also
/// shows the append histogram, with no sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_transaction_gauge_shows_a_transaction_held_open() {
    const GAUGE: &str = "annal_store_oldest_transaction_seconds";
    let setup = setup().await;
    let config = setup.config("oldest", &ledger_config(""));
    let runner = start(&config);
    let deadline = Instant::now() + PATIENCE;
    while gauge(&config, GAUGE).is_none() {
        assert!(Instant::now() < deadline, "the runner never served {GAUGE}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Beside it, the store's append histogram, registered at start for this runner's backend.
    let appends = "annal_store_append_duration_seconds_count{backend=\"postgres\",outcome=\"ok\"}";
    assert_eq!(gauge(&config, appends), Some(0.0), "an idle runner's scrape shows {appends}");
    let mut held = setup.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *held).await.unwrap();
    let opened = Instant::now();
    let mut seen = Vec::new();
    loop {
        let floor = opened.elapsed().as_secs_f64();
        let age = gauge(&config, GAUGE).expect("/metrics answers");
        assert!(age >= floor - 0.5, "{GAUGE} {age} below the held transaction's age {floor}");
        seen.push(age);
        if age >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{GAUGE} never rose past 2 s: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.windows(2).any(|w| w[1] > w[0]), "{GAUGE} did not grow: {seen:?}");
    held.commit().await.unwrap();
    loop {
        let floor = opened.elapsed().as_secs_f64();
        if gauge(&config, GAUGE).expect("/metrics answers") < floor - 0.5 {
            break;
        }
        assert!(Instant::now() < deadline, "{GAUGE} stayed at the committed transaction's age");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(runner);
}
