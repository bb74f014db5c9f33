//! Aggregates through the repository on every backend: no lost update under concurrent
//! commands, metadata on every event, snapshots that never change what `load` returns, typed
//! conflicts; plus property tests of replay, snapshots and upcasting.
#![cfg(feature = "derive")]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use annal::{
    Aggregate, CommandError, Decide, Event, EventStore, ExpectedVersion, Filter, Metadata, NewEvent, Page, Position,
    ReadStream, RecordedEvent, Repository, SnapshotPolicy, StreamName, Wakeup,
};
use futures::TryStreamExt;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    Deposited { amount: u64 },
    Withdrawn { amount: u64 },
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Deposit(u64),
    Withdraw(u64),
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum AccountError {
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds { balance: u64, requested: u64 },
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(category = "account", event = AccountEvent, id = u64, snapshot(every = 4))]
struct Account {
    balance: u64,
    transactions: u64,
}

impl Decide for Account {
    type Command = AccountCommand;
    type Error = AccountError;

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
            AccountCommand::Withdraw(requested) if requested > self.balance => {
                Err(AccountError::InsufficientFunds { balance: self.balance, requested })
            }
            AccountCommand::Withdraw(amount) => Ok(vec![AccountEvent::Withdrawn { amount }]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
        self.transactions += 1;
    }
}

async fn history<S: EventStore>(store: &S, id: u64) -> Vec<RecordedEvent> {
    let stream = Account::stream_name(&id).unwrap();
    store.read_stream(&stream, ReadStream::forwards()).try_collect().await.unwrap()
}

fn full_replay(events: &[RecordedEvent]) -> Account {
    let decoded: Vec<AccountEvent> = events.iter().map(|e| AccountEvent::from_recorded(e).unwrap()).collect();
    annal::replay::<Account>(&decoded)
}

/// Every case on every backend, once with repositories that load every aggregate and once
/// with the aggregate cache on (`Repository::with_cache`).
macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        backends!(@cache uncached false; $($case),*);
        backends!(@cache cached true; $($case),*);
    };
    (@cache $mode:ident $cached:literal; $($case:ident),*) => {
        mod $mode {
            mod memory {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { crate::$case(annal::MemoryEventStore::new(), $cached).await; })*
            }
            #[cfg(feature = "sqlite")]
            mod sqlite {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = annal::SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
                    crate::$case(store, $cached).await;
                })*
            }
            #[cfg(feature = "postgres")]
            mod postgres {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() { crate::$case(crate::support::pg::fresh_store().await, $cached).await; })*
            }
        }
    };
}

/// A repository of `A`, with the aggregate cache when `cached`.
fn new_repository<A: Decide + Clone, S: EventStore>(store: S, cached: bool) -> Repository<A, S> {
    let repository = Repository::new(store);
    if cached { repository.with_cache(16) } else { repository }
}

backends!(
    concurrent_commands_lose_no_update,
    metadata_flows_into_every_event,
    snapshots_never_change_what_load_returns,
    rejected_commands_write_nothing,
    conflicts_are_retried_then_reported,
    a_repeated_command_id_takes_effect_once,
    a_repeat_returns_the_original_outcome_whatever_happened_since,
    concurrent_calls_with_one_command_id_write_once_and_say_so,
    one_command_id_on_two_aggregates_is_two_commands,
    a_stale_cache_is_corrected_never_used,
    snapshots_are_written_by_the_append_that_reaches_them
);

async fn a_repeated_command_id_takes_effect_once<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    let repository = new_repository::<Account, _>(store.clone(), cached);
    let command_id = Uuid::now_v7();
    let deposit = || AccountCommand::Deposit(10);
    let first = repository.execute_once(&8, command_id, deposit(), Metadata::default()).await.unwrap();
    assert!(!first.repeated);
    // Someone else's command lands in between.
    repository.execute(&8, AccountCommand::Deposit(1)).await.unwrap();
    // The first reply was lost; the caller sends the same command again.
    let again = repository.execute_once(&8, command_id, deposit(), Metadata::default()).await.unwrap();
    assert!(again.repeated);
    assert_eq!(again.events, first.events, "the events written the first time, with their positions");
    assert_eq!((again.state.balance, again.version), (11, Some(1)));
    assert_eq!(history(&store, 8).await.len(), 2, "the deposit was written once");
    // Another command id is another command.
    let other = repository.execute_once(&8, Uuid::now_v7(), deposit(), Metadata::default()).await.unwrap();
    assert_eq!((other.repeated, other.state.balance), (false, 21));
}

