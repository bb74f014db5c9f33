//! Projections on every backend: exactly-once read models, retries without double effects,
//! poison events parked with the rest flowing, dead-letter retries applied once, selective
//! consumers whose checkpoints keep up, stop-and-resume, and lag.
#![cfg(feature = "projections")]

mod support;

#[path = "projections/control.rs"]
mod control;
use control::{
    a_paused_projection_is_let_go_and_resumes_exactly, a_reset_under_a_caught_up_worker_is_noticed_without_new_events,
    the_control_record_is_the_same_on_every_store,
};
#[path = "projections/rebuilds.rs"]
mod rebuilds;
use rebuilds::the_rebuild_record_is_the_same_on_every_store;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annal::projections::{
    Applied, DedupStore, Delivery, Error, OnFailure, Park, Projection, ProjectionRunner, ProjectionStore, RetryPolicy,
    Tx, WorkerOptions, retry_dead_letter,
};
use annal::{BoxError, EventStore, ExpectedVersion, Filter, NewEvent, Position, RecordedEvent, StreamName};
use serde_json::json;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(30);

/// A read model of every event applied, keyed by event id, so applying one twice fails loudly
/// (a primary-key violation in SQL, a panic in memory).
struct Ledger {
    name: &'static str,
    filter: Filter,
    delivery: Delivery,
    /// Event ids that fail, with how many more times (u32::MAX: always).
    failing: Mutex<HashMap<Uuid, u32>>,
    /// Every attempt per event id.
    attempts: Mutex<HashMap<Uuid, u32>>,
    /// The in-memory read model (used when there is no transaction).
    memory: Mutex<HashSet<Uuid>>,
    fixed: AtomicBool,
    batch: usize,
}

impl Ledger {
    fn new(name: &'static str) -> Self {
        Ledger {
            name,
            filter: Filter::all(),
            delivery: Delivery::ExactlyOnce,
            failing: Mutex::default(),
            attempts: Mutex::default(),
            memory: Mutex::default(),
            fixed: AtomicBool::new(false),
            batch: 50,
        }
    }

    fn fail(&self, id: Uuid, times: u32) {
        self.failing.lock().unwrap().insert(id, times);
    }

    fn attempts(&self, id: Uuid) -> u32 {
        self.attempts.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
}

#[annal::async_trait]
impl Projection for Ledger {
    fn name(&self) -> &str {
        self.name
    }
    fn filter(&self) -> Filter {
        self.filter.clone()
    }
    fn delivery(&self) -> Delivery {
        self.delivery
    }
    fn batch_size(&self) -> usize {
        self.batch
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        for event in events {
            *self.attempts.lock().unwrap().entry(event.id).or_default() += 1;
            if !self.fixed.load(Ordering::SeqCst) {
                let mut failing = self.failing.lock().unwrap();
                if let Some(left) = failing.get_mut(&event.id).filter(|left| **left > 0) {
                    *left = left.saturating_sub(if *left == u32::MAX { 0 } else { 1 });
                    return Err(format!("event {} is poison", event.id).into());
                }
            }
        }
        let table = format!("ledger_{}", self.name);
        match tx {
            #[cfg(feature = "postgres")]
            Tx::Postgres(conn) => {
                let create = format!("CREATE TABLE IF NOT EXISTS {table} (event_id uuid PRIMARY KEY, stream text)");
                sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut **conn).await?;
                for event in events {
                    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
                    sqlx::query(sqlx::AssertSqlSafe(insert))
                        .bind(event.id)
                        .bind(event.stream.as_str())
                        .execute(&mut **conn)
                        .await?;
                }
            }
            #[cfg(feature = "sqlite")]
            Tx::Sqlite(conn) => {
                let create = format!("CREATE TABLE IF NOT EXISTS {table} (event_id BLOB PRIMARY KEY, stream TEXT)");
                sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut **conn).await?;
                for event in events {
                    let insert = format!("INSERT INTO {table} VALUES (?, ?)");
                    sqlx::query(sqlx::AssertSqlSafe(insert))
                        .bind(event.id)
                        .bind(event.stream.as_str())
                        .execute(&mut **conn)
                        .await?;
                }
            }
            _ => {
                let mut memory = self.memory.lock().unwrap();
                for event in events {
                    assert!(memory.insert(event.id), "event {} applied twice", event.id);
                }
            }
        }
        Ok(())
    }
}

