//! The conformance suite: every behaviour the `EventStore` contract promises, written once and
//! run against every backend by `suite!`.

use std::collections::HashSet;
use std::time::Duration;

use annal::{
    Direction, Error, EventStore, ExpectedVersion, Filter, Metadata, NewEvent, Position, ReadStream, RecordedEvent,
    StreamName, SubscriptionOptions, partition_of,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use uuid::Uuid;

/// Generates one `#[tokio::test]` per conformance case for a backend. `$make` is an async
/// expression giving a fresh, empty store and a guard that keeps its resources alive.
macro_rules! suite {
    ($make:expr) => {
        crate::conformance::suite!(@cases $make;
            append_and_read_back, expected_version_modes, conflicts_write_nothing, idempotent_retries,
            duplicates_that_are_not_retries, bad_input_writes_nothing, read_stream_directions_and_limits,
            read_all_filters_and_moves_past_unselected, one_winner_among_concurrent_appenders,
            concurrent_writers_are_seen_once_in_order, subscription_catches_up_then_follows_live,
            slow_subscriber_does_not_block_writers, large_batch_is_atomic, json_round_trips_exactly,
            snapshots_keep_the_newest, partitions_split_the_log_in_the_store,
            many_subscriptions_each_get_exactly_their_events);
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $make.await;
                crate::conformance::$case(store).await;
            }
        )*
    };
}
pub(crate) use suite;

/// How long a test waits for something that should happen at once before failing.
const PATIENCE: Duration = Duration::from_secs(30);

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn event(n: usize) -> NewEvent {
    NewEvent::new(if n.is_multiple_of(2) { "Even" } else { "Odd" }, json!({ "n": n }))
}

fn events(range: std::ops::Range<usize>) -> Vec<NewEvent> {
    range.map(event).collect()
}

/// Waits until the global log's visible head reaches `position`. On PostgreSQL a committed event
/// becomes visible once every older transaction in the cluster has ended (docs/ordering.md).
async fn visible<S: EventStore>(store: &S, position: Position) -> Position {
    let mut wakeup = store.wakeup();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        wakeup.mark_seen();
        let head = store.head().await.unwrap();
        if head >= position {
            return head;
        }
        assert!(tokio::time::Instant::now() < deadline, "{position} never became visible (head {head})");
        wakeup.wait(Duration::from_millis(20)).await;
    }
}

/// Appends a marker event and waits until it is visible: every event written before it is then
/// visible too. Returns its position.
async fn settle<S: EventStore>(store: &S) -> Position {
    let marker = stream(&format!("marker-{}", Uuid::now_v7().simple()));
    let written =
        store.append(&marker, ExpectedVersion::NoStream, vec![NewEvent::new("Marker", json!({}))]).await.unwrap();
    visible(store, written.position()).await;
    written.position()
}

/// Fails if anything but markers was written after `since`.
async fn assert_nothing_written_since<S: EventStore>(store: &S, since: Position, what: &str) {
    settle(store).await;
    let later: Vec<RecordedEvent> = store.read_all(since, Filter::all()).try_collect().await.unwrap();
    let written: Vec<_> = later.iter().filter(|e| e.event_type != "Marker").map(|e| (&e.stream, e.version)).collect();
    assert!(written.is_empty(), "{what} wrote {written:?}");
}

async fn all_events<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    store.read_all(Position::START, Filter::all()).try_collect().await.unwrap()
}

async fn stream_events<S: EventStore>(store: &S, name: &StreamName) -> Vec<RecordedEvent> {
    store.read_stream(name, ReadStream::forwards()).try_collect().await.unwrap()
}

async fn next_event(sub: &mut (impl futures::Stream<Item = annal::Result<RecordedEvent>> + Unpin)) -> RecordedEvent {
    tokio::time::timeout(PATIENCE, sub.next())
        .await
        .expect("subscription stalled")
        .expect("subscription ended")
        .unwrap()
}

