//! The event store conformance suite, run against every backend compiled in.

mod conformance;
mod support;

mod memory {
    crate::conformance::suite!(async { (annal::MemoryEventStore::new(), ()) });
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use annal::SqliteEventStore;

    async fn store() -> (SqliteEventStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
        (store, dir)
    }

    crate::conformance::suite!(store());
}

#[cfg(feature = "postgres")]
mod postgres {
    crate::conformance::suite!(async { (crate::support::pg::fresh_store().await, ()) });
}