/// Reads a ledger's read model: its name, the projection (for the in-memory one).
type ReadLedger = dyn Fn(&'static str, Arc<Ledger>) -> futures::future::BoxFuture<'static, HashSet<Uuid>> + Send + Sync;

/// Empties a ledger's read model, as a rebuild's `reset` statements do.
type ClearLedger = dyn Fn(&'static str, Arc<Ledger>) -> futures::future::BoxFuture<'static, ()> + Send + Sync;

/// One backend under test: the event store, the projection store, and a way to read a ledger.
#[derive(Clone)]
struct Backend {
    events: Arc<dyn EventStore>,
    store: Arc<dyn ProjectionStore>,
    dedup: Arc<dyn DedupStore>,
    read: Arc<ReadLedger>,
    clear: Arc<ClearLedger>,
    /// "memory", "sqlite" or "postgres".
    kind: &'static str,
}

impl Backend {
    async fn ledger(&self, projection: &Arc<Ledger>) -> HashSet<Uuid> {
        (self.read)(projection.name, projection.clone()).await
    }

    async fn clear(&self, projection: &Arc<Ledger>) {
        (self.clear)(projection.name, projection.clone()).await
    }
}

fn memory() -> Backend {
    let store = Arc::new(annal::projections::MemoryProjectionStore::new());
    Backend {
        events: Arc::new(annal::MemoryEventStore::new()),
        store: store.clone(),
        dedup: store,
        read: Arc::new(|_, ledger| Box::pin(async move { ledger.memory.lock().unwrap().clone() })),
        clear: Arc::new(|_, ledger| Box::pin(async move { ledger.memory.lock().unwrap().clear() })),
        kind: "memory",
    }
}

/// Reads a ledger table through `pool` (a SQLite or a PostgreSQL pool). A ledger whose table does
/// not exist yet (nothing applied) reads as empty.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! sql_ledger {
    ($pool:expr) => {{
        let pool = $pool;
        Arc::new(move |name, _| {
            let pool = pool.clone();
            Box::pin(async move {
                let sql = format!("SELECT event_id FROM ledger_{name}");
                sqlx::query_scalar::<_, Uuid>(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
            })
        })
    }};
}

/// Empties a ledger table through `pool`, if it exists.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! sql_clear {
    ($pool:expr) => {{
        let pool = $pool;
        Arc::new(move |name, _| {
            let pool = pool.clone();
            Box::pin(async move {
                let sql = format!("DELETE FROM ledger_{name}");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
            })
        })
    }};
}

#[cfg(feature = "sqlite")]
async fn sqlite() -> (Backend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let events = annal::SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
    let store = Arc::new(annal::projections::SqliteProjectionStore::new(&events).await.unwrap());
    let pool = events.writer().clone();
    let backend = Backend {
        events: Arc::new(events),
        store: store.clone(),
        dedup: store,
        read: sql_ledger!(pool.clone()),
        clear: sql_clear!(pool),
        kind: "sqlite",
    };
    (backend, dir)
}

#[cfg(feature = "postgres")]
async fn postgres() -> Backend {
    let events = support::pg::fresh_store().await;
    let store = Arc::new(annal::projections::PgProjectionStore::new(&events).await.unwrap());
    let pool = events.pool().clone();
    Backend {
        events: Arc::new(events),
        store: store.clone(),
        dedup: store,
        read: sql_ledger!(pool.clone()),
        clear: sql_clear!(pool),
        kind: "postgres",
    }
}

macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        mod on_memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(super::memory()).await; })*
        }
        #[cfg(feature = "sqlite")]
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { let (backend, _dir) = super::sqlite().await; super::$case(backend).await; })*
        }
        #[cfg(feature = "postgres")]
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(super::postgres().await).await; })*
        }
    };
}

backends!(
    exactly_once_read_model_matches_the_log,
    transient_failures_are_retried_without_double_effects,
    poison_events_are_parked_and_the_rest_flows,
    selective_projections_keep_their_checkpoint_moving,
    stop_policy_stops_and_a_restart_resumes,
    lag_is_exact_partition_by_partition,
    many_projections_each_apply_exactly_their_events,
    a_panicking_handler_is_a_failure_like_an_error,
    dropping_the_runner_stops_it_and_hands_its_partitions_over,
    changing_the_partition_count_is_refused_until_a_rebuild,
    a_paused_projection_is_let_go_and_resumes_exactly,
    a_reset_under_a_caught_up_worker_is_noticed_without_new_events,
    the_control_record_is_the_same_on_every_store,
    a_batch_behind_a_dead_letter_is_refused_by_the_store,
    small_batches_read_ahead_apply_the_log_once,
    the_rebuild_record_is_the_same_on_every_store,
);

/// Panics on one event, every time; applies the others into the ledger.
struct Panicky {
    ledger: Arc<Ledger>,
    poison: Uuid,
}

#[annal::async_trait]
impl Projection for Panicky {
    fn name(&self) -> &str {
        self.ledger.name()
    }
    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        if events.iter().any(|e| e.id == self.poison) {
            panic!("the handler met event {}", self.poison);
        }
        self.ledger.handle(events, tx).await
    }
}

/// A handler that panics is retried, then parked with the panic message, like a handler that
/// returns an error; the process and the projection's other events carry on.
async fn a_panicking_handler_is_a_failure_like_an_error(backend: Backend) {
    let (ids, last) = append(&*backend.events, "order", 4, 20).await;
    let ledger = Arc::new(Ledger::new("panicky"));
    let projection = Arc::new(Panicky { ledger: ledger.clone(), poison: ids[5] });
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(projection, quick_retries())
        .unwrap()
        .start();
    assert!(matches!(running.wait_for("panicky", last, PATIENCE).await, Err(Error::Parked { .. })));
    assert!(running.is_running("panicky").unwrap(), "the projection keeps running");
    let parked = backend.store.dead_letters("panicky").await.unwrap();
    assert_eq!(parked[0].event_id, ids[5]);
    assert!(
        parked[0].error.contains("panicked") && parked[0].error.contains(&ids[5].to_string()),
        "{}",
        parked[0].error
    );
    assert_eq!(parked[0].attempts, 7, "retried like any failure");
    // Events of other streams were applied; those of the poison's stream wait behind it.
    let applied = backend.ledger(&ledger).await;
    let others: HashSet<Uuid> =
        ids.iter().enumerate().filter(|(i, _)| i % 4 != 1 || *i < 5).map(|(_, id)| *id).collect();
    assert_eq!(applied, others);
    running.shutdown().await.unwrap();
}

