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

mod content;
pub(crate) use content::{
    content_filter_values_are_bound_not_spliced, content_filtered_subscriptions_get_exactly_their_events,
    content_filters_select_as_in_memory,
};

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
            snapshots_keep_the_newest, appends_with_a_snapshot_write_both_or_neither,
            a_snapshot_and_the_events_after_it_read_as_apart,
            partitions_split_the_log_in_the_store,
            many_subscriptions_each_get_exactly_their_events,
            what_can_be_stored_reads_back_and_the_rest_is_refused, numbers_read_back_alike,
            positions_past_the_head_read_nothing, a_limit_of_zero_is_an_argument_error,
            forty_concurrent_appenders_in_every_mode, a_retry_racing_a_conflicting_append_ends_one_way,
            generated_events_round_trip_as_in_memory, content_filters_select_as_in_memory,
            content_filter_values_are_bound_not_spliced, content_filtered_subscriptions_get_exactly_their_events,
            subscriptions_in_pages_of_any_size_deliver_the_log_once_in_order);
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

use crate::support::visible;

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

/// A caller-supplied trace context (the W3C specification's example).
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

pub(crate) async fn append_and_read_back<S: EventStore>(store: S) {
    let s = stream("order-1");
    let correlation = Uuid::now_v7();
    let first =
        NewEvent::new("Placed", json!({ "total": 12.5, "lines": [1, 2] })).with_schema_version(3).with_metadata(
            Metadata::default()
                .with_correlation_id(correlation)
                .with_causation_id(correlation)
                .with_traceparent(TRACEPARENT.parse().unwrap())
                .with("user", "ada"),
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
    assert_eq!(read[0].metadata.traceparent.map(|t| t.to_string()).as_deref(), Some(TRACEPARENT));
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
    // One event and several: a backend may write them by different statements.
    for ((name, expected, actual_version), size) in cases.into_iter().flat_map(|case| [1, 2].map(|size| (case, size))) {
        let err = store.append(name, expected, events(10..10 + size)).await.unwrap_err();
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
        assert!(!original.already_written && retried.already_written, "{expected:?}: the retry says so");
        assert_eq!((retried.version, &retried.positions), (original.version, &original.positions), "{expected:?}");
        assert_nothing_written_since(&store, head, &format!("a retry with {expected:?}")).await;
        // Still idempotent after the stream moved on: the version is where the batch was written.
        store.append(&s, ExpectedVersion::Any, events(20..21)).await.unwrap();
        let late = store.append(&s, expected, batch).await.unwrap();
        assert_eq!(late, retried, "{expected:?} after more events");
        assert_eq!(stream_events(&store, &s).await.len() as u64, original.version + 2);
    }
}

pub(crate) async fn duplicates_that_are_not_retries<S: EventStore>(store: S) {
    let s = stream("dup-1");
    let batch = events(0..3);
    let batch_ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
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
            Err(Error::DuplicateEvents { stream, event_ids, written_at }) => {
                assert_eq!(stream, name);
                assert_eq!(event_ids, dup_ids);
                // Each id's place: the stream and version where it was written.
                let places: Vec<(String, u64)> = dup_ids
                    .iter()
                    .map(|id| ("dup-1".to_owned(), batch_ids.iter().position(|b| b == id).unwrap() as u64))
                    .collect();
                assert_eq!(written_at, places);
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

/// Page boundaries while catching up (many subscriptions at once, so that none may hold the
/// readers' connections) and the switch to following live: whatever the page size, every
/// selected event arrives once, in the log's order.
pub(crate) async fn subscriptions_in_pages_of_any_size_deliver_the_log_once_in_order<
    S: EventStore + Clone + 'static,
>(
    store: S,
) {
    let mut n = 0;
    for (i, size) in [1, 4, 2, 7, 3, 8].into_iter().enumerate() {
        let name = stream(&format!("{}-{i}", if i % 3 == 0 { "other" } else { "paged" }));
        store.append(&name, ExpectedVersion::NoStream, events(n..n + size)).await.unwrap();
        n += size;
    }
    let key = |e: &RecordedEvent| (e.position, e.id);
    let live = stream("paged-live");
    let mut subs = Vec::new();
    for page_size in 1..=9 {
        for filter in [Filter::all(), Filter::categories(["paged"])] {
            let options = SubscriptionOptions::default().page_size(page_size);
            subs.push((page_size, filter.clone(), store.subscribe_with(Position::START, filter, options)));
        }
    }
    let log = all_events(&store).await;
    for (page_size, filter, sub) in &mut subs {
        let expected: Vec<_> = log.iter().filter(|e| filter.matches(e)).map(key).collect();
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(key(&next_event(sub).await));
        }
        assert_eq!(got, expected, "pages of {page_size}, {filter:?}, catching up");
    }
    // Caught up: what comes next is live, and arrives once, after the history.
    let appended = store.append(&live, ExpectedVersion::NoStream, events(0..3)).await.unwrap();
    for (page_size, filter, sub) in &mut subs {
        for position in &appended.positions {
            let event = next_event(sub).await;
            assert_eq!(event.position, *position, "pages of {page_size}, {filter:?}, live");
        }
    }
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
    // Snapshots follow the rules events do: nothing is stored that cannot be read back.
    for bad in [annal::Snapshot::new(20, 1 << 31, json!({})), annal::Snapshot::new(20, 2, nested(101))] {
        let refused = store.save_snapshot(&s, &bad).await;
        assert!(matches!(refused, Err(Error::InvalidArgument { .. })), "{refused:?}");
    }
    let big = annal::Snapshot::new(21, 2, json!({ "total": 1e16, "deep": nested(99) }));
    store.save_snapshot(&s, &big).await.unwrap();
    let loaded = store.load_snapshot(&s).await.unwrap().unwrap();
    assert_eq!(loaded.state, json!({ "total": 10_000_000_000_000_000u64, "deep": nested(99) }));
}

/// `append_with_snapshot` stores the snapshot exactly when it stores the events: never for a
/// conflict, a duplicate, an idempotent retry or bad input, and never replacing a newer one.
pub(crate) async fn appends_with_a_snapshot_write_both_or_neither<S: EventStore>(store: S) {
    let s = stream("snapped-1");
    let snap = |version, schema, total| annal::Snapshot::new(version, schema, json!({ "total": total }));
    store.append(&s, ExpectedVersion::NoStream, events(0..3)).await.unwrap();
    let batch = events(3..5);
    let written =
        store.append_with_snapshot(&s, ExpectedVersion::Exact(2), batch.clone(), &snap(4, 1, 5)).await.unwrap();
    assert_eq!((written.version, written.already_written), (4, false));
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(snap(4, 1, 5)));
    assert_eq!(stream_events(&store, &s).await.len(), 5);

    let before = settle(&store).await;
    // A retry of the same append: the original result, and the snapshot is left alone (a new
    // schema version would otherwise replace it).
    let retry = store.append_with_snapshot(&s, ExpectedVersion::Exact(2), batch, &snap(4, 2, 0)).await.unwrap();
    assert!(retry.already_written && retry.positions == written.positions, "{retry:?}");
    // A conflict, and a duplicate of an event of another stream.
    let conflict = store.append_with_snapshot(&s, ExpectedVersion::Exact(2), events(0..1), &snap(3, 2, 0)).await;
    assert!(matches!(conflict, Err(Error::Conflict { .. })), "{conflict:?}");
    // A conflict no unique key catches: the stream is shorter than expected.
    let short = store.append_with_snapshot(&s, ExpectedVersion::Exact(7), events(0..1), &snap(8, 2, 0)).await;
    assert!(matches!(short, Err(Error::Conflict { .. })), "{short:?}");
    let missing =
        store.append_with_snapshot(&other_stream(), ExpectedVersion::Exact(0), events(0..1), &snap(1, 2, 0)).await;
    assert!(matches!(missing, Err(Error::Conflict { .. })), "{missing:?}");
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(snap(4, 1, 5)));
    let other = stream("snapped-2");
    let stolen = NewEvent::new("Even", json!({})).with_id(uuid_of(&store, &s).await);
    let duplicate = store.append_with_snapshot(&other, ExpectedVersion::NoStream, vec![stolen], &snap(0, 2, 0)).await;
    assert!(matches!(duplicate, Err(Error::DuplicateEvents { .. })), "{duplicate:?}");
    assert_eq!(store.load_snapshot(&other).await.unwrap(), None);
    assert_eq!(store.load_snapshot(&other_stream()).await.unwrap(), None);
    // Bad input: a snapshot at another version than the append ends at, an expectation without
    // a version, a state no store keeps.
    let refused = [
        store.append_with_snapshot(&s, ExpectedVersion::Exact(4), events(5..6), &snap(6, 2, 0)).await,
        store.append_with_snapshot(&s, ExpectedVersion::Exact(4), events(5..7), &snap(5, 2, 0)).await,
        store.append_with_snapshot(&s, ExpectedVersion::Any, events(5..6), &snap(5, 2, 0)).await,
        store.append_with_snapshot(&s, ExpectedVersion::StreamExists, events(5..6), &snap(5, 2, 0)).await,
        store.append_with_snapshot(&s, ExpectedVersion::Exact(u64::MAX), events(5..6), &snap(0, 2, 0)).await,
        store
            .append_with_snapshot(&s, ExpectedVersion::Exact(4), events(5..6), &annal::Snapshot::new(5, 2, nested(101)))
            .await,
        store
            .append_with_snapshot(
                &s,
                ExpectedVersion::Exact(4),
                events(5..6),
                &annal::Snapshot::new(5, 1 << 31, json!({})),
            )
            .await,
    ];
    for refused in refused {
        assert!(matches!(refused, Err(Error::InvalidArgument { .. })), "{refused:?}");
    }
    let empty = store.append_with_snapshot(&s, ExpectedVersion::Exact(4), Vec::new(), &snap(4, 2, 0)).await;
    assert!(matches!(empty, Err(Error::EmptyBatch | Error::InvalidArgument { .. })), "{empty:?}");
    assert_nothing_written_since(&store, before, "refused appends with a snapshot").await;
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(snap(4, 1, 5)));

    // A snapshot written later by someone else at a higher version stays.
    store.save_snapshot(&s, &snap(9, 1, 9)).await.unwrap();
    store.append_with_snapshot(&s, ExpectedVersion::Exact(4), events(5..6), &snap(5, 1, 6)).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(snap(9, 1, 9)));
    // A new stream, and a new schema version, which replaces whatever was there.
    let fresh = stream("snapped-3");
    store.append_with_snapshot(&fresh, ExpectedVersion::NoStream, events(0..1), &snap(0, 1, 1)).await.unwrap();
    assert_eq!(store.load_snapshot(&fresh).await.unwrap(), Some(snap(0, 1, 1)));
    store.append_with_snapshot(&s, ExpectedVersion::Exact(5), events(6..7), &snap(6, 3, 7)).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(snap(6, 3, 7)));
}