/// (b) of the review: the first withdrawal drained the account; its repeat must not be decided
/// again (it would be rejected for insufficient funds) but answered with the original events.
async fn a_repeat_returns_the_original_outcome_whatever_happened_since<S: EventStore + Clone + 'static>(
    store: S,
    cached: bool,
) {
    let repository = new_repository::<Account, _>(store.clone(), cached);
    repository.execute(&21, AccountCommand::Deposit(50)).await.unwrap();
    let command_id = Uuid::now_v7();
    let withdraw = || AccountCommand::Withdraw(50);
    let first = repository.execute_once(&21, command_id, withdraw(), Metadata::default()).await.unwrap();
    assert_eq!((first.repeated, first.state.balance), (false, 0));
    let again = repository.execute_once(&21, command_id, withdraw(), Metadata::default()).await.unwrap();
    assert!(again.repeated, "a repeat, not a rejection");
    assert_eq!(again.events, first.events);
    // Still after the aggregate moved on.
    repository.execute(&21, AccountCommand::Deposit(7)).await.unwrap();
    let later = repository.execute_once(&21, command_id, withdraw(), Metadata::default()).await.unwrap();
    assert!(later.repeated);
    assert_eq!(later.events, first.events);
    assert_eq!((later.state.balance, later.version), (7, Some(2)), "the aggregate as it is now");
    assert_eq!(history(&store, 21).await.len(), 3, "the withdrawal was written once");
}

/// (a) of the review: of concurrent calls with one command id, exactly one writes; every other
/// call says it was a repeat and returns the same events.
async fn concurrent_calls_with_one_command_id_write_once_and_say_so<S: EventStore + Clone + 'static>(
    store: S,
    cached: bool,
) {
    const CALLS: usize = 12;
    let repository = new_repository::<Account, _>(store.clone(), cached).with_max_retries(CALLS);
    repository.execute(&22, AccountCommand::Deposit(100)).await.unwrap();
    for round in 0..5 {
        let command_id = Uuid::now_v7();
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLS));
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let (repository, start) = (repository.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    repository.execute_once(&22, command_id, AccountCommand::Withdraw(10), Metadata::default()).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap().unwrap());
        }
        let writers = results.iter().filter(|r| !r.repeated).count();
        assert_eq!(writers, 1, "round {round}: exactly one call wrote");
        let events = &results[0].events;
        assert_eq!(events.len(), 1);
        assert!(results.iter().all(|r| &r.events == events), "round {round}: the same events for every call");
    }
    let balance = repository.load(&22).await.unwrap().state.balance;
    assert_eq!(balance, 50, "five withdrawals of 10, each once");
    assert_eq!(history(&store, 22).await.len(), 6);
}

/// (c) of the review: the key is scoped to the aggregate, so the same command id on another
/// aggregate is another command, never a silent drop.
async fn one_command_id_on_two_aggregates_is_two_commands<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    let repository = new_repository::<Account, _>(store.clone(), cached);
    let command_id = Uuid::now_v7();
    let a = repository.execute_once(&23, command_id, AccountCommand::Deposit(5), Metadata::default()).await.unwrap();
    let b = repository.execute_once(&24, command_id, AccountCommand::Deposit(6), Metadata::default()).await.unwrap();
    assert!(!a.repeated && !b.repeated, "two aggregates, two commands");
    assert_ne!(a.events[0].id, b.events[0].id);
    assert_eq!((history(&store, 23).await.len(), history(&store, 24).await.len()), (1, 1));
    assert_eq!(repository.load(&24).await.unwrap().state.balance, 6);
}