pub(crate) async fn append_and_read_back<S: EventStore>(store: S) {
    let s = stream("order-1");
    let correlation = Uuid::now_v7();
    let first =
        NewEvent::new("Placed", json!({ "total": 12.5, "lines": [1, 2] })).with_schema_version(3).with_metadata(
            Metadata::default().with_correlation_id(correlation).with_causation_id(correlation).with("user", "ada"),
        );
    let second = NewEvent::new("Paid", json!(null));
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let written = store.append(&s, ExpectedVersion::NoStream, vec![first.clone(), second.clone()]).await.unwrap();
    assert_eq!(written.version, 1);
    assert_eq!(written.positions.len(), 2);
    assert!(written.positions[0] < written.positions[1]);
    assert_eq!(written.position(), written.positions[1]);

    let read = stream_events(&store, &s).await;
    assert_eq!(read.len(), 2);
    for (i, (got, sent)) in read.iter().zip([&first, &second]).enumerate() {
        assert_eq!(got.id, sent.id);
        assert_eq!(got.stream, s);
        assert_eq!(got.version, i as u64);
        assert_eq!(got.position, written.positions[i]);
        assert_eq!(got.event_type, sent.event_type);
        assert_eq!(got.schema_version, sent.schema_version);
        assert_eq!(got.data, sent.data);
        assert_eq!(got.metadata, sent.metadata);
        assert!(got.recorded_at > before && got.recorded_at < chrono::Utc::now() + chrono::Duration::seconds(5));
    }
    assert_eq!(read[0].metadata.correlation_id, Some(correlation));
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(1));
    assert_eq!(store.stream_version(&stream("order-2")).await.unwrap(), None);
    assert_eq!(visible(&store, written.position()).await, written.position());
    assert_eq!(all_events(&store).await, read);
}

pub(crate) async fn expected_version_modes<S: EventStore>(store: S) {
    let s = stream("mode-1");
    // Any creates and extends.
    assert_eq!(store.append(&s, ExpectedVersion::Any, events(0..1)).await.unwrap().version, 0);
    assert_eq!(store.append(&s, ExpectedVersion::Any, events(1..3)).await.unwrap().version, 2);
    // StreamExists needs the stream.
    assert_eq!(store.append(&s, ExpectedVersion::StreamExists, events(3..4)).await.unwrap().version, 3);
    // Exact must match the last version.
    assert_eq!(store.append(&s, ExpectedVersion::Exact(3), events(4..5)).await.unwrap().version, 4);
    // NoStream creates.
    let t = stream("mode-2");
    assert_eq!(store.append(&t, ExpectedVersion::NoStream, events(0..2)).await.unwrap().version, 1);
    assert_eq!(ExpectedVersion::from_current(Some(1)), ExpectedVersion::Exact(1));
}

pub(crate) async fn conflicts_write_nothing<S: EventStore>(store: S) {
    let s = stream("conflict-1");
    store.append(&s, ExpectedVersion::NoStream, events(0..3)).await.unwrap();
    let head = settle(&store).await;
    let missing = stream("conflict-2");
    let cases = [
        (&s, ExpectedVersion::NoStream, Some(2)),
        (&s, ExpectedVersion::Exact(1), Some(2)),
        (&s, ExpectedVersion::Exact(3), Some(2)),
        (&s, ExpectedVersion::Exact(99), Some(2)),
        (&missing, ExpectedVersion::StreamExists, None),
        (&missing, ExpectedVersion::Exact(0), None),
        (&missing, ExpectedVersion::Exact(5), None),
    ];
    for (name, expected, actual_version) in cases {
        let err = store.append(name, expected, events(10..12)).await.unwrap_err();
        assert!(err.is_conflict(), "{expected:?}: {err}");
        match err {
            Error::Conflict { stream, expected: e, actual } => {
                assert_eq!((&stream, e, actual), (name, expected, actual_version));
            }
            other => panic!("not a conflict: {other}"),
        }
    }
    assert_nothing_written_since(&store, head, "a conflict").await;
    assert_eq!(stream_events(&store, &s).await.len(), 3);
    assert!(stream_events(&store, &missing).await.is_empty());
}

pub(crate) async fn idempotent_retries<S: EventStore>(store: S) {
    for (i, expected) in
        [ExpectedVersion::NoStream, ExpectedVersion::Any, ExpectedVersion::StreamExists, ExpectedVersion::Exact(1)]
            .into_iter()
            .enumerate()
    {
        let s = stream(&format!("retry-{i}"));
        if matches!(expected, ExpectedVersion::StreamExists | ExpectedVersion::Exact(_)) {
            store.append(&s, ExpectedVersion::NoStream, events(0..2)).await.unwrap();
        }
        let batch = events(5..8);
        let original = store.append(&s, expected, batch.clone()).await.unwrap();
        let head = settle(&store).await;
        // The same batch again, in the same mode: the original result, nothing written.
        let retried = store.append(&s, expected, batch.clone()).await.unwrap();
        assert_eq!(retried, original, "{expected:?}");
        assert_nothing_written_since(&store, head, &format!("a retry with {expected:?}")).await;
        // Still idempotent after the stream moved on.
        store.append(&s, ExpectedVersion::Any, events(20..21)).await.unwrap();
        assert_eq!(store.append(&s, expected, batch).await.unwrap(), original, "{expected:?} after more events");
        assert_eq!(stream_events(&store, &s).await.len() as u64, original.version + 2);
    }
}

