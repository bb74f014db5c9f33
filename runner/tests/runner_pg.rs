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
    let output = tokio::task::spawn_blocking(move || annal(&config, &["rebuild", "ledger"])).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("swapped them in"));
    total += writer.await.unwrap();
    setup.until("after the swap", |(count, sum)| (count, sum) == (3200, total)).await;
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE '%rebuild%' AND pg_table_is_visible(oid)) \
         + (SELECT count(*) FROM annal_checkpoints WHERE projection LIKE '%rebuild%')",
    )
    .fetch_one(&setup.pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0, "shadow tables, indexes or checkpoints left behind");
    terminate(live);
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