/// Another writer (another process, or a repository without this cache) changes an aggregate
/// behind a cached copy: the cached state is never what a command is finally decided on. A
/// command it would accept hits the conflict path and is decided again on the stored state; a
/// command it would refuse is decided again on the stored state before being refused.
async fn a_stale_cache_is_corrected_never_used<S: EventStore + Clone + 'static>(store: S, _cached: bool) {
    use AccountCommand::{Deposit, Withdraw};
    let ours = Repository::<Account, _>::new(store.clone()).with_cache(16);
    let theirs = Repository::<Account, _>::new(store.clone());
    ours.execute(&3, Deposit(100)).await.unwrap();
    theirs.execute(&3, Withdraw(100)).await.unwrap();
    // Cached: balance 100, which would allow it. Stored: 0.
    let refused = ours.execute(&3, Withdraw(60)).await.unwrap_err();
    assert!(
        matches!(refused, CommandError::Rejected(AccountError::InsufficientFunds { balance: 0, requested: 60 })),
        "{refused:?}"
    );
    ours.execute(&3, Deposit(10)).await.unwrap();
    theirs.execute(&3, Deposit(500)).await.unwrap();
    // Cached: balance 10, which would refuse it. Stored: 510.
    let done = ours.execute(&3, Withdraw(300)).await.unwrap();
    assert_eq!((done.state.balance, done.version), (210, Some(4)));
    theirs.execute(&3, Deposit(1)).await.unwrap();
    // Cached: 210 at version 4; the append expecting version 4 conflicts, and the command lands
    // on the stored state, without spending a retry.
    let done = ours.with_max_retries(0).execute(&3, Deposit(1)).await.unwrap();
    assert_eq!((done.state.balance, done.version), (212, Some(6)));
    let events = history(&store, 3).await;
    assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), (0..=6).collect::<Vec<_>>());
    assert_eq!(full_replay(&events), done.state);
    assert_eq!(theirs.load(&3).await.unwrap().state, done.state);
}

async fn concurrent_commands_lose_no_update<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    const TASKS: u64 = 8;
    const COMMANDS: u64 = 15;
    let repository = new_repository::<Account, _>(store.clone(), cached).with_max_retries(1_000);
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let repository = repository.clone();
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for i in 0..COMMANDS {
                    let amount = t * 1000 + i + 1;
                    let done = repository.execute(&1, AccountCommand::Deposit(amount)).await.unwrap();
                    assert_eq!(done.events.len(), 1);
                    accepted.push((done.events[0].id, amount));
                }
                accepted
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.unwrap());
    }
    let events = history(&store, 1).await;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event was written twice");
    assert_eq!(unique, accepted.iter().map(|(id, _)| *id).collect(), "the stream and the accepted commands differ");
    let loaded = repository.load(&1).await.unwrap();
    assert_eq!(loaded.state.balance, accepted.iter().map(|(_, amount)| amount).sum::<u64>());
    assert_eq!(loaded.state.transactions, TASKS * COMMANDS);
    assert_eq!(loaded.version, Some(TASKS * COMMANDS - 1));
    assert_eq!(loaded.state, full_replay(&events));
}

async fn metadata_flows_into_every_event<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    let repository = new_repository::<Account, _>(store.clone(), cached);
    let (correlation, causation) = (Uuid::now_v7(), Uuid::now_v7());
    let metadata =
        Metadata::default().with_correlation_id(correlation).with_causation_id(causation).with("user", "ada");
    let done = repository.execute_with(&7, AccountCommand::Deposit(5), metadata.clone()).await.unwrap();
    let events = history(&store, 7).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].metadata, metadata);
    assert_eq!((events[0].id, events[0].position, events[0].version), (done.events[0].id, done.events[0].position, 0));
    assert_eq!(done.position(), Some(events[0].position));
    assert_eq!((events[0].event_type.as_str(), events[0].schema_version), ("Deposited", 1));
}

