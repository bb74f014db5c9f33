//! The global order on PostgreSQL: gap-free under concurrent, slow and rolled-back writers, and
//! what an open transaction elsewhere in the cluster does to subscribers.
#![cfg(feature = "postgres")]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use annal::{EventStore, ExpectedVersion, Filter, NewEvent, PgEventStore, Position, RecordedEvent, StreamName};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::Notify;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

async fn store(connections: u32) -> PgEventStore {
    PgEventStore::from_pool(support::pg::fresh_pool(connections).await).await.unwrap()
}

/// Collects events until one of type `End` arrives.
async fn collect_until_end(store: PgEventStore) -> Vec<RecordedEvent> {
    let mut sub = store.subscribe(Position::START, Filter::all());
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(PATIENCE, sub.next()).await.expect("subscriber stalled").unwrap().unwrap();
        if event.event_type == "End" {
            return seen;
        }
        seen.push(event);
    }
}

enum Style {
    /// Plain appends through the pool.
    Quick,
    /// Append, hold the transaction open for over a second, commit.
    Slow,
    /// Append, hold the transaction open a while, roll back.
    RolledBack,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_see_every_committed_event_once_in_one_order_despite_slow_and_rolled_back_writers() {
    const WRITERS: usize = 20;
    const RUN_FOR: Duration = Duration::from_secs(5);
    const ENOUGH: usize = 1500;
    let store = store(WRITERS as u32 + 10).await;
    let early = tokio::spawn(collect_until_end(store.clone()));

    let committed_so_far = Arc::new(AtomicUsize::new(0));
    // Events committed: the run lasts `RUN_FOR`, and longer on a slow machine until enough were.
    let events_committed = Arc::new(AtomicUsize::new(0));
    let half_way = Arc::new(Notify::new());
    let started = tokio::time::Instant::now();
    let (deadline, cap) = (started + RUN_FOR, started + RUN_FOR * 12);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, counter, half_way) = (store.clone(), committed_so_far.clone(), half_way.clone());
            let events_committed = events_committed.clone();
            let style = match w % 5 {
                0 => Style::Slow,
                1 => Style::RolledBack,
                _ => Style::Quick,
            };
            tokio::spawn(async move {
                let stream = StreamName::from_parts("writer", w).unwrap();
                let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                let mut version = None;
                let mut i = 0u64;
                let running = || {
                    let now = tokio::time::Instant::now();
                    now < deadline || (now < cap && events_committed.load(Ordering::Relaxed) < ENOUGH)
                };
                while running() {
                    i += 1;
                    let batch: Vec<_> =
                        (0..1 + i % 3).map(|k| NewEvent::new("Wrote", json!({ "w": w, "i": i, "k": k }))).collect();
                    let ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
                    let expected = ExpectedVersion::from_current(version);
                    match style {
                        Style::Quick => {
                            version = Some(store.append(&stream, expected, batch).await.unwrap().version);
                            events_committed.fetch_add(ids.len(), Ordering::Relaxed);
                            committed.extend(ids);
                        }
                        Style::Slow | Style::RolledBack => {
                            let mut tx = store.begin().await.unwrap();
                            let written = tx.append(&stream, expected, batch).await.unwrap();
                            // Holding the transaction open is the workload here, not synchronisation.
                            let hold = if matches!(style, Style::Slow) { 1000 + i % 500 } else { 50 + i % 300 };
                            tokio::time::sleep(Duration::from_millis(hold)).await;
                            if matches!(style, Style::Slow) {
                                tx.commit().await.unwrap();
                                version = Some(written.version);
                                events_committed.fetch_add(ids.len(), Ordering::Relaxed);
                                committed.extend(ids);
                            } else {
                                tx.rollback().await.unwrap();
                                rolled_back.extend(ids);
                            }
                        }
                    }
                    if counter.fetch_add(1, Ordering::Relaxed) == 400 {
                        half_way.notify_one();
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();

    // A second subscriber starts from position 0 while the writers are busy.
    half_way.notified().await;
    let late = tokio::spawn(collect_until_end(store.clone()));

    let (mut committed, mut rolled_back) = (HashSet::new(), HashSet::new());
    for writer in writers {
        let (c, r) = writer.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    let end = StreamName::new("end").unwrap();
    store.append(&end, ExpectedVersion::NoStream, vec![NewEvent::new("End", json!({}))]).await.unwrap();
    let (early, late) = (early.await.unwrap(), late.await.unwrap());

    eprintln!(
        "{WRITERS} writers: {} events committed, {} rolled back; early subscriber saw {}, late {}",
        committed.len(),
        rolled_back.len(),
        early.len(),
        late.len()
    );
    assert!(committed.len() >= ENOUGH, "the workload was too small to prove anything: {}", committed.len());
    assert!(!rolled_back.is_empty());
    for (name, seen) in [("early", &early), ("late", &late)] {
        let ids: Vec<Uuid> = seen.iter().map(|e| e.id).collect();
        let unique: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{name}: an event was delivered twice");
        assert!(unique.is_disjoint(&rolled_back), "{name}: a rolled-back event was delivered");
        let missed = committed.difference(&unique).count();
        assert_eq!(missed, 0, "{name}: missed {missed} of {} committed events", committed.len());
        assert_eq!(unique.len(), committed.len(), "{name}: delivered events nobody committed");
        assert!(seen.windows(2).all(|w| w[0].position < w[1].position), "{name}: positions not increasing");
    }
    assert_eq!(early, late, "the two subscribers saw different orders");
    let global: Vec<RecordedEvent> = store
        .read_all(Position::START, Filter::all())
        .try_filter(|e| futures::future::ready(e.event_type != "End"))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(global, early, "the global read disagrees with the subscribers");
    // Every stream's events arrive in version order, with no hole.
    for w in 0..WRITERS {
        let name = StreamName::from_parts("writer", w).unwrap();
        let versions: Vec<u64> = early.iter().filter(|e| e.stream == name).map(|e| e.version).collect();
        assert!(versions.iter().enumerate().all(|(i, v)| *v == i as u64), "writer {w}: versions {versions:?}");
    }
}

async fn next_within(sub: &mut (impl futures::Stream<Item = annal::Result<RecordedEvent>> + Unpin)) -> RecordedEvent {
    tokio::time::timeout(PATIENCE, sub.next()).await.expect("subscriber stalled").unwrap().unwrap()
}

async fn connect() -> PgConnection {
    PgConnection::connect(&support::pg::url()).await.unwrap()
}

#[tokio::test]
async fn an_open_transaction_without_a_transaction_id_does_not_stall_subscribers() {
    let store = store(5).await;
    let mut reader = connect().await;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM pg_class;").execute(&mut reader).await.unwrap();
    let mut sub = store.subscribe(Position::START, Filter::all());
    let written = store
        .append(&StreamName::new("a-1").unwrap(), ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])
        .await
        .unwrap();
    // Delivered while the read-only transaction is still open.
    assert_eq!(next_within(&mut sub).await.position, written.position());
    sqlx::raw_sql("COMMIT").execute(&mut reader).await.unwrap();
}

#[tokio::test]
async fn an_open_writing_transaction_holds_subscribers_back_until_it_ends() {
    let store = store(5).await;
    let mut writer = connect().await;
    // Any write (here: taking a transaction id) in any database of the cluster, left open.
    sqlx::raw_sql("BEGIN").execute(&mut writer).await.unwrap();
    let xid: i64 =
        sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint").fetch_one(&mut writer).await.unwrap();
    let mut sub = store.subscribe(Position::START, Filter::all());
    let written = store
        .append(&StreamName::new("a-1").unwrap(), ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])
        .await
        .unwrap();
    // Committed, but not yet in the visible order: the open transaction might still write
    // events that come before it.
    assert!(store.head().await.unwrap() < written.position());
    let mut wakeup = store.wakeup();
    wakeup.mark_seen();
    wakeup.wait(Duration::from_millis(200)).await;
    assert!(store.head().await.unwrap() < written.position(), "an event went past an older open transaction");
    // Operators can see what holds subscribers back (tests running beside this one may hold
    // an even older transaction).
    let oldest = store.oldest_open_transaction().await.unwrap().expect("the open transaction is reported");
    assert!(oldest.transaction_id <= xid as u64, "{oldest:?} is younger than {xid}");
    sqlx::raw_sql("COMMIT").execute(&mut writer).await.unwrap();
    assert_eq!(next_within(&mut sub).await.position, written.position());
}

/// A projection worker follows the log through the same follower as a subscription: held back by
/// an open transaction that took an id but appends nothing (whose end sends no wake-up), it
/// re-polls quickly and resumes within milliseconds of the end, not after its poll interval.
#[cfg(feature = "projections")]
/// A filtered page skips unselected events and moves the reader to the head it read: never
/// past a selected event that an open transaction is still writing, though unselected events
/// committed after that transaction began are already in the log.
#[tokio::test]
async fn a_filtered_page_never_moves_past_a_selected_event_still_being_written() {
    let store = store(5).await;
    let store_append = |store: &PgEventStore, stream: &StreamName, kind: &'static str| {
        let (store, stream) = (store.clone(), stream.clone());
        async move { store.append(&stream, ExpectedVersion::Any, vec![NewEvent::new(kind, json!({}))]).await.unwrap() }
    };
    let selected = Filter::event_types(["Selected"]);
    store_append(&store, &StreamName::new("other-0").unwrap(), "Unselected").await;
    let mut held = store.begin().await.unwrap();
    let wanted = StreamName::new("wanted-1").unwrap();
    held.append(&wanted, ExpectedVersion::NoStream, vec![NewEvent::new("Selected", json!({}))]).await.unwrap();
    let later = store_append(&store, &StreamName::new("other-1").unwrap(), "Unselected").await;
    let page = store.read_all_page(Position::START, &selected, 10).await.unwrap();
    assert!(page.events.is_empty(), "{:?}", page.events);
    assert!(page.next < later.position(), "the reader moved past an open transaction's event");
    held.commit().await.unwrap();
    let written: Vec<RecordedEvent> = store.read_all(page.next, selected.clone()).try_collect().await.unwrap();
    assert_eq!(written.iter().map(|e| &e.stream).collect::<Vec<_>>(), [&wanted]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_held_back_by_an_open_transaction_resumes_within_milliseconds_after_it_ends() {
    use annal::projections::{Delivery, MemoryProjectionStore, Projection, ProjectionRunner, Tx, WorkerOptions};

    struct Counter(AtomicUsize);

    #[annal::async_trait]
    impl Projection for Counter {
        fn name(&self) -> &str {
            "counter"
        }
        fn delivery(&self) -> Delivery {
            Delivery::AtLeastOnce
        }
        async fn handle(&self, events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), annal::BoxError> {
            self.0.fetch_add(events.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    let store = store(5).await;
    let mut options = WorkerOptions::default();
    // Far longer than the test's patience for the resumption below: only a quick re-poll can
    // deliver the event in time.
    options.poll_interval = Duration::from_secs(60);
    let counter = Arc::new(Counter(AtomicUsize::new(0)));
    let running = ProjectionRunner::new(Arc::new(store.clone()), Arc::new(MemoryProjectionStore::new()))
        .with(counter.clone(), options)
        .unwrap()
        .start();
    let mut holder = connect().await;
    sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id();").execute(&mut holder).await.unwrap();
    let written = store
        .append(&StreamName::new("a-1").unwrap(), ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])
        .await
        .unwrap();
    // Held back while the transaction is open.
    assert!(running.wait_for("counter", written.position(), Duration::from_millis(100)).await.is_err());
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    let ended = std::time::Instant::now();
    running.wait_for("counter", written.position(), Duration::from_secs(5)).await.unwrap();
    let resumed = ended.elapsed();
    assert!(resumed < Duration::from_secs(1), "resumed {resumed:?} after the transaction ended");
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_in_transaction_session_timeout_bounds_the_stall() {
    let store = store(5).await;
    let mut forgotten = connect().await;
    sqlx::raw_sql("SET idle_in_transaction_session_timeout = '300ms'; BEGIN; SELECT pg_current_xact_id();")
        .execute(&mut forgotten)
        .await
        .unwrap();
    let mut sub = store.subscribe(Position::START, Filter::all());
    let written = store
        .append(&StreamName::new("a-1").unwrap(), ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])
        .await
        .unwrap();
    // The server ends the forgotten transaction, and the event is delivered.
    assert_eq!(next_within(&mut sub).await.position, written.position());
    assert!(sqlx::query("SELECT 1").execute(&mut forgotten).await.is_err(), "the idle session was not terminated");
}

#[tokio::test]
async fn a_closed_store_fails_with_a_typed_error() {
    let store = store(2).await;
    store.close().await;
    let err = store
        .append(&StreamName::new("a-1").unwrap(), ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(err, annal::Error::Closed), "{err}");
    assert!(matches!(store.head().await, Err(annal::Error::Closed)));
}

#[tokio::test]
async fn a_store_whose_transaction_ids_are_ahead_of_the_server_refuses_to_start() {
    // As after a logical restore into a new cluster: stored ids above the server's next one.
    let pool = support::pg::fresh_pool(2).await;
    PgEventStore::migrate(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO annal_events (tx_id, event_id, stream, category, version, event_type, schema_version, data, metadata) \
         VALUES (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1000000, $1, 'a-1', 'a', 0, 'E', 1, '{}', '{}')",
    )
    .bind(Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    match PgEventStore::from_pool(pool).await {
        Err(annal::Error::Corrupt { reason, .. }) => assert!(reason.contains("ahead of the server"), "{reason}"),
        other => panic!("expected the store to refuse to start, got {:?}", other.map(|_| ())),
    }
}

/// A stream's versions, in the order `events` has them.
fn versions_by_stream(events: &[RecordedEvent]) -> std::collections::HashMap<String, Vec<u64>> {
    let mut by_stream: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for e in events {
        by_stream.entry(e.stream.to_string()).or_default().push(e.version);
    }
    by_stream
}

/// The review's minimal case: a transaction that wrote something first is older than a caller
/// who then appends the stream's version 0; its append of version 1 would sort before version 0
/// in the global order. It is refused, typed, and nothing it did is kept once rolled back; run
/// again in a new transaction, it succeeds and the order is the stream's.
#[tokio::test]
async fn an_append_from_a_transaction_older_than_the_streams_last_writer_is_refused() {
    let store = store(5).await;
    sqlx::query("CREATE TABLE outbox (id serial PRIMARY KEY, note text)").execute(store.pool()).await.unwrap();
    let account = StreamName::new("account-1").unwrap();
    let mut tx = store.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (note) VALUES ('first')").execute(tx.connection()).await.unwrap();
    store.append(&account, ExpectedVersion::NoStream, vec![NewEvent::new("Opened", json!({}))]).await.unwrap();
    for expected in [ExpectedVersion::Exact(0), ExpectedVersion::Any, ExpectedVersion::StreamExists] {
        let refused = tx.append(&account, expected, vec![NewEvent::new("Deposited", json!({}))]).await;
        assert!(
            matches!(refused, Err(annal::Error::StaleTransaction { ref stream }) if *stream == account),
            "{expected:?}: {refused:?}"
        );
    }
    // The transaction stays usable for what does not break the order: a stream nobody wrote since.
    tx.append(&StreamName::new("audit-1").unwrap(), ExpectedVersion::NoStream, vec![NewEvent::new("Noted", json!({}))])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (note) VALUES ('again')").execute(tx.connection()).await.unwrap();
    let written =
        tx.append(&account, ExpectedVersion::Exact(0), vec![NewEvent::new("Deposited", json!({}))]).await.unwrap();
    tx.commit().await.unwrap();
    support::visible(&store, written.position()).await;
    let log: Vec<RecordedEvent> = store.read_all(Position::START, Filter::all()).try_collect().await.unwrap();
    let types: Vec<_> = log.iter().map(|e| (e.stream.to_string(), e.version, e.event_type.as_str())).collect();
    assert_eq!(types, [("account-1".to_owned(), 0, "Opened"), ("account-1".to_owned(), 1, "Deposited")]);
}

/// Every way of appending at once: plain appends, transactions that write another row first,
/// transactions that append to two streams, appends inside savepoints; refused appends are
/// retried in a new transaction. Every stream's versions increase along the global log and in
/// a live subscriber, and the stream holds every acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_stream_order_is_global_order_for_every_way_of_appending() {
    const WRITERS: usize = 12;
    const ROUNDS: usize = 40;
    const STREAMS: usize = 4;
    let store = store(WRITERS as u32 + 6).await;
    sqlx::query("CREATE TABLE outbox (id serial PRIMARY KEY, note text)").execute(store.pool()).await.unwrap();
    let subscriber = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut sub = store.subscribe(Position::START, Filter::categories(["shared"]));
            let mut seen = Vec::new();
            loop {
                let event =
                    tokio::time::timeout(PATIENCE, sub.next()).await.expect("subscriber stalled").unwrap().unwrap();
                if event.event_type == "End" {
                    return seen;
                }
                seen.push(event);
            }
        })
    };
    let stale = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, stale) = (store.clone(), stale.clone());
            tokio::spawn(async move {
                let mut acknowledged = 0usize;
                for round in 0..ROUNDS {
                    // Transactions touch their streams in one order, so they cannot deadlock
                    // (a deadlock would still be retried, below, but costs a second to detect).
                    let (a, b) = ((w + round) % STREAMS, (w + round + 1) % STREAMS);
                    let s = StreamName::from_parts("shared", a.min(b)).unwrap();
                    let other = StreamName::from_parts("shared", a.max(b)).unwrap();
                    let event = || NewEvent::new("Step", json!({ "writer": w, "round": round }));
                    loop {
                        let result: annal::Result<usize> = async {
                            match w % 4 {
                                0 => {
                                    store.append(&s, ExpectedVersion::Any, vec![event()]).await?;
                                    Ok(1)
                                }
                                style => {
                                    let mut tx = store.begin().await?;
                                    if style == 1 {
                                        sqlx::query("INSERT INTO outbox (note) VALUES ('x')")
                                            .execute(tx.connection())
                                            .await
                                            .map_err(|e| annal::Error::Backend(e.into()))?;
                                        // Give others a chance to append in between.
                                        tokio::task::yield_now().await;
                                    }
                                    let mut n = 0;
                                    tx.append(&s, ExpectedVersion::Any, vec![event()]).await?;
                                    n += 1;
                                    if style == 3 {
                                        let sql = |q: &'static str| sqlx::query(q);
                                        let backend = |e: sqlx::Error| annal::Error::Backend(e.into());
                                        sql("SAVEPOINT mine").execute(tx.connection()).await.map_err(backend)?;
                                        tx.append(&s, ExpectedVersion::StreamExists, vec![event()]).await?;
                                        sql("RELEASE SAVEPOINT mine")
                                            .execute(tx.connection())
                                            .await
                                            .map_err(backend)?;
                                        n += 1;
                                    }
                                    if style >= 2 {
                                        tokio::task::yield_now().await;
                                        tx.append(&other, ExpectedVersion::Any, vec![event(), event()]).await?;
                                        n += 2;
                                    }
                                    tx.commit().await?;
                                    Ok(n)
                                }
                            }
                        }
                        .await;
                        match result {
                            Ok(n) => {
                                acknowledged += n;
                                break;
                            }
                            Err(e @ annal::Error::StaleTransaction { .. }) => {
                                assert!(e.is_transient());
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                            // Transactions appending to two busy streams can deadlock: run again.
                            Err(e) if e.is_transient() => {}
                            Err(e) => panic!("writer {w}: {e}: {:?}", std::error::Error::source(&e)),
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap();
    }
    let end = store
        .append(
            &StreamName::new("shared-end").unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("End", json!({}))],
        )
        .await
        .unwrap();
    support::visible(&store, end.position()).await;
    let seen = subscriber.await.unwrap();
    let log: Vec<RecordedEvent> =
        store.read_all(Position::START, Filter::categories(["shared"])).try_collect().await.unwrap();
    let log: Vec<_> = log.into_iter().filter(|e| e.event_type != "End").collect();
    assert_eq!(log.len(), acknowledged, "every acknowledged event, once");
    assert_eq!(seen, log, "the subscriber saw the log");
    for (stream, versions) in versions_by_stream(&log) {
        assert_eq!(versions, (0..versions.len() as u64).collect::<Vec<_>>(), "{stream}: versions in global order");
    }
    // The workload did make transactions older than a stream's last writer append to it.
    assert!(stale.load(Ordering::Relaxed) > 0, "no append was ever refused as stale: the test tried nothing");
    eprintln!("{} appends refused as stale and retried", stale.load(Ordering::Relaxed));
}

/// A second store on the same database stands for another process: it has its own wake-ups
/// and hears the first store's appends only through the coalesced `NOTIFY`. With a one-hour
/// poll interval, an event arriving within the test's patience can only have come that way.
#[tokio::test]
async fn a_store_in_another_process_is_woken_by_notify() {
    let options = support::pg::fresh_schema().await;
    let pool = || sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(options.clone());
    let writer = PgEventStore::from_pool(pool().await.unwrap()).await.unwrap();
    let reader = PgEventStore::from_pool(pool().await.unwrap()).await.unwrap();
    // On this current-thread runtime the reader's LISTEN task has not run yet: its first
    // wake-up, sent once it listens, is still ahead of us.
    let mut listening = reader.wakeup();
    let hour = annal::SubscriptionOptions::default().poll_interval(Duration::from_secs(3600));
    let mut sub = reader.subscribe_with(Position::START, Filter::all(), hour);
    assert!(listening.wait(PATIENCE).await, "the reader never listened");
    for n in 0..3 {
        let s = StreamName::from_parts("wake", n).unwrap();
        let started = tokio::time::Instant::now();
        writer.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Woke", json!({ "n": n }))]).await.unwrap();
        let event = next_within(&mut sub).await;
        assert_eq!(event.stream, s);
        eprintln!("woken across stores in {:?}", started.elapsed());
    }
}

/// The connection that sends a store's wake-ups is ended under it (a server restart, an
/// operator's `pg_terminate_backend`): the next append's wake-up still reaches the other
/// process, which polls only once an hour, so it can only have come by `NOTIFY`.
#[tokio::test]
async fn a_wake_up_survives_the_loss_of_the_connection_that_sends_it() {
    let name = format!("annal-announcer-{}", uuid::Uuid::new_v4().simple());
    let options = support::pg::fresh_schema().await;
    let writer_options = options.clone().application_name(&name);
    let writer = PgEventStore::from_pool(
        sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(writer_options).await.unwrap(),
    )
    .await
    .unwrap();
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(options.clone()).await.unwrap();
    let reader = PgEventStore::from_pool(
        sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(options).await.unwrap(),
    )
    .await
    .unwrap();
    let mut listening = reader.wakeup();
    assert!(listening.wait(PATIENCE).await, "the reader never listened");
    let append = |n: u64| {
        let writer = writer.clone();
        async move {
            let s = StreamName::from_parts("wake", n).unwrap();
            writer.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Woke", json!({ "n": n }))]).await.unwrap();
            s
        }
    };
    // The first wake-up opens the sending connection; end it once it is there.
    let first = append(0).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'SELECT pg_notify%'",
        )
        .bind(&name)
        .fetch_all(&admin)
        .await
        .unwrap();
        if ended == [true] {
            break;
        }
        assert!(ended.is_empty() && tokio::time::Instant::now() < deadline, "{ended:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Subscribed only now, the reader has seen no wake-up that did not say what it announced,
    // so it does not re-poll on its own: once it has the first event it waits for a `NOTIFY`.
    let hour = annal::SubscriptionOptions::default().poll_interval(Duration::from_secs(3600));
    let mut sub = reader.subscribe_with(Position::START, Filter::all(), hour);
    assert_eq!(next_within(&mut sub).await.stream, first);
    for n in 1..3 {
        let s = append(n).await;
        assert_eq!(next_within(&mut sub).await.stream, s);
    }
}

/// Counts the global reads a store serves, and tells whoever waits for a count.
struct CountingReads {
    inner: PgEventStore,
    reads: tokio::sync::watch::Sender<usize>,
}

#[annal::async_trait]
impl EventStore for CountingReads {
    async fn append(
        &self,
        s: &StreamName,
        e: ExpectedVersion,
        ev: Vec<NewEvent>,
    ) -> annal::Result<annal::AppendResult> {
        self.inner.append(s, e, ev).await
    }
    async fn read_stream_page(
        &self,
        s: &StreamName,
        d: annal::Direction,
        from: u64,
        limit: usize,
    ) -> annal::Result<Vec<RecordedEvent>> {
        self.inner.read_stream_page(s, d, from, limit).await
    }
    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> annal::Result<annal::Page> {
        let page = self.inner.read_all_page(from, filter, limit).await;
        self.reads.send_modify(|n| *n += 1);
        page
    }
    async fn read_event(&self, id: Uuid) -> annal::Result<Option<RecordedEvent>> {
        self.inner.read_event(id).await
    }
    async fn head(&self) -> annal::Result<Position> {
        self.inner.head().await
    }
    fn wakeup(&self) -> annal::Wakeup {
        self.inner.wakeup()
    }
}

/// A wake-up whose read finds nothing, because the new event sits behind an older transaction
/// that holds an id, is followed by quick re-polls: when that transaction ends (sending no
/// wake-up of its own) the subscriber gets the event within milliseconds, not its poll
/// interval (one hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wakeup_that_finds_nothing_is_followed_by_quick_re_polls() {
    let inner = store(5).await;
    let store = Arc::new(CountingReads { inner: inner.clone(), reads: tokio::sync::watch::Sender::new(0) });
    let mut reads = store.reads.subscribe();
    let hour = annal::SubscriptionOptions::default().poll_interval(Duration::from_secs(3600));
    let subscriber = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut sub = store.subscribe_with(Position::START, Filter::all(), hour);
            next_within(&mut sub).await
        })
    };
    reads.wait_for(|n| *n >= 1).await.unwrap(); // caught up with the empty log, now waiting
    let mut holder = connect().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut holder).await.unwrap();
    let s = StreamName::new("behind-1").unwrap();
    inner.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Behind", json!({}))]).await.unwrap();
    // The wake-up's read found nothing (the event is behind the holder)...
    let before = *reads.borrow();
    reads.wait_for(|n| *n > before).await.unwrap();
    assert!(!subscriber.is_finished());
    let started = tokio::time::Instant::now();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    // ...and the quick re-polls find it once the holder is gone.
    let event = tokio::time::timeout(PATIENCE, subscriber).await.expect("no quick re-poll").unwrap();
    assert_eq!(event.stream, s);
    eprintln!("delivered {:?} after the holder ended", started.elapsed());
}
