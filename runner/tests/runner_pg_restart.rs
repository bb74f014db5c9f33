//! `annal-runner` on PostgreSQL when the server restarts under it. A binary of its own: the
//! restart cuts every connection, so nothing else may run beside it. Needs the throwaway server
//! of `scripts/test`, which it restarts.
#![cfg(feature = "postgres")]

#[path = "support/runner_pg.rs"]
mod support;

use support::*;

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