async fn snapshots_never_change_what_load_returns<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    let repository = new_repository::<Account, _>(store.clone(), cached);
    for i in 1..=10 {
        repository.execute(&3, AccountCommand::Deposit(i)).await.unwrap();
    }
    let stream = Account::stream_name(&3).unwrap();
    // Every 4 events: after versions 3 and 7.
    let snapshot = store.load_snapshot(&stream).await.unwrap().expect("a snapshot was written");
    assert_eq!((snapshot.version, snapshot.schema_version), (7, 1));
    let loaded = repository.load(&3).await.unwrap();
    assert_eq!(loaded.state, full_replay(&history(&store, 3).await));
    assert_eq!((loaded.state.balance, loaded.version), (55, Some(9)));
    // A snapshot of another schema version (an older build's shape) is ignored.
    store.save_snapshot(&stream, &annal::Snapshot::new(9, 99, json!({ "nonsense": true }))).await.unwrap();
    assert_eq!(repository.load(&3).await.unwrap(), loaded);
    // A snapshot of the current version that does not decode is ignored too.
    store.save_snapshot(&stream, &annal::Snapshot::new(9, 1, json!("corrupt"))).await.unwrap();
    assert_eq!(repository.load(&3).await.unwrap(), loaded);
}

/// The repository writes a due snapshot with the command's append, in its commit: one write,
/// and a snapshot exactly when the events are stored. A conflict writes neither; the retry
/// writes the snapshot of the state it decided on.
async fn snapshots_are_written_by_the_append_that_reaches_them<S: EventStore + Clone + 'static>(
    store: S,
    cached: bool,
) {
    let guarded = Racing { inner: store.clone(), remaining: Default::default() };
    let repository = new_repository::<Account, _>(guarded.clone(), cached);
    let stream = Account::stream_name(&6).unwrap();
    for amount in 1..=3 {
        repository.execute(&6, AccountCommand::Deposit(amount)).await.unwrap();
    }
    assert_eq!(store.load_snapshot(&stream).await.unwrap(), None);
    // The fourth event is due a snapshot (every 4); another writer gets in first, so the
    // append conflicts, and the retry lands at version 4: a snapshot is due again at 7.
    guarded.remaining.store(1, Ordering::SeqCst);
    let done = repository.execute(&6, AccountCommand::Deposit(4)).await.unwrap();
    assert_eq!(done.version, Some(4));
    assert_eq!(store.load_snapshot(&stream).await.unwrap(), None, "a snapshot of a conflicting append");
    for amount in 5..=7 {
        repository.execute(&6, AccountCommand::Deposit(amount)).await.unwrap();
    }
    let snapshot = store.load_snapshot(&stream).await.unwrap().expect("the append wrote the snapshot");
    assert_eq!(snapshot.version, 7);
    let replayed = full_replay(&history(&store, 6).await[..8]);
    assert_eq!(snapshot.state, serde_json::to_value(&replayed).unwrap());
    assert_eq!(replayed.balance, 1 + 2 + 3 + 1000 + 4 + 5 + 6 + 7);
}

async fn rejected_commands_write_nothing<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    let repository = new_repository::<Account, _>(store.clone(), cached);
    repository.execute(&4, AccountCommand::Deposit(10)).await.unwrap();
    match repository.execute(&4, AccountCommand::Withdraw(11)).await {
        Err(CommandError::Rejected(e)) => {
            assert_eq!(e, AccountError::InsufficientFunds { balance: 10, requested: 11 })
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(history(&store, 4).await.len(), 1);
    let done = repository.execute(&4, AccountCommand::Withdraw(10)).await.unwrap();
    assert_eq!((done.state.balance, done.version), (0, Some(1)));
}

/// A store that lets another writer in just before the first `remaining` appends, forcing
/// conflicts. Its `save_snapshot` always fails: only a snapshot written by an append gets in.
#[derive(Clone)]
struct Racing<S> {
    inner: S,
    remaining: std::sync::Arc<AtomicU64>,
}

impl<S: EventStore> Racing<S> {
    async fn intrude(&self, stream: &StreamName) -> annal::Result<()> {
        if self.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            let intruder = AccountEvent::Deposited { amount: 1000 }.to_new_event()?;
            self.inner.append(stream, ExpectedVersion::Any, vec![intruder]).await?;
        }
        Ok(())
    }
}