/// `load_snapshot_and_events` reads what `load_snapshot` and then `read_stream_page` from the
/// version after the snapshot read: for streams with no snapshot, one of another schema, one
/// at every version and one past the last event, at limits below, at and above what is there.
pub(crate) async fn a_snapshot_and_the_events_after_it_read_as_apart<S: EventStore>(store: S) {
    let (short, long) = (stream("loaded-short"), stream("loaded-long"));
    store.append(&long, ExpectedVersion::NoStream, events(0..7)).await.unwrap();
    store.append(&short, ExpectedVersion::NoStream, events(0..1)).await.unwrap();
    let apart = async |s: &StreamName, schema_version: u32, limit: usize| {
        let snapshot = store.load_snapshot(s).await.unwrap().filter(|snap| snap.schema_version == schema_version);
        let from = snapshot.as_ref().map_or(0, |snap| snap.version + 1);
        (snapshot, store.read_stream_page(s, Direction::Forwards, from, limit).await.unwrap())
    };
    let mut checked = 0;
    for s in [&long, &short, &stream("loaded-none")] {
        // No snapshot yet, then one at each version (and past the last event), schema 1.
        let snapshots =
            std::iter::once(None).chain((0..9).map(|v| Some(annal::Snapshot::new(v, 1, json!({ "v": v })))));
        for snapshot in snapshots {
            if let Some(snapshot) = &snapshot {
                store.save_snapshot(s, snapshot).await.unwrap();
            }
            for (schema_version, limit) in [(1, 1), (1, 3), (1, 7), (1, 512), (2, 1), (2, 512)] {
                let together = store.load_snapshot_and_events(s, schema_version, limit).await.unwrap();
                assert_eq!(
                    together,
                    apart(s, schema_version, limit).await,
                    "{s} {snapshot:?} {schema_version} {limit}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 10 * 6);
    let (snapshot, after) = store.load_snapshot_and_events(&long, 1, 512).await.unwrap();
    assert_eq!((snapshot.map(|s| s.version), after.len()), (Some(8), 0));
    // A stored snapshot of another schema version is not used.
    store.save_snapshot(&short, &annal::Snapshot::new(0, 2, json!({ "v": 0 }))).await.unwrap();
    let (snapshot, after) = store.load_snapshot_and_events(&short, 1, 512).await.unwrap();
    assert_eq!((snapshot, after.len()), (None, 1));
    let refused = store.load_snapshot_and_events(&long, 1, 0).await;
    assert!(matches!(refused, Err(Error::InvalidArgument { .. })), "{refused:?}");
}

fn other_stream() -> StreamName {
    stream("snapped-missing")
}

/// The id of the first event of `s`.
async fn uuid_of<S: EventStore>(store: &S, s: &StreamName) -> Uuid {
    stream_events(store, s).await[0].id
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

/// `depth` levels of arrays and objects around a number, alternating.
fn nested(depth: usize) -> serde_json::Value {
    use serde_json::Value;
    // Not `json!`, which copies its arguments recursively.
    let mut value = Value::from(1);
    for level in 0..depth {
        value = if level % 2 == 0 {
            Value::Array(vec![value])
        } else {
            Value::Object(std::iter::once(("k".to_owned(), value)).collect())
        };
    }
    value
}

fn is_unsupported(result: &annal::Result<annal::AppendResult>) -> bool {
    matches!(result, Err(Error::UnsupportedData { .. }))
}

/// The limits of what can be stored (docs/concepts.md, "What can be stored"): at the limit it
/// reads back equal, past it every backend refuses it alike and writes nothing. Each case of
/// the review that found events accepted and then unreadable is here.
pub(crate) async fn what_can_be_stored_reads_back_and_the_rest_is_refused<S: EventStore>(store: S) {
    let s = stream("limits-1");
    store.append(&s, ExpectedVersion::NoStream, events(0..1)).await.unwrap();
    let head = settle(&store).await;
    let at = |data| NewEvent::new("Limit", data);
    // Nesting: 100 levels read back; 101, 129 and 100,000 are refused.
    for depth in [101, 129, 100_000] {
        let refused = store.append(&s, ExpectedVersion::Any, vec![at(nested(depth))]).await;
        assert!(is_unsupported(&refused), "{depth} levels: {refused:?}");
    }
    let meta_deep = Metadata::default().with("deep", nested(100));
    let refused = store.append(&s, ExpectedVersion::Any, vec![at(json!(1)).with_metadata(meta_deep)]).await;
    assert!(is_unsupported(&refused), "metadata 101 levels deep (its object counts): {refused:?}");
    // Reserved metadata keys, alone or beside the first-class id.
    for meta in [
        Metadata::default().with("correlation_id", "not-a-uuid"),
        Metadata::default().with("causation_id", 42),
        Metadata::default().with_correlation_id(Uuid::now_v7()).with("correlation_id", "x"),
        // Even a valid trace context: the first-class field holds it, so it reads back typed.
        Metadata::default().with("traceparent", TRACEPARENT),
        Metadata::default().with("traceparent", "00-not-a-trace-context"),
        Metadata::default().with_traceparent(TRACEPARENT.parse().unwrap()).with("traceparent", TRACEPARENT),
    ] {
        let refused = store.append(&s, ExpectedVersion::Any, vec![at(json!(1)).with_metadata(meta.clone())]).await;
        assert!(is_unsupported(&refused), "{meta:?}: {refused:?}");
    }
    // Schema versions above 2^31 - 1.
    for version in [1u32 << 31, u32::MAX] {
        let refused = store.append(&s, ExpectedVersion::Any, vec![at(json!(1)).with_schema_version(version)]).await;
        assert!(is_unsupported(&refused), "schema version {version}: {refused:?}");
    }
    assert_nothing_written_since(&store, head, "refused data").await;

    let meta = Metadata::default().with_correlation_id(Uuid::now_v7()).with("deep", nested(99)).with("", "empty key");
    let accepted = vec![
        at(nested(100)),
        at(json!(1)).with_metadata(meta.clone()),
        at(json!(1)).with_schema_version(annal::MAX_SCHEMA_VERSION),
        at(json!(1)).with_schema_version(0),
    ];
    store.append(&s, ExpectedVersion::Exact(0), accepted.clone()).await.unwrap();
    let read = stream_events(&store, &s).await;
    assert_eq!(read[1].data, nested(100));
    assert_eq!(read[2].metadata, meta);
    assert_eq!(read[3].schema_version, annal::MAX_SCHEMA_VERSION);
    assert_eq!(read[4].schema_version, 0);
    // Every read path returns them: the global log too.
    let last = settle(&store).await;
    let all: Vec<_> = store.read_all(Position::START, Filter::all()).try_collect().await.unwrap();
    assert_eq!(all.iter().filter(|e| e.stream == s).count(), 5);
    assert_eq!(all.last().unwrap().position, last);
}

/// Numbers read back as every backend stores them: integers and fractions exactly; a float
/// whose shortest text has a positive exponent (a whole number, 1e16 and above) as the integer
/// it is when one fits (PostgreSQL keeps numbers as decimals, and JSON text cannot tell them
/// apart).
pub(crate) async fn numbers_read_back_alike<S: EventStore>(store: S) {
    let s = stream("numbers-1");
    let cases = [
        (json!(0.1), json!(0.1)),
        (json!(-0.0), json!(0.0)),
        (json!(1e-7), json!(1e-7)),
        (json!(5e-324), json!(5e-324)),
        (json!(f64::MAX), json!(f64::MAX)),
        (json!(1e15), json!(1e15)),
        (json!(123456789.0), json!(123456789.0)),
        (json!(1e16), json!(10_000_000_000_000_000u64)),
        (json!(-1e16), json!(-10_000_000_000_000_000i64)),
        (json!(1.2345678901234566e17), json!(123_456_789_012_345_660u64)),
        (json!(1.8446744073709552e19), json!(1.8446744073709552e19)), // 2^64: no integer holds it
        (json!(1e300), json!(1e300)),
        (json!(u64::MAX), json!(u64::MAX)),
        (json!(i64::MIN), json!(i64::MIN)),
        (
            json!({ "in": [1e16, { "deep": 2e17 }] }),
            json!({ "in": [10_000_000_000_000_000u64, { "deep": 200_000_000_000_000_000u64 }] }),
        ),
    ];
    let batch: Vec<_> = cases.iter().map(|(given, _)| NewEvent::new("Number", given.clone())).collect();
    let metadata = Metadata::default().with("n", 1e16);
    let mut batch = batch;
    batch[0] = batch[0].clone().with_metadata(metadata);
    store.append(&s, ExpectedVersion::NoStream, batch).await.unwrap();
    let read = stream_events(&store, &s).await;
    for ((given, expected), event) in cases.iter().zip(&read) {
        assert_eq!(&event.data, expected, "{given} read back as {}", event.data);
    }
    assert_eq!(read[0].metadata.extra["n"], json!(10_000_000_000_000_000u64));
}

/// A position past the head (on PostgreSQL, one with a transaction id no event has yet) reads
/// nothing and counts nothing, on every backend.
pub(crate) async fn positions_past_the_head_read_nothing<S: EventStore>(store: S) {
    store.append(&stream("past-1"), ExpectedVersion::NoStream, events(0..5)).await.unwrap();
    let head = settle(&store).await;
    for past in
        [Position::new(u64::MAX, 0), Position::new(u64::MAX, u64::MAX), Position::new(head.transaction() + 1, 0)]
    {
        let page = store.read_all_page(past, &Filter::all(), 10).await.unwrap();
        assert!(page.events.is_empty(), "{past}: {:?}", page.events);
        assert_eq!(page.next, past);
        let filtered = store.read_all_page(past, &Filter::categories(["past"]), 10).await.unwrap();
        assert!(filtered.events.is_empty() && filtered.next == past, "{past}: {filtered:?}");
        assert!(store.read_all(past, Filter::all()).try_collect::<Vec<_>>().await.unwrap().is_empty());
        assert_eq!(store.count(past, Position::new(u64::MAX, u64::MAX), &Filter::all()).await.unwrap(), 0);
    }
    assert_eq!(store.count(Position::START, Position::new(u64::MAX, u64::MAX), &Filter::all()).await.unwrap(), 6);
}

/// A read of at most 0 events is an argument error, on every backend and every read.
pub(crate) async fn a_limit_of_zero_is_an_argument_error<S: EventStore>(store: S) {
    let s = stream("zero-1");
    store.append(&s, ExpectedVersion::NoStream, events(0..3)).await.unwrap();
    fn invalid<T>(r: &annal::Result<T>) -> bool {
        matches!(r, Err(Error::InvalidArgument { .. }))
    }
    assert!(invalid(&store.read_stream_page(&s, Direction::Forwards, 0, 0).await));
    assert!(invalid(&store.read_all_page(Position::START, &Filter::all(), 0).await));
    let read: Vec<_> = store.read_stream(&s, ReadStream::forwards().limit(0)).collect().await;
    assert!(read.len() == 1 && invalid(&read[0]), "{read:?}");
    // The page size is not a limit: 0 means 1.
    let paged: Vec<_> = store.read_stream(&s, ReadStream::forwards().page_size(0)).try_collect().await.unwrap();
    assert_eq!(paged.len(), 3);
}

/// 40 concurrent appenders on one stream in each expected-version mode: `Any` and
/// `StreamExists` all succeed (none fails for losing a race), `Exact` and `NoStream` have
/// exactly one winner, and the stream holds exactly what the winners wrote, in version order.
pub(crate) async fn forty_concurrent_appenders_in_every_mode<S: EventStore + Clone + 'static>(store: S) {
    const WRITERS: usize = 40;
    let modes =
        [ExpectedVersion::Any, ExpectedVersion::StreamExists, ExpectedVersion::Exact(4), ExpectedVersion::NoStream];
    for (m, mode) in modes.into_iter().enumerate() {
        let s = stream(&format!("forty-{m}"));
        if mode != ExpectedVersion::NoStream {
            store.append(&s, ExpectedVersion::NoStream, events(0..5)).await.unwrap();
        }
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(WRITERS));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (store, s, start) = (store.clone(), s.clone(), start.clone());
                tokio::spawn(async move {
                    let e = event(100 + i);
                    let id = e.id;
                    start.wait().await;
                    (id, store.append(&s, mode, vec![e]).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (id, Ok(written)) => winners.push((written.version, id)),
                (_, Err(e)) => {
                    assert!(e.is_conflict(), "{mode:?}: {e}");
                    assert!(
                        matches!(mode, ExpectedVersion::Exact(_) | ExpectedVersion::NoStream),
                        "{mode:?} failed: {e}"
                    );
                }
            }
        }
        let expected_winners = match mode {
            ExpectedVersion::Any | ExpectedVersion::StreamExists => WRITERS,
            _ => 1,
        };
        assert_eq!(winners.len(), expected_winners, "{mode:?}");
        winners.sort();
        let read = stream_events(&store, &s).await;
        let first_new = if mode == ExpectedVersion::NoStream { 0 } else { 5 };
        assert_eq!(read.len(), first_new + winners.len(), "{mode:?}");
        let tail: Vec<_> = read[first_new..].iter().map(|e| (e.version, e.id)).collect();
        assert_eq!(tail, winners, "{mode:?}: the stream holds the winners at the versions they were told");
    }
}

/// An idempotent retry racing a conflicting append: either the batch was written (its first
/// append and the retry both say so, the other append conflicts) or the other append won (and
/// the batch's appends both conflict). Never a mix.
pub(crate) async fn a_retry_racing_a_conflicting_append_ends_one_way<S: EventStore + Clone + 'static>(store: S) {
    for round in 0..20 {
        let s = stream(&format!("retry-race-{round}"));
        store.append(&s, ExpectedVersion::NoStream, events(0..1)).await.unwrap();
        let batch = events(1..3);
        let other = events(10..11);
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(3));
        let spawn = |batch: Vec<NewEvent>| {
            let (store, s, start) = (store.clone(), s.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                store.append(&s, ExpectedVersion::Exact(0), batch).await
            })
        };
        let (first, retry, rival) = (spawn(batch.clone()), spawn(batch.clone()), spawn(other.clone()));
        let (first, retry, rival) = (first.await.unwrap(), retry.await.unwrap(), rival.await.unwrap());
        let read: Vec<Uuid> = stream_events(&store, &s).await.iter().skip(1).map(|e| e.id).collect();
        if read == batch.iter().map(|e| e.id).collect::<Vec<_>>() {
            let (a, b) = (first.unwrap(), retry.unwrap());
            assert_eq!((a.version, &a.positions), (b.version, &b.positions), "round {round}");
            assert!(a.already_written != b.already_written, "round {round}: exactly one of them wrote");
            assert!(rival.unwrap_err().is_conflict(), "round {round}");
        } else {
            assert_eq!(read, vec![other[0].id], "round {round}: one outcome or the other");
            assert!(rival.is_ok(), "round {round}");
            assert!(first.unwrap_err().is_conflict() && retry.unwrap_err().is_conflict(), "round {round}");
        }
    }
}

/// Generated events (deep and wide JSON, unicode, large and fractional numbers, arbitrary
/// metadata keys among them the reserved ones, the whole `u32` range of schema versions) are
/// accepted or refused by this backend exactly as by the in-memory store, and read back equal
/// to what the in-memory store reads back, which is what was appended (numbers in canonical
/// form, see `numbers_read_back_alike`).
pub(crate) async fn generated_events_round_trip_as_in_memory<S: EventStore>(store: S) {
    use proptest::strategy::{Strategy, ValueTree};
    let model = annal::MemoryEventStore::new();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let batches = proptest::collection::vec(generated::event(), 1..4);
    for case in 0..96 {
        let batch = batches.new_tree(&mut runner).unwrap().current();
        let s = stream(&format!("generated-{case}"));
        let got = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await;
        let want = model.append(&s, ExpectedVersion::NoStream, batch.clone()).await;
        match (&got, &want) {
            (Ok(_), Ok(_)) => {}
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "case {case}: refused alike"),
            _ => panic!("case {case}: backend {got:?}, memory {want:?} for {batch:?}"),
        }
        let read = stream_events(&store, &s).await;
        let expected = stream_events(&model, &s).await;
        assert_eq!(read.len(), expected.len(), "case {case}");
        for ((got, want), given) in read.iter().zip(&expected).zip(&batch) {
            let fields = |e: &RecordedEvent| {
                (e.id, e.version, e.event_type.clone(), e.schema_version, e.data.clone(), e.metadata.clone())
            };
            assert_eq!(fields(got), fields(want), "case {case}: as the in-memory store reads it");
            assert!(generated::same_json(&want.data, &given.data), "case {case}: {} vs {}", want.data, given.data);
        }
    }
}