pub(crate) async fn duplicates_that_are_not_retries<S: EventStore>(store: S) {
    let s = stream("dup-1");
    let batch = events(0..3);
    store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    let head = settle(&store).await;
    let fresh = event(9);
    let cases: Vec<(StreamName, ExpectedVersion, Vec<NewEvent>, Vec<Uuid>)> = vec![
        // Partly overlapping: one old id, one new.
        (s.clone(), ExpectedVersion::Any, vec![batch[2].clone(), fresh.clone()], vec![batch[2].id]),
        // All old, but not contiguous in the stream.
        (s.clone(), ExpectedVersion::Any, vec![batch[0].clone(), batch[2].clone()], vec![batch[0].id, batch[2].id]),
        // All old, at another place than the expectation allows.
        (s.clone(), ExpectedVersion::Exact(5), batch.clone(), batch.iter().map(|e| e.id).collect()),
        // All old, in another order.
        (
            s.clone(),
            ExpectedVersion::Any,
            batch.iter().rev().cloned().collect(),
            batch.iter().rev().map(|e| e.id).collect(),
        ),
        // All old, to another stream.
        (stream("dup-2"), ExpectedVersion::Any, batch.clone(), batch.iter().map(|e| e.id).collect()),
    ];
    for (name, expected, batch, dup_ids) in cases {
        match store.append(&name, expected, batch).await {
            Err(Error::DuplicateEvents { stream, event_ids }) => {
                assert_eq!(stream, name);
                assert_eq!(event_ids, dup_ids);
            }
            other => panic!("{name} {expected:?}: expected DuplicateEvents, got {other:?}"),
        }
    }
    assert_nothing_written_since(&store, head, "a rejected batch").await;
    assert!(stream_events(&store, &stream("dup-2")).await.is_empty());
    assert!(!all_events(&store).await.iter().any(|e| e.id == fresh.id));
}

pub(crate) async fn bad_input_writes_nothing<S: EventStore>(store: S) {
    let s = stream("bad-1");
    store.append(&s, ExpectedVersion::NoStream, events(0..1)).await.unwrap();
    let head = settle(&store).await;
    let good = event(1);
    let big = NewEvent::new("Big", json!("x".repeat(annal::DEFAULT_MAX_EVENT_SIZE)));
    let repeated = event(2);
    type IsExpected = fn(&Error) -> bool;
    let cases: Vec<(Vec<NewEvent>, IsExpected)> = vec![
        (vec![], |e| matches!(e, Error::EmptyBatch)),
        (vec![good.clone(), NewEvent::new("", json!({}))], |e| matches!(e, Error::InvalidEventType { .. })),
        (vec![good.clone(), NewEvent::new("T".repeat(256), json!({}))], |e| {
            matches!(e, Error::InvalidEventType { .. })
        }),
        (vec![good.clone(), NewEvent::new("bad\ntype", json!({}))], |e| matches!(e, Error::InvalidEventType { .. })),
        (vec![good.clone(), big], |e| matches!(e, Error::EventTooLarge { max: annal::DEFAULT_MAX_EVENT_SIZE, .. })),
        (vec![repeated.clone(), good.clone(), repeated], |e| matches!(e, Error::DuplicateEventInBatch { .. })),
        (vec![good.clone(), NewEvent::new("Nul", json!({ "s": "a\u{0}" }))], |e| {
            matches!(e, Error::UnsupportedData { .. })
        }),
    ];
    for (batch, is_expected) in cases {
        for expected in [ExpectedVersion::Any, ExpectedVersion::Exact(0)] {
            let err = store.append(&s, expected, batch.clone()).await.unwrap_err();
            assert!(is_expected(&err), "unexpected error: {err}");
        }
    }
    assert_nothing_written_since(&store, head, "rejected input").await;
    assert_eq!(stream_events(&store, &s).await.len(), 1);
    // A name with a control character never becomes a stream name at all.
    assert!(matches!(StreamName::new("bad\u{7}"), Err(Error::InvalidStreamName { .. })));
}

