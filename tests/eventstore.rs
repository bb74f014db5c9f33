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
    use annal::{EventStore, ExpectedVersion, NewEvent, PgEventStore, StreamName};

    use crate::support::partition_counts;

    crate::conformance::suite!(async { (crate::support::pg::fresh_store().await, ()) });

    #[tokio::test]
    async fn events_written_before_stream_hashes_get_them_when_the_store_opens() {
        let store = crate::support::pg::fresh_store().await;
        let mut last = annal::Position::START;
        for i in 0..30 {
            let stream = StreamName::from_parts("counter", i).unwrap();
            let events = (0..i % 4 + 1).map(|n| NewEvent::new("Counted", serde_json::json!({ "n": n }))).collect();
            last = store.append(&stream, ExpectedVersion::NoStream, events).await.unwrap().position();
        }
        // Counting reads the global log: wait until another test's open transaction no longer
        // hides the last events (this was the clean-clone CI failure).
        crate::support::visible(&store, last).await;
        let expected = partition_counts(&store, 3).await;
        assert_eq!(expected.iter().sum::<u64>(), 73);
        // As a database from before the column existed: no hashes, no partition selects anything.
        sqlx::query("UPDATE annal_events SET stream_hash = NULL").execute(store.pool()).await.unwrap();
        assert_eq!(partition_counts(&store, 3).await, [0, 0, 0]);
        let reopened = PgEventStore::from_pool(store.pool().clone()).await.unwrap();
        assert_eq!(partition_counts(&reopened, 3).await, expected);
    }
}