#[annal::async_trait]
impl<S: EventStore> EventStore for Racing<S> {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> annal::Result<annal::AppendResult> {
        self.intrude(stream).await?;
        self.inner.append(stream, expected, events).await
    }
    async fn append_with_snapshot(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: &annal::Snapshot,
    ) -> annal::Result<annal::AppendResult> {
        self.intrude(stream).await?;
        self.inner.append_with_snapshot(stream, expected, events, snapshot).await
    }
    async fn save_snapshot(&self, _: &StreamName, _: &annal::Snapshot) -> annal::Result<()> {
        Err(annal::Error::InvalidArgument { reason: "a snapshot written apart from its events" })
    }
    async fn load_snapshot(&self, stream: &StreamName) -> annal::Result<Option<annal::Snapshot>> {
        self.inner.load_snapshot(stream).await
    }
    async fn read_stream_page(
        &self,
        stream: &StreamName,
        direction: annal::Direction,
        from: u64,
        limit: usize,
    ) -> annal::Result<Vec<RecordedEvent>> {
        self.inner.read_stream_page(stream, direction, from, limit).await
    }
    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> annal::Result<Page> {
        self.inner.read_all_page(from, filter, limit).await
    }
    async fn read_event(&self, id: uuid::Uuid) -> annal::Result<Option<RecordedEvent>> {
        self.inner.read_event(id).await
    }
    async fn head(&self) -> annal::Result<Position> {
        self.inner.head().await
    }
    fn wakeup(&self) -> Wakeup {
        self.inner.wakeup()
    }
}

async fn conflicts_are_retried_then_reported<S: EventStore + Clone + 'static>(store: S, cached: bool) {
    let racing = Racing { inner: store.clone(), remaining: std::sync::Arc::new(AtomicU64::new(2)) };
    // Two intruders, two retries: the third try lands, deciding on the state the intruders left.
    let repository = new_repository::<Account, _>(racing.clone(), cached).with_max_retries(2);
    let done = repository.execute(&5, AccountCommand::Deposit(100)).await.unwrap();
    assert_eq!((done.state.balance, done.version), (2100, Some(2)));
    // One intruder, no retries: the conflict comes back typed, and nothing of ours is written.
    racing.remaining.store(1, Ordering::SeqCst);
    let strict = new_repository::<Account, _>(racing, cached).with_max_retries(0);
    let err = strict.execute(&5, AccountCommand::Deposit(1)).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(matches!(err, CommandError::Store(annal::Error::Conflict { actual: Some(3), .. })), "{err:?}");
    let amounts: Vec<_> = history(&store, 5).await.iter().map(|e| e.data.clone()).collect();
    assert_eq!(amounts.len(), 4, "{amounts:?}");
}

/// An aggregate whose snapshot frequency the property test chooses per case.
static EVERY: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Tunable(Account);

impl Aggregate for Tunable {
    const CATEGORY: &'static str = "tunable";
    type Id = u64;
    type Event = AccountEvent;
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::every(EVERY.load(Ordering::SeqCst))
    }
    fn to_snapshot(&self) -> annal::Result<serde_json::Value> {
        Ok(serde_json::to_value(self).unwrap())
    }
    fn from_snapshot(snapshot: serde_json::Value) -> annal::Result<Self> {
        Ok(serde_json::from_value(snapshot).unwrap())
    }
}

impl Decide for Tunable {
    type Command = AccountCommand;
    type Error = AccountError;
    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        self.0.handle(command)
    }
    fn apply(&mut self, event: &AccountEvent) {
        self.0.apply(event);
    }
}