/// Dropping `RunningProjections` stops its coordinators (no task left renewing leases), so
/// another runner takes the partitions over at once.
async fn dropping_the_runner_stops_it_and_hands_its_partitions_over(backend: Backend) {
    let ledger = Arc::new(Ledger::new("dropped"));
    let lease = Duration::from_secs(3600);
    let first = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .lease(lease)
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    let (_, at) = append(&*backend.events, "order", 2, 5).await;
    first.wait_for("dropped", at, PATIENCE).await.unwrap();
    drop(first);
    // Its coordinator, cancelled by the drop, releases the lease as it ends.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while backend.store.leases("dropped").await.unwrap().iter().any(|l| l.expires_at > chrono::Utc::now()) {
        assert!(tokio::time::Instant::now() < deadline, "the dropped runner kept its lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // With an hour-long lease, the second runner can only get the partition if the first let go.
    let second = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .lease(lease)
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    let (_, last) = append(&*backend.events, "order", 2, 5).await;
    second.wait_for("dropped", last, PATIENCE).await.unwrap();
    assert_eq!(backend.ledger(&ledger).await.len(), 10);
    second.shutdown().await.unwrap();
}

fn quick_retries() -> WorkerOptions {
    WorkerOptions::default().retry(RetryPolicy::default().initial(Duration::from_millis(1)))
}

/// Appends `count` single-event appends spread over `streams` streams of `category`; returns
/// the ids and the last position.
async fn append(events: &dyn EventStore, category: &str, streams: usize, count: usize) -> (Vec<Uuid>, Position) {
    let mut ids = Vec::new();
    let mut last = Position::START;
    for i in 0..count {
        let stream = StreamName::from_parts(category, i % streams).unwrap();
        let event = NewEvent::new("Happened", json!({ "i": i }));
        ids.push(event.id);
        last = events.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap().position();
    }
    // Tests read the log right after: on PostgreSQL, wait until other tests' transactions let
    // every event be seen.
    support::visible(events, last).await;
    (ids, last)
}

async fn exactly_once_read_model_matches_the_log(backend: Backend) {
    let (mut ids, _) = append(&*backend.events, "order", 7, 120).await;
    let first = backend.events.read_all_page(Position::START, &Filter::all(), 1).await.unwrap().events[0].clone();
    let ledger = Arc::new(Ledger::new("exact"));
    // The first event waited at least this long before it could be applied.
    let waited = (chrono::Utc::now() - first.recorded_at).to_std().unwrap_or_default();
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    let (more, last) = append(&*backend.events, "order", 7, 80).await;
    ids.extend(more);
    running.wait_for("exact", last, PATIENCE).await.unwrap();
    assert_eq!(backend.ledger(&ledger).await, ids.iter().copied().collect::<HashSet<_>>());
    let lag = running.lag("exact").await.unwrap();
    assert_eq!((lag.events_behind, lag.checkpoint), (0, last));
    assert_eq!(lag.latency.count, 200);
    assert!(lag.latency.p50 <= lag.latency.p99 && lag.latency.p99 <= lag.latency.max);
    assert!(lag.latency.max >= waited.mul_f64(0.99), "max latency {:?} < {waited:?}", lag.latency.max);
    running.shutdown().await.unwrap();
    // A restart resumes from the checkpoint: nothing is applied twice (the ledger's key would
    // refuse it), and new events are applied.
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    let (more, last) = append(&*backend.events, "order", 3, 10).await;
    ids.extend(more);
    running.wait_for("exact", last, PATIENCE).await.unwrap();
    running.shutdown().await.unwrap();
    assert_eq!(backend.ledger(&ledger).await.len(), ids.len());
}

async fn transient_failures_are_retried_without_double_effects(backend: Backend) {
    let (ids, last) = append(&*backend.events, "order", 5, 60).await;
    let ledger = Arc::new(Ledger::new("transient"));
    // Fails twice, in the middle of a batch: the batch rolls back, then event by event.
    ledger.fail(ids[30], 2);
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    running.wait_for("transient", last, PATIENCE).await.unwrap();
    running.shutdown().await.unwrap();
    assert_eq!(backend.ledger(&ledger).await, ids.iter().copied().collect::<HashSet<_>>());
    assert!(backend.store.dead_letters("transient").await.unwrap().is_empty());
    // Failing once in its batch and once alone, then succeeding alone.
    assert_eq!(ledger.attempts(ids[30]), 3);
}

async fn poison_events_are_parked_and_the_rest_flows(backend: Backend) {
    // Event 12 is of stream order-2 (12 % 5); later events of order-2 must wait behind it.
    let (ids, last) = append(&*backend.events, "order", 5, 40).await;
    let ledger = Arc::new(Ledger::new("poison"));
    ledger.fail(ids[12], u32::MAX);
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    // The wait says the read model lacks what was parked on the way, rather than a bare `Ok`.
    match running.wait_for("poison", last, PATIENCE).await {
        Err(Error::Parked { projection, position, parked }) => {
            assert_eq!((projection.as_str(), position, parked.len()), ("poison", last, 6));
        }
        other => panic!("expected Parked, got {other:?}"),
    }
    assert!(running.is_running("poison").unwrap());
    let parked = backend.store.dead_letters("poison").await.unwrap();
    // The poison event, then the later events of its stream, in order.
    let parked_ids: Vec<Uuid> = parked.iter().map(|d| d.event_id).collect();
    let expected: Vec<Uuid> = (12..40).step_by(5).map(|i| ids[i]).collect();
    assert_eq!(parked_ids, expected);
    assert_eq!(parked[0].attempts, 7, "retried 7 times in all before parking");
    assert!(parked[0].error.contains("poison"), "{}", parked[0].error);
    assert_eq!(ledger.attempts(ids[12]), 1 + 7, "once in its batch, then 7 attempts alone");
    let applied = backend.ledger(&ledger).await;
    let others: HashSet<Uuid> = ids.iter().copied().filter(|id| !expected.contains(id)).collect();
    assert_eq!(applied, others, "every other event flowed on");

    // Retrying out of order is refused; after the fix, retries apply each once, in order.
    let err = retry_dead_letter(&*backend.events, &*backend.store, &*ledger, parked[1].id).await.unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
    assert!(matches!(
        retry_dead_letter(&*backend.events, &*backend.store, &*ledger, parked[0].id).await.unwrap(),
        Applied::Failed(_)
    ));
    ledger.fixed.store(true, Ordering::SeqCst);
    for dead in &parked {
        let applied = retry_dead_letter(&*backend.events, &*backend.store, &*ledger, dead.id).await.unwrap();
        assert!(matches!(applied, Applied::Committed), "{applied:?}");
        // A second retry of the same dead letter finds nothing to do.
        assert!(retry_dead_letter(&*backend.events, &*backend.store, &*ledger, dead.id).await.is_err());
    }
    assert!(backend.store.dead_letters("poison").await.unwrap().is_empty());
    assert_eq!(backend.ledger(&ledger).await, ids.iter().copied().collect::<HashSet<_>>());
    running.shutdown().await.unwrap();
}

/// The worker reads the next page while a batch is applied. In batches of 1 to 7 events, with
/// an event that fails twice and one that always fails, every event is applied once (the ledger
/// refuses a second), the poison event and its stream's later events are parked in order, and
/// nothing is skipped: the page read ahead is used only when the batch ended where it ends.
async fn small_batches_read_ahead_apply_the_log_once(backend: Backend) {
    let (ids, last) = append(&*backend.events, "order", 5, 40).await;
    for (batch, name) in [(1, "ahead_1"), (2, "ahead_2"), (3, "ahead_3"), (7, "ahead_7")] {
        let mut ledger = Ledger::new(name);
        ledger.batch = batch;
        let ledger = Arc::new(ledger);
        ledger.fail(ids[12], u32::MAX);
        ledger.fail(ids[21], 2);
        let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
            .with(ledger.clone(), quick_retries())
            .unwrap()
            .start();
        match running.wait_for(name, last, PATIENCE).await {
            Err(Error::Parked { position, .. }) => assert_eq!(position, last),
            other => panic!("batches of {batch}: expected Parked, got {other:?}"),
        }
        running.shutdown().await.unwrap();
        let parked: Vec<Uuid> = backend.store.dead_letters(name).await.unwrap().iter().map(|d| d.event_id).collect();
        let expected: Vec<Uuid> = (12..40).step_by(5).map(|i| ids[i]).collect();
        assert_eq!(parked, expected, "batches of {batch}");
        let others: HashSet<Uuid> = ids.iter().copied().filter(|id| !expected.contains(id)).collect();
        assert_eq!(backend.ledger(&ledger).await, others, "batches of {batch}");
        assert_eq!(ledger.attempts(ids[21]), 3, "batches of {batch}: two failures, then applied once");
    }
}

async fn selective_projections_keep_their_checkpoint_moving(backend: Backend) {
    let (wanted, _) = append(&*backend.events, "wanted", 2, 10).await;
    let mut ledger = Ledger::new("selective");
    ledger.filter = Filter::categories(["wanted"]);
    let ledger = Arc::new(ledger);
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    // Many events it does not want: its checkpoint must still reach the head.
    let (_, last) = append(&*backend.events, "other", 4, 150).await;
    running.wait_for("selective", last, PATIENCE).await.unwrap();
    assert_eq!(backend.ledger(&ledger).await, wanted.into_iter().collect::<HashSet<_>>());
    let lag = running.lag("selective").await.unwrap();
    assert_eq!(lag.events_behind, 0);
    assert_eq!(lag.time_behind, Duration::ZERO);
    running.shutdown().await.unwrap();
}

async fn stop_policy_stops_and_a_restart_resumes(backend: Backend) {
    let (ids, last) = append(&*backend.events, "order", 3, 30).await;
    let ledger = Arc::new(Ledger::new("stopping"));
    ledger.fail(ids[20], u32::MAX);
    let options = quick_retries().on_failure(OnFailure::Stop);
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), options.clone())
        .unwrap()
        .start();
    // It stops at event 20, having applied everything before it, and reports why. A wait for a
    // later position fails as soon as it stopped, naming it, instead of waiting out its timeout.
    match running.wait_for("stopping", last, PATIENCE).await {
        Err(Error::NotRunning { projection, .. }) => assert_eq!(projection, "stopping"),
        other => panic!("expected NotRunning, got {other:?}"),
    }
    assert!(!running.is_running("stopping").unwrap());
    match running.shutdown().await {
        Err(Error::Stopped { event_id, attempts, .. }) => assert_eq!((event_id, attempts), (ids[20], 7)),
        other => panic!("expected the projection to have stopped, got {other:?}"),
    }
    assert_eq!(backend.ledger(&ledger).await, ids[..20].iter().copied().collect::<HashSet<_>>());
    let lag_checkpoint = backend.store.checkpoint("stopping", 0).await.unwrap().unwrap().position;
    assert!(lag_checkpoint < last);
    // Fixed and restarted, it resumes at the event it stopped on.
    ledger.fixed.store(true, Ordering::SeqCst);
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), options)
        .unwrap()
        .start();
    running.wait_for("stopping", last, PATIENCE).await.unwrap();
    running.shutdown().await.unwrap();
    assert_eq!(backend.ledger(&ledger).await, ids.iter().copied().collect::<HashSet<_>>());
}

