//! The rebuild record on every backend: started, updated only by its owner, replaced by a later
//! rebuild, ended with each outcome, and stale once a running record goes unwritten.

use std::time::{Duration, Instant};

use annal::projections::{RebuildMode, RebuildOutcome, RebuildProgress, RebuildUpdate};

use super::{Backend, PATIENCE};

fn running(total: u64, done: u64) -> RebuildUpdate {
    RebuildUpdate { total, done, rate: 250.5, eta: Some(Duration::from_millis(1500)), outcome: RebuildOutcome::Running }
}

async fn record(backend: &Backend, projection: &str) -> RebuildProgress {
    let records = backend.store.rebuilds().await.unwrap();
    records.into_iter().find(|r| r.projection == projection).unwrap_or_else(|| panic!("no record of {projection}"))
}

pub(crate) async fn the_rebuild_record_is_the_same_on_every_store(backend: Backend) {
    let store = &*backend.store;
    assert_eq!(store.rebuilds().await.unwrap(), vec![], "no rebuild yet");
    assert!(!store.update_rebuild("ledger", "a", &running(1, 1)).await.unwrap(), "no record to update");
    let hour = Duration::from_secs(3600);
    store.start_rebuild("ledger", "host:1:a", RebuildMode::Shadow, hour).await.unwrap();
    let started = record(&backend, "ledger").await;
    assert_eq!((started.owner.as_str(), started.mode), ("host:1:a", RebuildMode::Shadow));
    assert_eq!(
        started.update,
        RebuildUpdate { total: 0, done: 0, rate: 0.0, eta: None, outcome: RebuildOutcome::Running }
    );
    assert_eq!(started.stale_after, hour);
    assert!(!started.stale(), "{started:?}");
    assert!(started.age < hour && started.updated_at >= started.started_at, "{started:?}");

    assert!(store.update_rebuild("ledger", "host:1:a", &running(1000, 400)).await.unwrap());
    let updated = record(&backend, "ledger").await;
    assert_eq!(updated.update, running(1000, 400), "{} store", backend.kind);
    assert!(updated.updated_at >= started.updated_at);
    assert_eq!(updated.started_at, started.started_at);
    // Only the owner writes: a process whose record was taken over by a later rebuild does not.
    assert!(!store.update_rebuild("ledger", "host:2:b", &running(1000, 999)).await.unwrap());
    assert_eq!(record(&backend, "ledger").await.update, running(1000, 400));

    // A later rebuild (here resuming the first one's shadow) replaces the record.
    store.start_rebuild("ledger", "host:2:b", RebuildMode::InPlace, hour).await.unwrap();
    let replaced = record(&backend, "ledger").await;
    assert_eq!((replaced.owner.as_str(), replaced.mode, replaced.update.done), ("host:2:b", RebuildMode::InPlace, 0));
    assert!(!store.update_rebuild("ledger", "host:1:a", &running(1000, 500)).await.unwrap(), "the first is gone");

    // Every outcome reads back as written.
    for outcome in [
        RebuildOutcome::SwappedIn,
        RebuildOutcome::Resumed,
        RebuildOutcome::LeftPaused,
        RebuildOutcome::Failed { reason: "projection ledger stopped at event 7: boom".into() },
        RebuildOutcome::Interrupted,
    ] {
        let end = RebuildUpdate { total: 1000, done: 1000, rate: 10.0, eta: None, outcome };
        assert!(store.update_rebuild("ledger", "host:2:b", &end).await.unwrap());
        assert_eq!(record(&backend, "ledger").await.update, end);
    }

    // A running record unwritten for longer than its bound is stale (its process died); one
    // that ended is never stale. The store's clock decides: poll until the bound has passed.
    let short = Duration::from_millis(200);
    store.start_rebuild("orders", "host:3:c", RebuildMode::Shadow, short).await.unwrap();
    store.start_rebuild("other", "host:3:c", RebuildMode::Shadow, short).await.unwrap();
    let ended = RebuildUpdate { total: 5, done: 5, rate: 5.0, eta: None, outcome: RebuildOutcome::SwappedIn };
    assert!(store.update_rebuild("other", "host:3:c", &ended).await.unwrap());
    let deadline = Instant::now() + PATIENCE;
    let stale = loop {
        let orders = record(&backend, "orders").await;
        if orders.stale() {
            break orders;
        }
        assert!(Instant::now() < deadline, "a running record never went stale: {orders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(stale.age > short, "{stale:?}");
    assert!(!record(&backend, "other").await.stale(), "an ended record is not stale");
    // A write makes it fresh again.
    assert!(store.update_rebuild("orders", "host:3:c", &running(10, 1)).await.unwrap());
    let fresh = record(&backend, "orders").await;
    assert!(fresh.age < stale.age, "{fresh:?} after {stale:?}");
    let names: Vec<String> = store.rebuilds().await.unwrap().into_iter().map(|r| r.projection).collect();
    assert_eq!(names, ["ledger", "orders", "other"], "one record per projection, by name");
}
