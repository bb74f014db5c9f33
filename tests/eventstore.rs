//! The event store conformance suite, run against every backend compiled in.

mod conformance;
mod support;

/// Three rows the store could not decode sit at versions 1..=3 of `bad-1`, between two good
/// events (versions 0 and 4): every read reports each in its place as `Unreadable`, with its raw
/// columns, and goes on past it; a subscription then follows live.
async fn unreadable_rows_do_not_block_readers<S: annal::EventStore>(store: S, bad_ids: [uuid::Uuid; 3]) {
    use annal::{Error, ExpectedVersion, Filter, NewEvent, Position, ReadStream, StreamName};
    use futures::StreamExt;
    let s = StreamName::new("bad-1").unwrap();
    let outcome = |items: Vec<annal::Result<annal::RecordedEvent>>| -> Vec<Result<u64, u64>> {
        items
            .into_iter()
            .map(|item| match item {
                Ok(e) => Ok(e.version),
                Err(Error::Unreadable(bad)) => Err(bad.version),
                Err(other) => panic!("not an unreadable event: {other}"),
            })
            .collect()
    };
    let expected = vec![Ok(0), Err(1), Err(2), Err(3), Ok(4)];
    assert_eq!(outcome(store.read_stream(&s, ReadStream::forwards()).collect().await), expected);
    assert_eq!(outcome(store.read_stream(&s, ReadStream::forwards().page_size(2)).collect().await), expected);
    let backwards: Vec<_> = expected.iter().rev().copied().collect();
    assert_eq!(outcome(store.read_stream(&s, ReadStream::backwards()).collect().await), backwards);
    let head = store.head().await.unwrap();
    crate::support::visible(&store, head).await;
    assert_eq!(outcome(store.read_all(Position::START, Filter::all()).collect().await), expected);
    assert_eq!(outcome(store.read_all(Position::START, Filter::categories(["bad"])).collect().await), expected);
    for id in bad_ids {
        match store.read_event(id).await {
            Err(Error::Unreadable(bad)) => {
                assert_eq!(bad.id, Some(id));
                assert!(!bad.reason.is_empty() && !bad.data.is_empty(), "{bad:?}");
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    // A subscription passes them and follows live.
    let mut sub = store.subscribe(Position::START, Filter::all());
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(tokio::time::timeout(std::time::Duration::from_secs(30), sub.next()).await.unwrap().unwrap());
    }
    assert_eq!(outcome(seen), expected);
    store.append(&s, ExpectedVersion::Exact(4), vec![NewEvent::new("Later", serde_json::json!({}))]).await.unwrap();
    let live = tokio::time::timeout(std::time::Duration::from_secs(30), sub.next()).await.unwrap().unwrap();
    assert_eq!(live.unwrap().version, 5);
}

mod memory {
    crate::conformance::suite!(async { (annal::MemoryEventStore::new(), ()) });
}

/// The memory store behind a wrapper that implements only what a backend must, and the
/// snapshots: every provided method (`append_with_snapshot`, `count`, `stream_version`, the
/// reads as streams, subscriptions) is the trait's default, which must pass the suite too.
mod defaults {
    use annal::{
        AppendResult, Direction, EventStore, ExpectedVersion, Filter, MemoryEventStore, NewEvent, Page, Position,
        RecordedEvent, Result, Snapshot, StreamName, Wakeup,
    };

    #[derive(Clone, Default)]
    struct Required(MemoryEventStore);

    #[annal::async_trait]
    impl EventStore for Required {
        async fn append(
            &self,
            stream: &StreamName,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> Result<AppendResult> {
            self.0.append(stream, expected, events).await
        }
        async fn read_stream_page(
            &self,
            stream: &StreamName,
            direction: Direction,
            from: u64,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>> {
            self.0.read_stream_page(stream, direction, from, limit).await
        }
        async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> Result<Page> {
            self.0.read_all_page(from, filter, limit).await
        }
        async fn read_event(&self, id: uuid::Uuid) -> Result<Option<RecordedEvent>> {
            self.0.read_event(id).await
        }
        async fn head(&self) -> Result<Position> {
            self.0.head().await
        }
        async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>> {
            self.0.load_snapshot(stream).await
        }
        async fn save_snapshot(&self, stream: &StreamName, snapshot: &Snapshot) -> Result<()> {
            self.0.save_snapshot(stream, snapshot).await
        }
        fn wakeup(&self) -> Wakeup {
            self.0.wakeup()
        }
    }

    crate::conformance::suite!(async { (Required::default(), ()) });
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

    #[tokio::test]
    async fn unreadable_rows_do_not_block_readers() {
        use annal::{EventStore, ExpectedVersion, NewEvent, StreamName};
        let (store, _dir) = store().await;
        let s = StreamName::new("bad-1").unwrap();
        store.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Good", serde_json::json!({}))]).await.unwrap();
        let bad_ids = [uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7()];
        // Written by hand: broken JSON, a correlation id that is no UUID, a negative schema version.
        let rows = [(1, "not json", "{}", 1), (2, "{}", r#"{"correlation_id":"not-a-uuid"}"#, 1), (3, "{}", "{}", -1)];
        for ((version, data, metadata, schema), id) in rows.into_iter().zip(bad_ids) {
            sqlx::query(
                "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, \
                 metadata, recorded_at, stream_hash) VALUES (?, 'bad-1', 'bad', ?, 'Bad', ?, ?, ?, 0, 0)",
            )
            .bind(id)
            .bind(version)
            .bind(schema)
            .bind(data)
            .bind(metadata)
            .execute(store.writer())
            .await
            .unwrap();
        }
        store.append(&s, ExpectedVersion::Exact(3), vec![NewEvent::new("Good", serde_json::json!({}))]).await.unwrap();
        crate::unreadable_rows_do_not_block_readers(store, bad_ids).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use annal::{EventStore, ExpectedVersion, NewEvent, PgEventStore, StreamName};

    use crate::support::partition_counts;

    // Group commit on (the default): every case, including the 40-writer races.
    crate::conformance::suite!(async { (crate::support::pg::fresh_store().await, ()) });

    /// Every append committed alone (`with_group_commit(None)`): every case again.
    mod alone {
        crate::conformance::suite!(async { (crate::support::pg::fresh_store().await.with_group_commit(None), ()) });
    }

    #[tokio::test]
    async fn unreadable_rows_do_not_block_readers() {
        let store = crate::support::pg::fresh_store().await;
        let s = StreamName::new("bad-1").unwrap();
        store.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Good", serde_json::json!({}))]).await.unwrap();
        let bad_ids = [uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7()];
        // Written by hand: JSON too deep for any decoder, a correlation id that is no UUID, a
        // negative schema version.
        let deep = format!("{}1{}", "[".repeat(150), "]".repeat(150));
        let rows =
            [(1, deep.as_str(), "{}", 1), (2, "{}", r#"{"correlation_id":"not-a-uuid"}"#, 1), (3, "{}", "{}", -1)];
        for ((version, data, metadata, schema), id) in rows.into_iter().zip(bad_ids) {
            sqlx::query(
                "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, \
                 metadata, stream_hash) VALUES ($1, 'bad-1', 'bad', $2, 'Bad', $3, $4::jsonb, $5::jsonb, 0)",
            )
            .bind(id)
            .bind(version as i64)
            .bind(schema)
            .bind(data)
            .bind(metadata)
            .execute(store.pool())
            .await
            .unwrap();
        }
        store.append(&s, ExpectedVersion::Exact(3), vec![NewEvent::new("Good", serde_json::json!({}))]).await.unwrap();
        crate::unreadable_rows_do_not_block_readers(store, bad_ids).await;
    }

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