pub(crate) async fn read_stream_directions_and_limits<S: EventStore>(store: S) {
    let s = stream("read-1");
    store.append(&s, ExpectedVersion::NoStream, events(0..10)).await.unwrap();
    store.append(&stream("read-2"), ExpectedVersion::NoStream, events(0..3)).await.unwrap();
    let versions = |read: ReadStream| {
        let store = &store;
        let s = &s;
        async move { store.read_stream(s, read).map_ok(|e| e.version).try_collect::<Vec<_>>().await.unwrap() }
    };
    assert_eq!(versions(ReadStream::forwards()).await, (0..10).collect::<Vec<_>>());
    assert_eq!(versions(ReadStream::forwards().from_version(3).limit(4)).await, vec![3, 4, 5, 6]);
    assert_eq!(versions(ReadStream::forwards().from_version(8)).await, vec![8, 9]);
    assert!(versions(ReadStream::forwards().from_version(10)).await.is_empty());
    assert_eq!(versions(ReadStream::backwards().limit(3)).await, vec![9, 8, 7]);
    assert_eq!(versions(ReadStream::backwards().from_version(5)).await, vec![5, 4, 3, 2, 1, 0]);
    assert_eq!(versions(ReadStream::backwards().from_version(50).limit(2)).await, vec![9, 8]);
    // Paging gives the same answer as one page.
    assert_eq!(versions(ReadStream::forwards().page_size(3)).await, (0..10).collect::<Vec<_>>());
    assert_eq!(versions(ReadStream::backwards().page_size(4)).await, (0..10).rev().collect::<Vec<_>>());
    assert_eq!(versions(ReadStream::forwards().page_size(5).limit(7)).await, (0..7).collect::<Vec<_>>());
    assert_eq!(store.read_stream_page(&s, Direction::Backwards, 0, 10).await.unwrap().len(), 1);
    assert!(stream_events(&store, &stream("read-3")).await.is_empty());
}

pub(crate) async fn read_all_filters_and_moves_past_unselected<S: EventStore>(store: S) {
    let mut last = Position::START;
    for i in 0..4 {
        last = store
            .append(&stream(&format!("cat{}-{i}", i % 2)), ExpectedVersion::Any, events(0..5))
            .await
            .unwrap()
            .position();
    }
    visible(&store, last).await;
    let everything = all_events(&store).await;
    assert_eq!(everything.len(), 20);
    assert!(everything.windows(2).all(|w| w[0].position < w[1].position));
    let by = |filter: Filter| {
        let store = &store;
        async move { store.read_all(Position::START, filter).try_collect::<Vec<_>>().await.unwrap() }
    };
    let cat0 = by(Filter::categories(["cat0"])).await;
    assert_eq!(cat0, everything.iter().filter(|e| e.stream.category() == "cat0").cloned().collect::<Vec<_>>());
    let odd = by(Filter::event_types(["Odd"])).await;
    assert_eq!(odd.len(), 8);
    let both = by(Filter::categories(["cat1"]).with_event_types(["Even"])).await;
    assert_eq!(both.len(), 6);
    assert!(both.iter().all(|e| e.stream.category() == "cat1" && e.event_type == "Even"));
    let from_middle: Vec<_> = store.read_all(everything[9].position, Filter::all()).try_collect().await.unwrap();
    assert_eq!(from_middle, everything[10..]);
    // Paging: small pages give the same events.
    let mut paged = Vec::new();
    let mut from = Position::START;
    loop {
        let page = store.read_all_page(from, &Filter::all(), 3).await.unwrap();
        if page.events.is_empty() {
            break;
        }
        assert!(page.events.len() <= 3);
        from = page.next;
        paged.extend(page.events);
    }
    assert_eq!(paged, everything);
    // Counting what a reader at some position is behind.
    let head = store.head().await.unwrap();
    assert_eq!(store.count(Position::START, head, &Filter::all()).await.unwrap(), 20);
    assert_eq!(store.count(everything[4].position, head, &Filter::all()).await.unwrap(), 15);
    assert_eq!(store.count(Position::START, everything[9].position, &Filter::categories(["cat0"])).await.unwrap(), 5);
    assert_eq!(store.count(Position::START, head, &Filter::event_types(["Odd"])).await.unwrap(), 8);
    assert_eq!(store.count(head, head, &Filter::all()).await.unwrap(), 0);
    // A filter that selects nothing still moves the reader to the head, so a selective
    // consumer's checkpoint keeps up.
    let page = store.read_all_page(Position::START, &Filter::categories(["nothing"]), 100).await.unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next, store.head().await.unwrap());
}