mod generated {
    use annal::{Metadata, NewEvent, TraceParent};
    use proptest::prelude::*;
    use serde_json::{Number, Value};

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            (-1e20f64..1e20).prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            (-1.0f64..1.0).prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![8 => "\\PC{0,12}", 1 => "[a\u{0}\u{1}\"\\\\]{0,4}", 1 => "[żółw🐢\u{7f}\u{ffff}]{0,6}"]
    }

    pub(super) fn json() -> impl Strategy<Value = Value> {
        let leaf =
            prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), number(), text().prop_map(Value::from)];
        let wide = leaf.prop_recursive(5, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(text(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        // Near the nesting limit, on both sides of it.
        let deep = (prop_oneof![95usize..=101, 126usize..=130], any::<bool>()).prop_map(|(depth, objects)| {
            let mut value = Value::from(1);
            for _ in 0..depth {
                value = if objects {
                    Value::Object(std::iter::once(("k".to_owned(), value)).collect())
                } else {
                    Value::Array(vec![value])
                };
            }
            value
        });
        prop_oneof![6 => wide, 1 => deep]
    }

    fn metadata() -> impl Strategy<Value = Metadata> {
        let key = prop_oneof![
            6 => text(),
            1 => Just("correlation_id".to_owned()),
            1 => Just("causation_id".to_owned()),
            1 => Just("traceparent".to_owned()),
            1 => Just(String::new()),
        ];
        let traceparent = (1u128.., 1u64.., any::<u8>()).prop_map(|(t, s, f)| TraceParent::new(t, s, f).unwrap());
        (
            proptest::option::of(any::<u128>()),
            proptest::option::of(traceparent),
            proptest::collection::btree_map(key, json(), 0..4),
        )
            .prop_map(|(id, traceparent, extra)| {
                let mut m = Metadata::default();
                if let Some(id) = id {
                    m = m.with_correlation_id(uuid::Uuid::from_u128(id));
                }
                if let Some(traceparent) = traceparent {
                    m = m.with_traceparent(traceparent);
                }
                for (k, v) in extra {
                    m = m.with(k, v);
                }
                m
            })
    }

    pub(super) fn event() -> impl Strategy<Value = NewEvent> {
        let schema = prop_oneof![0u32..4, any::<u32>(), (i32::MAX as u32 - 2)..=(i32::MAX as u32 + 2)];
        ("[A-Za-z][A-Za-z0-9.]{0,15}", schema, json(), metadata()).prop_map(|(ty, schema, data, metadata)| {
            NewEvent::new(ty, data).with_schema_version(schema).with_metadata(metadata)
        })
    }

    /// Equal JSON, where a number may come back as the integer a large float stands for.
    pub(super) fn same_json(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                x == y || (x.as_f64() == y.as_f64() && x.as_f64().is_some_and(|f| f.abs() >= 1e16))
            }
            (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
            }
            _ => a == b,
        }
    }
}
