//! SQLite-specific behaviour: the file outlives the process, several stores (as several
//! processes would) share one file, and a closed store says so.
#![cfg(feature = "sqlite")]

use std::time::Duration;

use annal::{
    Error, EventStore, ExpectedVersion, Filter, NewEvent, Position, ReadStream, SqliteEventStore, StreamName,
    SubscriptionOptions,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use support::partition_counts;

mod support;

fn event(n: u64) -> NewEvent {
    NewEvent::new("Counted", json!({ "n": n }))
}

#[tokio::test]
async fn events_survive_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let stream = StreamName::new("counter-1").unwrap();
    let first = {
        let store = SqliteEventStore::open(&path).await.unwrap();
        let written = store.append(&stream, ExpectedVersion::NoStream, (0..3).map(event).collect()).await.unwrap();
        store.close().await;
        written
    };
    let store = SqliteEventStore::open(&path).await.unwrap();
    let events: Vec<_> = store.read_stream(&stream, ReadStream::forwards()).try_collect().await.unwrap();
    assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), first.positions);
    // Versions and positions continue where they were.
    let more = store.append(&stream, ExpectedVersion::Exact(2), vec![event(3)]).await.unwrap();
    assert_eq!(more.version, 3);
    assert!(more.position() > first.position());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_sharing_a_file_keep_one_order_and_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let a = SqliteEventStore::open(&path).await.unwrap();
    let b = SqliteEventStore::open(&path).await.unwrap();
    let stream = StreamName::new("shared-1").unwrap();
    a.append(&stream, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    // Both try to append after version 0: exactly one wins.
    let (ra, rb) = tokio::join!(
        a.append(&stream, ExpectedVersion::Exact(0), vec![event(1)]),
        b.append(&stream, ExpectedVersion::Exact(0), vec![event(1)])
    );
    assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
    assert!(ra.err().or(rb.err()).unwrap().is_conflict());
    // B's subscriber is not woken by A's appends (another connection, maybe another process),
    // so it finds them at its poll interval.
    let options = SubscriptionOptions::default().poll_interval(Duration::from_millis(20));
    let mut sub = b.subscribe_with(Position::START, Filter::all(), options);
    let writer = tokio::spawn(async move {
        for i in 0..50 {
            a.append(&StreamName::new(format!("other-{i}")).unwrap(), ExpectedVersion::NoStream, vec![event(i)])
                .await
                .unwrap();
        }
    });
    let mut last = Position::START;
    for _ in 0..52 {
        let e = tokio::time::timeout(Duration::from_secs(30), sub.next()).await.unwrap().unwrap().unwrap();
        assert!(e.position > last);
        last = e.position;
    }
    writer.await.unwrap();
}