#[tokio::test]
async fn at_least_once_redelivers_and_at_most_once_does_not() {
    for (delivery, redelivered) in [(Delivery::AtLeastOnce, true), (Delivery::AtMostOnce, false)] {
        let backend = memory();
        let (ids, last) = append(&*backend.events, "order", 2, 10).await;
        let mut ledger = Ledger::new("modes");
        ledger.delivery = delivery;
        let ledger = Arc::new(ledger);
        ledger.fail(ids[5], 1);
        let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
            .with(ledger.clone(), quick_retries())
            .unwrap()
            .start();
        running.wait_for("modes", last, PATIENCE).await.unwrap();
        running.shutdown().await.unwrap();
        let applied = backend.ledger(&ledger).await;
        // The failing batch was the whole page: retried event by event at least once, dropped
        // at most once.
        assert_eq!(applied.contains(&ids[5]), redelivered, "{delivery:?}");
        assert_eq!(applied.len(), if redelivered { 10 } else { 0 }, "{delivery:?}");
    }
}

#[tokio::test]
async fn names_are_validated_and_unique() {
    let backend = memory();
    let bad = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(Arc::new(Ledger::new("Bad Name")), WorkerOptions::default());
    assert!(matches!(bad, Err(Error::InvalidName { .. })));
    let twice = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(Arc::new(Ledger::new("same")), WorkerOptions::default())
        .unwrap()
        .with(Arc::new(Ledger::new("same")), WorkerOptions::default());
    assert!(matches!(twice, Err(Error::DuplicateName(_))));
}