pub(crate) async fn one_winner_among_concurrent_appenders<S: EventStore + Clone + 'static>(store: S) {
    let s = stream("race-1");
    store.append(&s, ExpectedVersion::NoStream, events(0..1)).await.unwrap();
    for round in 0..20u64 {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, s) = (store.clone(), s.clone());
                tokio::spawn(async move { store.append(&s, ExpectedVersion::Exact(round), vec![event(i)]).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(r) => {
                    assert_eq!(r.version, round + 1);
                    wins += 1;
                }
                Err(e) => assert!(e.is_conflict(), "round {round}: {e}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one appender must win");
    }
    assert_eq!(stream_events(&store, &s).await.len(), 21);
}

pub(crate) async fn concurrent_writers_are_seen_once_in_order<S: EventStore + Clone + 'static>(store: S) {
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;
    let subscriber = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut sub = store.subscribe(Position::START, Filter::all());
            let mut seen = Vec::new();
            while seen.len() < WRITERS * APPENDS * 2 {
                seen.push(next_event(&mut sub).await);
            }
            seen
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream(&format!("writer-{w}"));
                let mut ids = Vec::new();
                for i in 0..APPENDS {
                    let batch = events(i * 2..i * 2 + 2);
                    ids.extend(batch.iter().map(|e| e.id));
                    let expected =
                        if i == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(i as u64 * 2 - 1) };
                    store.append(&s, expected, batch).await.unwrap();
                }
                ids
            })
        })
        .collect();
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    let seen = subscriber.await.unwrap();
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position), "positions not strictly increasing");
    let seen_ids: HashSet<_> = seen.iter().map(|e| e.id).collect();
    assert_eq!(seen_ids.len(), seen.len(), "an event was delivered twice");
    assert_eq!(seen_ids, written);
    assert_eq!(all_events(&store).await, seen);
    // Each stream's events arrive in version order.
    for w in 0..WRITERS {
        let name = stream(&format!("writer-{w}"));
        let versions: Vec<_> = seen.iter().filter(|e| e.stream == name).map(|e| e.version).collect();
        assert_eq!(versions, (0..APPENDS as u64 * 2).collect::<Vec<_>>());
    }
}

pub(crate) async fn subscription_catches_up_then_follows_live<S: EventStore + Clone + 'static>(store: S) {
    let a = stream("live-1");
    let b = stream("other-1");
    let first = store.append(&a, ExpectedVersion::NoStream, events(0..5)).await.unwrap();
    store.append(&b, ExpectedVersion::NoStream, events(0..2)).await.unwrap();

    // With an hour-long poll interval, live events can only arrive through wake-ups.
    let push_only = SubscriptionOptions::default().poll_interval(Duration::from_secs(3600)).page_size(2);
    let mut all = store.subscribe_with(Position::START, Filter::all(), push_only.clone());
    for i in 0..7 {
        assert_eq!(next_event(&mut all).await.version, if i < 5 { i } else { i - 5 });
    }
    let (caught_up, caught_up_rx) = tokio::sync::oneshot::channel();
    let live_only = {
        let (store, from, options) = (store.clone(), first.positions[2], push_only.clone());
        tokio::spawn(async move {
            let mut sub = store.subscribe_with(from, Filter::categories(["live"]), options);
            let _ = caught_up.send((next_event(&mut sub).await.version, next_event(&mut sub).await.version));
            // Caught up: now wait for the next live event.
            next_event(&mut sub).await
        })
    };
    assert_eq!(caught_up_rx.await.unwrap(), (3, 4));
    store.append(&b, ExpectedVersion::Exact(1), events(2..3)).await.unwrap();
    let later = store.append(&a, ExpectedVersion::Exact(4), events(5..6)).await.unwrap();
    assert_eq!(next_event(&mut all).await.stream, b);
    let e = next_event(&mut all).await;
    assert_eq!((e.stream.as_str(), e.version, e.position), ("live-1", 5, later.position()));
    let seen = tokio::time::timeout(PATIENCE, live_only).await.expect("live event not delivered").unwrap();
    assert_eq!((seen.version, seen.position), (5, later.position()));
}