/// Forty writers on two stores sharing one file (two processes, as far as SQLite can tell),
/// racing on one stream in every expected-version mode: every append at the end lands once at
/// its own version, and of those expecting one version exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_writers_on_two_stores_race_in_every_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let stores = [SqliteEventStore::open(&path).await.unwrap(), SqliteEventStore::open(&path).await.unwrap()];
    let race = |stream: &'static str, expected: ExpectedVersion| {
        let stores = stores.clone();
        async move {
            let stream = StreamName::new(stream).unwrap();
            let appends = (0..40).map(|w| {
                let (store, stream) = (stores[w % 2].clone(), stream.clone());
                tokio::spawn(async move { store.append(&stream, expected, vec![event(w as u64)]).await })
            });
            let mut results = Vec::new();
            for append in appends.collect::<Vec<_>>() {
                results.push(append.await.unwrap());
            }
            results
        }
    };
    let versions = |results: &[annal::Result<annal::AppendResult>]| {
        let mut v: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().map(|r| r.version)).collect();
        v.sort_unstable();
        v
    };
    let conflicts_at = |results: &[annal::Result<annal::AppendResult>], actual: u64| {
        results.iter().filter(|r| matches!(r, Err(Error::Conflict { actual: a, .. }) if *a == Some(actual))).count()
    };

    let any = race("any-1", ExpectedVersion::Any).await;
    assert_eq!(versions(&any), (0..40).collect::<Vec<_>>(), "{any:?}");

    let created = race("new-1", ExpectedVersion::NoStream).await;
    assert_eq!(versions(&created), [0], "{created:?}");
    assert_eq!(conflicts_at(&created, 0), 39, "{created:?}");

    let exists = race("new-1", ExpectedVersion::StreamExists).await;
    assert_eq!(versions(&exists), (1..41).collect::<Vec<_>>(), "{exists:?}");
    let missing = race("missing-1", ExpectedVersion::StreamExists).await;
    assert!(missing.iter().all(|r| matches!(r, Err(Error::Conflict { actual: None, .. }))), "{missing:?}");

    let exact = race("new-1", ExpectedVersion::Exact(40)).await;
    assert_eq!(versions(&exact), [41], "{exact:?}");
    assert_eq!(conflicts_at(&exact, 41), 39, "{exact:?}");
    let behind = race("new-1", ExpectedVersion::Exact(7)).await;
    assert_eq!(conflicts_at(&behind, 41), 40, "{behind:?}");
    let ahead = race("new-1", ExpectedVersion::Exact(50)).await;
    assert_eq!(conflicts_at(&ahead, 41), 40, "{ahead:?}");

    // What is stored is what was acknowledged: one event per version, in position order.
    let stored: Vec<_> =
        stores[1].read_stream(&StreamName::new("new-1").unwrap(), ReadStream::forwards()).try_collect().await.unwrap();
    assert_eq!(stored.iter().map(|e| e.version).collect::<Vec<_>>(), (0..42).collect::<Vec<_>>());
    assert!(stored.windows(2).all(|w| w[0].position < w[1].position));
}

#[tokio::test]
async fn a_closed_store_fails_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
    store.close().await;
    let err = store.append(&StreamName::new("a-1").unwrap(), ExpectedVersion::Any, vec![event(0)]).await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err}");
    assert!(matches!(store.head().await, Err(Error::Closed)));
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_is_a_backend_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteEventStore::open(dir.path().join("missing-dir").join("events.db")).await.unwrap_err();
    assert!(matches!(err, Error::Backend(_)), "{err}");
    assert!(SqliteEventStore::connect("postgres://not-sqlite").await.is_err());
}

#[tokio::test]
async fn events_written_before_stream_hashes_get_them_when_the_file_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path).await.unwrap();
    for i in 0..30 {
        let stream = StreamName::from_parts("counter", i).unwrap();
        store.append(&stream, ExpectedVersion::NoStream, (0..i % 4 + 1).map(event).collect()).await.unwrap();
    }
    let expected = partition_counts(&store, 3).await;
    assert_eq!(
        expected.iter().sum::<u64>(),
        store.count(Position::START, store.head().await.unwrap(), &Filter::all()).await.unwrap()
    );
    // As a file from before the column existed: no hashes, so no partition selects anything.
    sqlx::query("UPDATE annal_events SET stream_hash = NULL").execute(store.writer()).await.unwrap();
    assert_eq!(partition_counts(&store, 3).await, [0, 0, 0]);
    store.close().await;
    let store = SqliteEventStore::open(&path).await.unwrap();
    assert_eq!(partition_counts(&store, 3).await, expected);
}

#[cfg(feature = "projections")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_opening_a_new_file_at_once_both_migrate_it() {
    // Two stores on one file stand for two processes; they race on every migration.
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let open = || async {
            let store = SqliteEventStore::open(&path).await.expect("the event store's migrations");
            annal::projections::SqliteProjectionStore::new(&store).await.expect("the projection store's migrations");
            store
        };
        let (a, b) = tokio::join!(open(), open());
        a.close().await;
        b.close().await;
    }
}