/// A ledger split into `count` partitions.
struct SplitInto(Arc<Ledger>, u32);

#[annal::async_trait]
impl Projection for SplitInto {
    fn name(&self) -> &str {
        self.0.name
    }
    fn partitions(&self) -> u32 {
        self.1
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        self.0.handle(events, tx).await
    }
}

/// The review's 2 → 4 case: checkpoints made with 2 partitions mean nothing under 4 (with 4,
/// partitions 2 and 3 would start from the beginning and apply their streams' events again).
/// A runner configured with another count refuses to run the projection, saying what to do,
/// and applies nothing; after a reset (what a rebuild does) the new count runs.
async fn changing_the_partition_count_is_refused_until_a_rebuild(backend: Backend) {
    let ledger = Arc::new(Ledger::new("split"));
    let start = |count| {
        ProjectionRunner::new(backend.events.clone(), backend.store.clone())
            .with(Arc::new(SplitInto(ledger.clone(), count)), quick_retries())
            .unwrap()
            .start()
    };
    let (ids, last) = append(&*backend.events, "order", 20, 100).await;
    let running = start(2);
    running.wait_for("split", last, PATIENCE).await.unwrap();
    running.shutdown().await.unwrap();
    for count in [4, 3, 1] {
        let running = start(count);
        match running.wait_for("split", Position::new(u64::MAX, 0), PATIENCE).await {
            Err(Error::NotRunning { .. }) => {}
            other => panic!("{count} partitions: expected the projection not to run, got {other:?}"),
        }
        match running.shutdown().await {
            Err(Error::PartitionsChanged { stored: 2, configured, .. }) => assert_eq!(configured, count),
            other => panic!("{count} partitions: expected PartitionsChanged, got {other:?}"),
        }
    }
    // Nothing was applied twice (the ledger's key would have refused it) and nothing is missing.
    assert_eq!(backend.ledger(&ledger).await, ids.iter().copied().collect::<HashSet<_>>());
    // The same count still runs.
    let (more, last) = append(&*backend.events, "order", 20, 10).await;
    let running = start(2);
    running.wait_for("split", last, PATIENCE).await.unwrap();
    running.shutdown().await.unwrap();
    assert_eq!(backend.ledger(&ledger).await.len(), ids.len() + more.len());
}

/// A ledger split into partitions.
struct Partitioned(Arc<Ledger>);

#[annal::async_trait]
impl Projection for Partitioned {
    fn name(&self) -> &str {
        self.0.name
    }
    fn partitions(&self) -> u32 {
        4
    }
    fn batch_size(&self) -> usize {
        20
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        self.0.handle(events, tx).await
    }
}