fn commands() -> impl Strategy<Value = Vec<AccountCommand>> {
    prop::collection::vec(
        prop_oneof![(1..100u64).prop_map(AccountCommand::Deposit), (1..150u64).prop_map(AccountCommand::Withdraw)],
        0..60,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Loading through any snapshot frequency gives the state a full replay gives.
    #[test]
    fn snapshot_plus_tail_equals_full_replay(commands in commands(), every in 1..8u64) {
        runtime().block_on(async {
            EVERY.store(every, Ordering::SeqCst);
            let store = annal::MemoryEventStore::new();
            let repository = Repository::<Tunable, _>::new(store.clone());
            for command in commands {
                let _ = repository.execute(&1, command).await;
            }
            let stream = Tunable::stream_name(&1).unwrap();
            let recorded: Vec<RecordedEvent> = store.read_stream(&stream, ReadStream::forwards()).try_collect().await.unwrap();
            let loaded = repository.load(&1).await.unwrap();
            prop_assert_eq!(&loaded.state.0, &full_replay(&recorded));
            prop_assert_eq!(loaded.version, recorded.last().map(|e| e.version));
            Ok(())
        })?;
    }

    /// Replaying in pages of any size, or in chunks folded one after another, equals replaying at once.
    #[test]
    fn replay_in_chunks_equals_replay_at_once(commands in commands(), page in 1..20usize) {
        runtime().block_on(async {
            let store = annal::MemoryEventStore::new();
            let repository = Repository::<Account, _>::new(store.clone());
            for command in commands {
                let _ = repository.execute(&1, command).await;
            }
            let stream = Account::stream_name(&1).unwrap();
            let paged: Vec<RecordedEvent> =
                store.read_stream(&stream, ReadStream::forwards().page_size(page)).try_collect().await.unwrap();
            let at_once = history(&store, 1).await;
            prop_assert_eq!(&paged, &at_once);
            let decoded: Vec<AccountEvent> = at_once.iter().map(|e| AccountEvent::from_recorded(e).unwrap()).collect();
            let mut chunked = Account::default();
            for chunk in decoded.chunks(page) {
                // Carry the state between chunks through its snapshot form, as a restart would.
                chunked = Account::from_snapshot(chunked.to_snapshot().unwrap()).unwrap();
                chunk.iter().for_each(|e| chunked.apply(e));
            }
            prop_assert_eq!(chunked, annal::replay::<Account>(&decoded));
            Ok(())
        })?;
    }
}

/// A snapshot row that cannot be read (damaged by hand, or written by a build with other
/// limits) costs a replay, never the load: `load` returns what the full replay gives, and so
/// does a command. `damage` spoils the stored snapshot.
async fn a_damaged_snapshot_row_costs_a_replay<S: EventStore + Clone + 'static>(
    store: S,
    damage: impl AsyncFnOnce(&S),
) {
    let repository = Repository::<Account, _>::new(store.clone());
    for i in 1..=6 {
        repository.execute(&5, AccountCommand::Deposit(i)).await.unwrap();
    }
    let stream = Account::stream_name(&5).unwrap();
    assert_eq!(store.load_snapshot(&stream).await.unwrap().map(|s| s.version), Some(3));
    damage(&store).await;
    assert!(matches!(store.load_snapshot(&stream).await, Err(annal::Error::Corrupt { .. })));
    let loaded = repository.load(&5).await.unwrap();
    assert_eq!(loaded.state, full_replay(&history(&store, 5).await));
    assert_eq!((loaded.state.balance, loaded.version), (21, Some(5)));
    let done = repository.execute(&5, AccountCommand::Withdraw(21)).await.unwrap();
    assert_eq!((done.state.balance, done.version), (0, Some(6)));
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_row_costs_a_replay_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = annal::SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
    a_damaged_snapshot_row_costs_a_replay(store, async |store: &annal::SqliteEventStore| {
        sqlx::query("UPDATE annal_snapshots SET state = '{\"balance\": '").execute(store.writer()).await.unwrap();
    })
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_row_costs_a_replay_on_postgres() {
    // `jsonb` holds only JSON, but deeper than any reader here accepts.
    a_damaged_snapshot_row_costs_a_replay(support::pg::fresh_store().await, async |store: &annal::PgEventStore| {
        sqlx::query("UPDATE annal_snapshots SET state = (repeat('[', 300) || repeat(']', 300))::jsonb")
            .execute(store.pool())
            .await
            .unwrap();
    })
    .await;
}