pub(crate) async fn slow_subscriber_does_not_block_writers<S: EventStore + Clone + 'static>(store: S) {
    let mut idle = store.subscribe(Position::START, Filter::all());
    // Take one event so the subscription has started and holds a page.
    store.append(&stream("slow-0"), ExpectedVersion::NoStream, events(0..1)).await.unwrap();
    next_event(&mut idle).await;
    // Writers go on while the subscriber takes nothing.
    for i in 1..=200 {
        tokio::time::timeout(
            PATIENCE,
            store.append(&stream(&format!("slow-{i}")), ExpectedVersion::NoStream, events(0..10)),
        )
        .await
        .expect("a writer was blocked by an idle subscriber")
        .unwrap();
    }
    let mut count = 0;
    while count < 2000 {
        next_event(&mut idle).await;
        count += 1;
    }
}

pub(crate) async fn large_batch_is_atomic<S: EventStore>(store: S) {
    let s = stream("bulk-1");
    let written = store.append(&s, ExpectedVersion::NoStream, events(0..2000)).await.unwrap();
    assert_eq!(written.version, 1999);
    assert!(written.positions.windows(2).all(|w| w[0] < w[1]));
    let read = stream_events(&store, &s).await;
    assert_eq!(read.len(), 2000);
    assert!(read.iter().enumerate().all(|(i, e)| e.version == i as u64 && e.data == json!({ "n": i })));
    // A batch that fails at its last event writes none of the others.
    let mut batch = events(0..1999);
    batch.push(NewEvent::new("", json!({})));
    assert!(store.append(&s, ExpectedVersion::Exact(1999), batch).await.is_err());
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(1999));
}

pub(crate) async fn json_round_trips_exactly<S: EventStore>(store: S) {
    let s = stream("json-1");
    let payloads = [
        json!({ "unicode": "żółw 🐢 \u{1}\"\\", "nested": { "list": [1, "two", null, true, 1.5e300] } }),
        json!(i64::MIN),
        json!(u64::MAX),
        json!("just a string"),
        json!([]),
        json!({}),
        json!(-0.000123),
    ];
    let batch: Vec<_> = payloads.iter().map(|p| NewEvent::new("Json", p.clone())).collect();
    store.append(&s, ExpectedVersion::NoStream, batch).await.unwrap();
    let read = stream_events(&store, &s).await;
    let got: Vec<_> = read.iter().map(|e| e.data.clone()).collect();
    assert_eq!(got, payloads);
    // Metadata keeps free-form fields beside the first-class ids.
    let meta = Metadata::default().with("tenant", json!({ "id": 7 })).with("trace", "abc");
    let written = store
        .append(&s, ExpectedVersion::Any, vec![NewEvent::new("Meta", json!(1)).with_metadata(meta.clone())])
        .await
        .unwrap();
    let last = store.read_stream(&s, ReadStream::backwards().limit(1)).try_collect::<Vec<_>>().await.unwrap();
    assert_eq!(last[0].metadata, meta);
    assert_eq!(last[0].position, written.position());
}

pub(crate) async fn snapshots_keep_the_newest<S: EventStore>(store: S) {
    let s = stream("snap-1");
    assert_eq!(store.load_snapshot(&s).await.unwrap(), None);
    let v5 = annal::Snapshot::new(5, 1, json!({ "balance": 5 }));
    store.save_snapshot(&s, &v5).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(v5.clone()));
    // An older snapshot (a slow writer) never replaces a newer one.
    store.save_snapshot(&s, &annal::Snapshot::new(3, 1, json!({ "balance": 3 }))).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(v5));
    let v9 = annal::Snapshot::new(9, 1, json!({ "balance": 9, "nested": [1, 2] }));
    store.save_snapshot(&s, &v9).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(v9));
    // A new schema version replaces whatever was there.
    let v2 = annal::Snapshot::new(4, 2, json!({ "cents": 400 }));
    store.save_snapshot(&s, &v2).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(v2));
    assert_eq!(store.load_snapshot(&stream("snap-2")).await.unwrap(), None);
}

/// Reads every event `filter` selects, in small pages (so pages move past unselected events).
async fn read_filtered<S: EventStore>(store: &S, filter: &Filter) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut from = Position::START;
    loop {
        let page = store.read_all_page(from, filter, 7).await.unwrap();
        events.extend(page.events);
        if page.next == from {
            return events;
        }
        from = page.next;
    }
}