/// Waits until `check` holds for the projection's leases.
async fn leases_until(
    store: &dyn ProjectionStore,
    name: &str,
    what: &str,
    check: impl Fn(&[annal::projections::Lease]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let leases = store.leases(name).await.unwrap();
        let live: Vec<_> = leases.into_iter().filter(|l| l.expires_at > chrono::Utc::now()).collect();
        if check(&live) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: leases stayed {live:?}");
        // Lease rounds run on a timer; this polls their outcome.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn owned_by<'a>(leases: &'a [annal::projections::Lease], owner: &'a str) -> usize {
    leases.iter().filter(|l| l.owner == owner).count()
}

async fn partitions_are_shared_and_taken_over(backend: Backend) {
    const LEASE: Duration = Duration::from_millis(600);
    let projection = Arc::new(Partitioned(Arc::new(Ledger::new("shared"))));
    let runner = |owner: &str| {
        ProjectionRunner::new(backend.events.clone(), backend.store.clone())
            .owner(owner)
            .lease(LEASE)
            .with(projection.clone(), quick_retries())
            .unwrap()
            .start()
    };
    let (mut ids, _) = append(&*backend.events, "order", 16, 100).await;
    let a = runner("runner-a");
    leases_until(&*backend.store, "shared", "a alone takes all", |l| owned_by(l, "runner-a") == 4).await;
    // A runner of another projection is not a runner of this one: the first keeps all four
    // partitions through lease rounds that see it (renewed until past twice the lease from now).
    let other = Arc::new(Partitioned(Arc::new(Ledger::new("other"))));
    let c = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .owner("runner-c")
        .lease(LEASE)
        .with(other, quick_retries())
        .unwrap()
        .start();
    leases_until(&*backend.store, "other", "c takes its own", |l| owned_by(l, "runner-c") == 4).await;
    let later = chrono::Utc::now() + LEASE * 2;
    leases_until(&*backend.store, "shared", "a keeps all", |l| {
        owned_by(l, "runner-a") == 4 && l.iter().all(|l| l.expires_at > later)
    })
    .await;
    c.shutdown().await.unwrap();
    // A second runner joins: the first hands over half.
    let b = runner("runner-b");
    leases_until(&*backend.store, "shared", "rebalanced", |l| {
        owned_by(l, "runner-a") == 2 && owned_by(l, "runner-b") == 2
    })
    .await;
    let (more, last) = append(&*backend.events, "order", 16, 100).await;
    ids.extend(more);
    a.wait_for("shared", last, PATIENCE).await.unwrap();
    // The second one dies without a word: the first takes its partitions once their leases
    // expire, and finishes the work exactly.
    b.crash().await;
    let (more, last) = append(&*backend.events, "order", 16, 100).await;
    ids.extend(more);
    let started = tokio::time::Instant::now();
    leases_until(&*backend.store, "shared", "taken over", |l| owned_by(l, "runner-a") == 4).await;
    let took = started.elapsed();
    assert!(took < LEASE * 3, "takeover took {took:?} with a {LEASE:?} lease");
    a.wait_for("shared", last, PATIENCE).await.unwrap();
    a.shutdown().await.unwrap();
    assert_eq!(backend.ledger(&projection.0).await, ids.iter().copied().collect::<HashSet<_>>());
    // Shut down gracefully, a runner hands its partitions over at once.
    let leases = backend.store.leases("shared").await.unwrap();
    assert!(leases.iter().all(|l| l.expires_at <= chrono::Utc::now()), "{leases:?}");
}

async fn a_writer_that_lost_its_lease_writes_nothing(backend: Backend) {
    let store = &*backend.store;
    let ledger = Ledger::new("fenced");
    let (_, last) = append(&*backend.events, "order", 2, 3).await;
    let page = backend.events.read_all_page(Position::START, &Filter::all(), 10).await.unwrap();
    let old = store.acquire_lease("fenced", 0, "old", Duration::from_millis(1)).await.unwrap().unwrap();
    // Waiting out a 1 ms lease is the point of this test, not synchronisation.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let new = store.acquire_lease("fenced", 0, "new", Duration::from_secs(60)).await.unwrap().expect("expired lease");
    assert!(new.token > old.token);
    assert!(store.acquire_lease("fenced", 0, "old", Duration::from_secs(60)).await.unwrap().is_none());
    assert!(!store.renew_lease("fenced", 0, &old, Duration::from_secs(60)).await.unwrap());
    // The old holder's writes are refused, and its read-model writes rolled back.
    let applied = store.apply(&ledger, 0, Position::START, last, &page.events, Some(&old)).await.unwrap();
    assert!(matches!(applied, Applied::Moved), "{applied:?}");
    assert!(!store.advance("fenced", 0, Position::START, last, None, Some(&old)).await.unwrap());
    assert_eq!(store.checkpoint("fenced", 0).await.unwrap(), None);
    // The new holder's go through.
    let applied = store.apply(&ledger, 0, Position::START, last, &page.events, Some(&new)).await.unwrap();
    assert!(matches!(applied, Applied::Committed), "{applied:?}");
    assert_eq!(store.checkpoint("fenced", 0).await.unwrap().unwrap().position, last);
}

/// The store itself refuses a batch with an event of a stream that has a dead letter of the
/// projection's partition, whoever parked it and whenever: a worker needs no lookup of its own
/// before each batch, and a dead letter parked after it looked (another process, a takeover)
/// still holds its stream's later events back. Dead letters of other projections, and of the
/// same streams' earlier history once retried, do not.
async fn a_batch_behind_a_dead_letter_is_refused_by_the_store(backend: Backend) {
    let store = &*backend.store;
    let ledger = Ledger::new("gate");
    let other = Ledger::new("gate_other");
    // Streams order-0 and order-1, alternating: 0, 1, 0, 1, 0, 1, 0.
    let (_, last) = append(&*backend.events, "order", 2, 7).await;
    let events = backend.events.read_all_page(Position::START, &Filter::all(), 10).await.unwrap().events;
    let first = &events[0];
    let park = Park { event: first, error: "poison", attempts: 3 };
    assert!(store.park("gate", 0, Position::START, park, None).await.unwrap());
    // The same event parked by another projection: it holds back that projection only.
    assert!(store.park("gate_other", 0, Position::START, park, None).await.unwrap());
    let rest = &events[1..];
    let applied = store.apply(&ledger, 0, first.position, last, rest, None).await.unwrap();
    assert!(matches!(applied, Applied::Blocked), "{} applied a batch behind a dead letter: {applied:?}", backend.kind);
    assert_eq!(store.checkpoint("gate", 0).await.unwrap().unwrap().position, first.position, "nothing moved");
    assert!(backend.ledger(&Arc::new(ledger)).await.is_empty(), "nothing applied");
    // A batch of the other stream only goes through.
    let ledger = Ledger::new("gate");
    let unblocked: Vec<RecordedEvent> = rest.iter().filter(|e| e.stream != first.stream).cloned().collect();
    let to = unblocked.last().unwrap().position;
    let applied = store.apply(&ledger, 0, first.position, to, &unblocked, None).await.unwrap();
    assert!(matches!(applied, Applied::Committed), "{applied:?}");
    // Once the dead letter is gone (retried or skipped), its stream flows again.
    let dead = store.dead_letters("gate").await.unwrap();
    assert!(store.remove_dead_letter("gate", dead[0].id).await.unwrap());
    let blocked_before: Vec<RecordedEvent> = events.iter().filter(|e| e.position > to).cloned().collect();
    let applied = store.apply(&ledger, 0, to, last, &blocked_before, None).await.unwrap();
    assert!(matches!(applied, Applied::Committed), "{applied:?}");
    // The other projection is still held back on its own dead letter.
    let applied = store.apply(&other, 0, first.position, last, rest, None).await.unwrap();
    assert!(matches!(applied, Applied::Blocked), "{applied:?}");
}

mod leases {
    macro_rules! lease_backends {
        ($($case:ident),*) => {
            mod on_memory {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { super::super::$case(super::super::memory()).await; })*
            }
            #[cfg(feature = "sqlite")]
            mod on_sqlite {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { let (backend, _dir) = super::super::sqlite().await; super::super::$case(backend).await; })*
            }
            #[cfg(feature = "postgres")]
            mod on_postgres {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { super::super::$case(super::super::postgres().await).await; })*
            }
        };
    }
    lease_backends!(
        partitions_are_shared_and_taken_over,
        a_writer_that_lost_its_lease_writes_nothing,
        dedup_records_are_kept_then_pruned
    );
}

