//! Pause, resume, resets and checkpoint moves under running workers, on every backend.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use annal::projections::{Error, Park, Pause, Projection, ProjectionRunner, ProjectionStore, Tx, WorkerOptions};
use annal::{BoxError, EventStore, ExpectedVersion, Filter, NewEvent, Position, RecordedEvent, StreamName};
use serde_json::json;
use uuid::Uuid;

use super::{Backend, Ledger, PATIENCE, Partitioned, append, leases_until, quick_retries};

/// Appends one event at a time to 16 streams until `stop`; returns their ids.
async fn write_until(events: Arc<dyn EventStore>, stop: Arc<AtomicBool>) -> Vec<Uuid> {
    let mut ids = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream = StreamName::from_parts("order", ids.len() % 16).unwrap();
        let event = NewEvent::new("Happened", json!({ "i": ids.len() }));
        ids.push(event.id);
        events.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
        tokio::task::yield_now().await;
    }
    ids
}

async fn checkpoints(store: &dyn ProjectionStore, name: &str, partitions: u32) -> Vec<Position> {
    let mut positions = Vec::new();
    for partition in 0..partitions {
        positions.push(store.checkpoint(name, partition).await.unwrap().map_or(Position::START, |c| c.position));
    }
    positions
}

/// Two runners share a projection while a writer appends; a pause makes both let go of every
/// partition (and nobody else can take one), no checkpoint moves while it lasts, `wait_for`
/// says so at once, and after the resume the read model is the log, each event once.
pub(crate) async fn a_paused_projection_is_let_go_and_resumes_exactly(backend: Backend) {
    const LEASE: Duration = Duration::from_millis(600);
    let projection = Arc::new(Partitioned(Arc::new(Ledger::new("paused"))));
    let runner = |owner: &str| {
        ProjectionRunner::new(backend.events.clone(), backend.store.clone())
            .owner(owner)
            .lease(LEASE)
            .with(projection.clone(), quick_retries())
            .unwrap()
            .start()
    };
    let (a, b) = (runner("runner-a"), runner("runner-b"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(backend.events.clone(), stop.clone()));
    leases_until(&*backend.store, "paused", "both run it", |l| {
        l.iter().any(|l| l.owner == "runner-a") && l.iter().any(|l| l.owner == "runner-b")
    })
    .await;
    backend.store.pause("paused", &Pause::new("operator", "maintenance")).await.unwrap();
    // Within a lease round or two every partition is let go (released, not left to expire).
    leases_until(&*backend.store, "paused", "paused: all let go", <[_]>::is_empty).await;
    assert!(backend.store.acquire_lease("paused", 0, "intruder", LEASE).await.unwrap().is_none());
    let head = backend.events.head().await.unwrap();
    let waited = a.wait_for("paused", head, PATIENCE).await;
    assert!(matches!(&waited, Err(Error::Paused { by, .. }) if by == "operator"), "{waited:?}");
    // Nothing moves while paused, though events keep coming: watched over three lease periods
    // (the absence of movement can only be watched for a while).
    let before = checkpoints(&*backend.store, "paused", 4).await;
    let head_before = backend.events.head().await.unwrap();
    tokio::time::sleep(LEASE * 3).await;
    assert_eq!(checkpoints(&*backend.store, "paused", 4).await, before, "a checkpoint moved while paused");
    assert!(backend.events.head().await.unwrap() > head_before, "the writer kept appending");
    assert!(backend.store.resume("paused").await.unwrap());
    stop.store(true, Ordering::SeqCst);
    let ids = writer.await.unwrap();
    let last = backend.events.head().await.unwrap();
    a.wait_for("paused", last, PATIENCE).await.unwrap();
    b.wait_for("paused", last, PATIENCE).await.unwrap();
    assert_eq!(backend.ledger(&projection.0).await, ids.into_iter().collect::<HashSet<_>>());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A caught-up worker waits for wake-ups from its position in memory; a reset of its read
/// model and checkpoint (bumping the epoch) must bring it back to the start without any new
/// event, and the replay must apply each event once.
pub(crate) async fn a_reset_under_a_caught_up_worker_is_noticed_without_new_events(backend: Backend) {
    let ledger = Arc::new(Ledger::new("reset_idle"));
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .lease(Duration::from_millis(300))
        .with(ledger.clone(), quick_retries())
        .unwrap()
        .start();
    let (ids, last) = append(&*backend.events, "order", 3, 30).await;
    running.wait_for("reset_idle", last, PATIENCE).await.unwrap();
    backend.clear(&ledger).await;
    backend.store.reset("reset_idle").await.unwrap();
    assert_eq!(backend.store.control("reset_idle").await.unwrap().epoch, 1);
    let all: HashSet<Uuid> = ids.into_iter().collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let at = backend.store.checkpoint("reset_idle", 0).await.unwrap().map(|c| c.position);
        if at == Some(last) && backend.ledger(&ledger).await == all {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the reset was never noticed: checkpoint {at:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();
}

/// The control record and checkpoint moves, store by store: the same answers from each.
pub(crate) async fn the_control_record_is_the_same_on_every_store(backend: Backend) {
    let store = &*backend.store;
    let control = store.control("ctl").await.unwrap();
    assert_eq!((control.paused, control.epoch), (None, 0));
    assert!(!store.resume("ctl").await.unwrap(), "nothing to resume");
    store.pause("ctl", &Pause::new("rebuilder", "rebuild")).await.unwrap();
    let control = store.control("ctl").await.unwrap();
    let pause = control.paused.clone().unwrap();
    assert_eq!((pause.by.as_str(), pause.reason.as_str()), ("rebuilder", "rebuild"));
    assert!(control.runnable_by("rebuilder") && !control.runnable_by("runner"));
    let ttl = Duration::from_secs(60);
    assert!(store.acquire_lease("ctl", 0, "runner", ttl).await.unwrap().is_none(), "paused for another");
    assert!(store.acquire_lease("ctl", 0, "rebuilder", ttl).await.unwrap().is_some(), "paused for itself");
    assert!(store.resume("ctl").await.unwrap());
    let fence = store.acquire_lease("ctl", 1, "runner", ttl).await.unwrap().expect("resumed");
    // The pause is part of the fence: a holder that has not yet seen it cannot commit.
    let (_, first) = append(&*backend.events, "other", 1, 1).await;
    store.pause("ctl", &Pause::new("rebuilder", "rebuild")).await.unwrap();
    assert!(!store.advance("ctl", 1, Position::START, first, None, Some(&fence)).await.unwrap(), "paused");
    assert!(store.resume("ctl").await.unwrap());
    assert!(store.advance("ctl", 1, Position::START, first, None, Some(&fence)).await.unwrap(), "resumed");
    // Two dead letters, then every partition moved between them: the later one goes (its event
    // will be met again), the earlier one stays.
    append(&*backend.events, "order", 1, 5).await;
    let page = backend.events.read_all_page(first, &Filter::categories(["order"]), 10).await.unwrap();
    let e = &page.events;
    let park = |event| Park { event, error: "poison", attempts: 1 };
    assert!(store.park("ctl", 0, Position::START, park(&e[1]), None).await.unwrap());
    assert!(store.park("ctl", 0, e[1].position, park(&e[3]), None).await.unwrap());
    store.move_checkpoints("ctl", 3, e[2].position).await.unwrap();
    assert_eq!(checkpoints(store, "ctl", 3).await, vec![e[2].position; 3]);
    let dead: Vec<Uuid> = store.dead_letters("ctl").await.unwrap().into_iter().map(|d| d.event_id).collect();
    assert_eq!(dead, vec![e[1].id]);
    assert_eq!(store.control("ctl").await.unwrap().epoch, 1);
    store.reset("ctl").await.unwrap();
    assert_eq!(store.control("ctl").await.unwrap().epoch, 2);
    assert_eq!(store.checkpoint("ctl", 0).await.unwrap(), None);
}

/// A ledger whose handler, once armed, stops at a gate before writing anything.
pub(crate) struct Gated {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) armed: AtomicBool,
    pub(crate) entered: tokio::sync::Notify,
    pub(crate) gate: tokio::sync::Semaphore,
}

#[annal::async_trait]
impl Projection for Gated {
    fn name(&self) -> &str {
        self.ledger.name
    }
    fn batch_size(&self) -> usize {
        100
    }
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            drop(self.gate.acquire().await?);
        }
        self.ledger.handle(events, tx).await
    }
}

/// A worker is in the middle of a batch (its handler running in the transaction) when the
/// read model and the checkpoint are reset: its commit must fail, and the replay from the
/// start must give the log, each event once. A worker that committed on top of the reset
/// would leave the first events out for good (its checkpoint would be past them).
///
/// Transactional stores only: the memory store runs handlers outside any transaction, so a
/// handler's effects there cannot be rolled back (see `MemoryProjectionStore`).
pub(crate) async fn a_worker_mid_batch_never_commits_on_top_of_a_reset(backend: Backend) {
    let gated = Arc::new(Gated {
        ledger: Arc::new(Ledger::new("midbatch")),
        armed: AtomicBool::new(false),
        entered: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let running = ProjectionRunner::new(backend.events.clone(), backend.store.clone())
        .lease(Duration::from_millis(300))
        .with(gated.clone(), WorkerOptions::default())
        .unwrap()
        .start();
    let (mut ids, first) = append(&*backend.events, "order", 3, 10).await;
    running.wait_for("midbatch", first, PATIENCE).await.unwrap();
    gated.armed.store(true, Ordering::SeqCst);
    // One append, so that nothing else waits for SQLite's writer while the batch holds it.
    let more: Vec<NewEvent> = (0..10).map(|i| NewEvent::new("Happened", json!({ "i": i }))).collect();
    ids.extend(more.iter().map(|e| e.id));
    let stream = StreamName::from_parts("order", 7).unwrap();
    let last = backend.events.append(&stream, ExpectedVersion::Any, more).await.unwrap().position();
    gated.entered.notified().await;
    let reset = {
        let (backend, ledger) = (backend.clone(), gated.ledger.clone());
        tokio::spawn(async move {
            backend.clear(&ledger).await;
            backend.store.reset("midbatch").await.unwrap();
        })
    };
    if backend.kind == "postgres" {
        // The reset commits while the batch's transaction is open; the batch must then fail.
        reset.await.unwrap();
        gated.gate.add_permits(1);
    } else {
        // SQLite: the held batch has the file's write lock, so the reset waits for its commit.
        gated.gate.add_permits(1);
        reset.await.unwrap();
    }
    let all: HashSet<Uuid> = ids.into_iter().collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let at = backend.store.checkpoint("midbatch", 0).await.unwrap().map(|c| c.position);
        let ledger = backend.ledger(&gated.ledger).await;
        if at == Some(last) && ledger == all {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "checkpoint {at:?}, {} of {} events", ledger.len(), all.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();
}