pub(crate) async fn partitions_split_the_log_in_the_store<S: EventStore>(store: S) {
    for i in 0..40 {
        let category = if i % 4 == 0 { "order" } else { "account" };
        let s = StreamName::from_parts(category, i).unwrap();
        store.append(&s, ExpectedVersion::NoStream, events(0..(i % 3) + 1)).await.unwrap();
    }
    let head = settle(&store).await;
    let all = all_events(&store).await;
    for base in [Filter::all(), Filter::categories(["account"]).with_event_types(["Even"])] {
        let mut seen = Vec::new();
        for partition in 0..3 {
            let filter = base.clone().with_partition(partition, 3);
            let mine = read_filtered(&store, &filter).await;
            assert!(!mine.is_empty(), "partition {partition} of 3 got no stream");
            for e in &mine {
                assert_eq!(partition_of(&e.stream, 3), partition, "{} read by the wrong partition", e.stream);
                assert!(base.matches(e) && filter.matches(e));
            }
            assert_eq!(store.count(Position::START, head, &filter).await.unwrap(), mine.len() as u64);
            seen.extend(mine.into_iter().map(|e| e.id));
        }
        // Together, the partitions are exactly the unpartitioned selection, each event once.
        let expected: Vec<Uuid> = all.iter().filter(|e| base.matches(e)).map(|e| e.id).collect();
        seen.sort();
        let mut sorted = expected.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
    }
    // A partition index out of range selects nothing; one partition is everything.
    assert!(read_filtered(&store, &Filter::all().with_partition(3, 3)).await.is_empty());
    assert_eq!(Filter::all().with_partition(0, 1), Filter::all());
}

pub(crate) async fn many_subscriptions_each_get_exactly_their_events<S: EventStore + Clone + 'static>(store: S) {
    // Some history, so that subscriptions starting early catch up while others follow the head.
    let mut middle = Position::START;
    for i in 0..20 {
        let s = StreamName::from_parts(if i % 2 == 0 { "fan" } else { "out" }, i % 5).unwrap();
        middle = store.append(&s, ExpectedVersion::Any, events(i..i + 1)).await.unwrap().position();
    }
    let filters = [
        Filter::all(),
        Filter::categories(["fan"]),
        Filter::event_types(["Even", "Last"]),
        Filter::all().with_partition(0, 3),
        Filter::categories(["out"]).with_partition(2, 3),
    ];
    let subscriptions: Vec<_> = (0..40)
        .map(|i| {
            let (filter, from) =
                (filters[i % filters.len()].clone(), if i % 3 == 0 { Position::START } else { middle });
            let store = store.clone();
            tokio::spawn(async move {
                let mut sub = store.subscribe_with(from, filter.clone(), SubscriptionOptions::default().page_size(7));
                let mut got = Vec::new();
                // Until the last event the writer appends (a marker every filter selects).
                loop {
                    let e = next_event(&mut sub).await;
                    let done = e.event_type == "Last";
                    got.push(e.id);
                    if done {
                        break;
                    }
                }
                let expected: Vec<Uuid> = all_events(&store)
                    .await
                    .into_iter()
                    .filter(|e| e.position > from && filter.matches(e))
                    .map(|e| e.id)
                    .collect();
                (i, got, expected)
            })
        })
        .collect();
    // Writers append while the subscriptions run, from several tasks.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let s =
                        StreamName::from_parts(if (w + i) % 2 == 0 { "fan" } else { "out" }, (w * 7 + i) % 9).unwrap();
                    store.append(&s, ExpectedVersion::Any, events(i..i + 1)).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // The last event: one per partition of 3 and category, so that every filter sees one.
    for i in 0..30 {
        let s = StreamName::from_parts(if i % 2 == 0 { "fan" } else { "out" }, format!("last{i}")).unwrap();
        store.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Last", json!({}))]).await.unwrap();
    }
    for subscription in subscriptions {
        let (i, got, expected) =
            tokio::time::timeout(PATIENCE, subscription).await.expect("a subscription stalled").unwrap();
        // Each got the selected events in global order, none twice, up to its first `Last`.
        assert_eq!(got, expected[..got.len()], "subscription {i}");
        assert!(got.len() > 1, "subscription {i} got only {got:?}");
    }
}