/// Cases for the stores whose batches are transactions (the memory store's are not: a
/// handler's effects there cannot be rolled back, as `MemoryProjectionStore` says).
mod transactional {
    #[cfg(feature = "sqlite")]
    mod on_sqlite {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_worker_mid_batch_never_commits_on_top_of_a_reset() {
            let (backend, _dir) = crate::sqlite().await;
            crate::control::a_worker_mid_batch_never_commits_on_top_of_a_reset(backend).await;
        }
    }
    #[cfg(feature = "postgres")]
    mod on_postgres {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_worker_mid_batch_never_commits_on_top_of_a_reset() {
            crate::control::a_worker_mid_batch_never_commits_on_top_of_a_reset(crate::postgres().await).await;
        }
    }
}

/// A partitioned at-least-once consumer whose partition 0 waits at a gate: its lag grows while
/// the other partitions keep up.
struct Gated {
    gate: tokio::sync::Semaphore,
}

#[annal::async_trait]
impl Projection for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }
    fn partitions(&self) -> u32 {
        3
    }
    async fn handle(&self, events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), BoxError> {
        if events.iter().any(|e| annal::partition_of(&e.stream, 3) == 0) {
            drop(self.gate.acquire().await?);
        }
        Ok(())
    }
}

async fn lag_is_exact_partition_by_partition(backend: Backend) {
    let (_, last) = append(&*backend.events, "order", 12, 120).await;
    let in_partition_0 = backend
        .events
        .read_all_page(Position::START, &Filter::all(), 1000)
        .await
        .unwrap()
        .events
        .iter()
        .filter(|e| annal::partition_of(&e.stream, 3) == 0)
        .count() as u64;
    assert!(in_partition_0 > 0 && in_partition_0 < 120, "{in_partition_0}");
    let projection = Arc::new(Gated { gate: tokio::sync::Semaphore::new(0) });
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(projection.clone(), WorkerOptions::default())
        .unwrap()
        .start();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let lag = loop {
        let lag = running.lag("gated").await.unwrap();
        if lag.partitions[1..].iter().all(|p| p.events_behind == 0) {
            break lag;
        }
        assert!(tokio::time::Instant::now() < deadline, "partitions 1 and 2 never caught up: {lag:?}");
        // Workers of other partitions are not observable here but through their lag.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Only the gated partition is behind, by exactly its own events, not the whole log's.
    assert_eq!(lag.partitions.len(), 3);
    assert_eq!(lag.partitions[0].events_behind, in_partition_0);
    assert_eq!(lag.events_behind, in_partition_0);
    assert_eq!(lag.checkpoint, Position::START);
    assert!(lag.time_behind > Duration::ZERO && lag.time_behind == lag.partitions[0].time_behind);
    projection.gate.add_permits(1_000);
    running.wait_for("gated", last, PATIENCE).await.unwrap();
    let lag = running.lag("gated").await.unwrap();
    assert_eq!((lag.events_behind, lag.time_behind), (0, Duration::ZERO));
    running.shutdown().await.unwrap();
}

/// Fails every event with a decode error: nothing a retry can cure.
struct Undecodable;

#[annal::async_trait]
impl Projection for Undecodable {
    fn name(&self) -> &str {
        "undecodable"
    }
    async fn handle(&self, events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), BoxError> {
        let event = &events[0];
        Err(Box::new(annal::Error::Decode {
            what: format!("event {}@{}", event.stream, event.version),
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            reason: "unknown event type".into(),
        }))
    }
}

#[tokio::test]
async fn undecodable_events_are_parked_without_retries() {
    let backend = memory();
    let (_, last) = append(&*backend.events, "order", 1, 2).await;
    // A long first pause: retrying would make this test take minutes.
    let options = WorkerOptions::default().retry(RetryPolicy::default().initial(Duration::from_secs(60)));
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(Arc::new(Undecodable), options)
        .unwrap()
        .start();
    assert!(matches!(running.wait_for("undecodable", last, PATIENCE).await, Err(Error::Parked { .. })));
    running.shutdown().await.unwrap();
    let parked = backend.store.dead_letters("undecodable").await.unwrap();
    assert_eq!(parked.len(), 2);
    assert_eq!((parked[0].attempts, parked[1].attempts), (1, 0), "parked at the first failure, then behind it");
}

async fn dedup_records_are_kept_then_pruned(backend: Backend) {
    let dedup = &*backend.dedup;
    let id = Uuid::now_v7();
    assert!(!dedup.is_recorded("mailer", id).await.unwrap());
    assert!(dedup.record("mailer", id).await.unwrap());
    assert!(!dedup.record("mailer", id).await.unwrap(), "recorded twice");
    assert!(dedup.is_recorded("mailer", id).await.unwrap());
    assert!(!dedup.is_recorded("texter", id).await.unwrap(), "consumers are separate");
    assert_eq!(dedup.prune("mailer", Duration::from_secs(3600)).await.unwrap(), 0);
    assert!(dedup.is_recorded("mailer", id).await.unwrap());
    // Letting the record age past a 1 ms window is the point here, not synchronisation.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(dedup.prune("mailer", Duration::from_millis(1)).await.unwrap(), 1);
    assert!(!dedup.is_recorded("mailer", id).await.unwrap());
}

/// The fan-out case of the subscription conformance suite, for projections: many projections in
/// one process follow the same log through the shared follower, some catching up and some at
/// the head while writers append, and each applies exactly the events its filter selects.
async fn many_projections_each_apply_exactly_their_events(backend: Backend) {
    const NAMES: [&str; 10] = ["fan0", "fan1", "fan2", "fan3", "fan4", "fan5", "fan6", "fan7", "fan8", "fan9"];
    let filters = [
        Filter::all(),
        Filter::categories(["fan"]),
        Filter::event_types(["Happened"]),
        Filter::categories(["out"]),
        Filter::categories(["nothing"]),
    ];
    append(&*backend.events, "fan", 5, 20).await;
    let ledgers: Vec<Arc<Ledger>> = NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| Arc::new(Ledger { filter: filters[i % filters.len()].clone(), ..Ledger::new(name) }))
        .collect();
    let mut runner = ProjectionRunner::new(backend.events.clone(), backend.store.clone());
    for ledger in &ledgers {
        runner = runner.with(ledger.clone(), quick_retries()).unwrap();
    }
    let running = runner.start();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let events = backend.events.clone();
            tokio::spawn(async move { append(&*events, if w % 2 == 0 { "fan" } else { "out" }, 9, 50).await })
        })
        .collect();
    let mut last = Position::START;
    for writer in writers {
        last = last.max(writer.await.unwrap().1);
    }
    running.wait_for(NAMES[0], last, PATIENCE).await.unwrap();
    let mut log = Vec::new();
    while log.last().map_or(Position::START, |e: &RecordedEvent| e.position) < last {
        let from = log.last().map_or(Position::START, |e| e.position);
        log.extend(backend.events.read_all_page(from, &Filter::all(), 100).await.unwrap().events);
    }
    for ledger in &ledgers {
        running.wait_for(ledger.name, last, PATIENCE).await.unwrap();
        let expected: HashSet<Uuid> = log.iter().filter(|e| ledger.filter.matches(e)).map(|e| e.id).collect();
        assert_eq!(backend.ledger(ledger).await, expected, "projection {}", ledger.name);
    }
    running.shutdown().await.unwrap();
}

/// An event the store cannot decode (written by hand here, with raw SQL) does not halt a
/// projection: it is parked at once as a dead letter with the reason, the events after it are
/// applied, and the later events of its stream wait behind it, as behind any parked event.
async fn an_unreadable_event_is_parked_and_the_rest_flows(
    backend: Backend,
    write_bad: impl std::future::Future<Output = Uuid>,
) {
    let (before, _) = append(&*backend.events, "order", 3, 6).await;
    let bad = write_bad.await; // stream order-9, version 0
    let (after, last) = append(&*backend.events, "order", 3, 6).await;
    let behind = NewEvent::new("Happened", json!({}));
    let behind_id = behind.id;
    let stream = StreamName::new("order-9").unwrap();
    let last =
        last.max(backend.events.append(&stream, ExpectedVersion::Exact(0), vec![behind]).await.unwrap().position());
    let ledger = Arc::new(Ledger::new("unreadable"));
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    assert!(matches!(running.wait_for("unreadable", last, PATIENCE).await, Err(Error::Parked { .. })));
    let parked = backend.store.dead_letters("unreadable").await.unwrap();
    assert_eq!(parked.iter().map(|d| d.event_id).collect::<Vec<_>>(), vec![bad, behind_id]);
    assert!(parked[0].error.contains("cannot be read"), "{}", parked[0].error);
    assert_eq!(parked[0].attempts, 1, "parked at once: no retry can decode it");
    let applied: HashSet<Uuid> = before.iter().chain(&after).copied().collect();
    assert_eq!(backend.ledger(&ledger).await, applied);
    assert!(running.is_running("unreadable").unwrap());
    running.shutdown().await.unwrap();
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_event_is_parked_and_the_rest_flows_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let events = annal::SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
    let store = Arc::new(annal::projections::SqliteProjectionStore::new(&events).await.unwrap());
    let pool = events.writer().clone();
    let (read, clear): (Arc<ReadLedger>, Arc<ClearLedger>) = (sql_ledger!(pool.clone()), sql_clear!(pool.clone()));
    let backend = Backend { events: Arc::new(events), store: store.clone(), dedup: store, read, clear, kind: "sqlite" };
    let write_bad = async move {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, \
             metadata, recorded_at, stream_hash) VALUES (?, 'order-9', 'order', 0, 'Happened', 1, 'not json', '{}', 0, 0)",
        )
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
        id
    };
    an_unreadable_event_is_parked_and_the_rest_flows(backend, write_bad).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_event_is_parked_and_the_rest_flows_on_postgres() {
    let events = support::pg::fresh_store().await;
    let store = Arc::new(annal::projections::PgProjectionStore::new(&events).await.unwrap());
    let pool = events.pool().clone();
    let (read, clear): (Arc<ReadLedger>, Arc<ClearLedger>) = (sql_ledger!(pool.clone()), sql_clear!(pool.clone()));
    let backend =
        Backend { events: Arc::new(events), store: store.clone(), dedup: store, read, clear, kind: "postgres" };
    let write_bad = async move {
        let id = Uuid::now_v7();
        // JSON nested deeper than any decoder reads.
        let deep = format!("{}1{}", "[".repeat(150), "]".repeat(150));
        sqlx::query(
            "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, \
             metadata, stream_hash) VALUES ($1, 'order-9', 'order', 0, 'Happened', 1, $2::jsonb, '{}'::jsonb, 0)",
        )
        .bind(id)
        .bind(deep)
        .execute(&pool)
        .await
        .unwrap();
        id
    };
    an_unreadable_event_is_parked_and_the_rest_flows(backend, write_bad).await;
}
