//! The repository: load an aggregate, decide, append with optimistic concurrency, retry on
//! conflict.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use hashlink::LruCache;

use futures::TryStreamExt;
use tracing::Instrument;
use uuid::Uuid;

use super::{Aggregate, Decide, Event, Snapshot};
use crate::{
    DEFAULT_PAGE_SIZE as PAGE, Error, EventStore, ExpectedVersion, Metadata, NewEvent, Position, ReadStream, Result,
    StreamName,
};

/// An aggregate as loaded: its state and the stream version it reflects.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The version of the last event applied (`None`: the aggregate has no events yet).
    pub version: Option<u64>,
}

/// An event a command caused, as committed.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Committed<E> {
    /// The event.
    pub event: E,
    /// Its id in the store.
    pub id: Uuid,
    /// Its version in the aggregate's stream.
    pub version: u64,
    /// Its place in the global order: wait for a projection to pass it to read your writes.
    pub position: Position,
}

/// The outcome of a command that was accepted.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Executed<A: Aggregate> {
    /// The state after the command's events.
    pub state: A,
    /// The stream version after the command (`None` if the aggregate still has no events).
    pub version: Option<u64>,
    /// The events written, in order (empty if the command decided nothing should happen).
    pub events: Vec<Committed<A::Event>>,
    /// How many times the command was decided: 1, plus one per conflict retried.
    pub attempts: usize,
    /// `true` when [`Repository::execute_once`] found the command already executed: nothing new
    /// was written, and `events` are the ones written then.
    pub repeated: bool,
}

impl<A: Aggregate> Executed<A> {
    /// The position of the last event written, if any.
    pub fn position(&self) -> Option<Position> {
        self.events.last().map(|e| e.position)
    }
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E> {
    /// The aggregate refused the command: the domain's error.
    #[error(transparent)]
    Rejected(E),
    /// The store failed, or conflicts outlasted the retries.
    #[error(transparent)]
    Store(#[from] Error),
}

impl<E> CommandError<E> {
    /// `true` when concurrent writers won every retry (an [`Error::Conflict`]).
    pub fn is_conflict(&self) -> bool {
        matches!(self, CommandError::Store(e) if e.is_conflict())
    }
}

/// Loads aggregates from an event store, runs commands against them and appends the events
/// they decide, with optimistic concurrency.
///
/// A command runs on the freshly loaded state and its events are appended with
/// `ExpectedVersion::Exact` (or `NoStream`); if another writer got there first, the repository
/// reloads and decides again, up to [`with_max_retries`](Repository::with_max_retries) times
/// (default 3), before returning the conflict. No update is ever lost. Between retries it waits
/// a short, random, growing pause (up to 1, 2, 4, ... ms, at most 50 ms), so that writers racing
/// for one busy stream take turns instead of the last winner winning again.
///
/// [`with_cache`](Repository::with_cache) keeps recently used aggregates in memory so that a
/// command skips the load; the expected version still guards every append, so a stale copy
/// costs a reload, never a wrong decision.
///
/// ```
/// # use annal_eventstore::*;
/// # #[derive(Debug, Clone, PartialEq)] enum CounterEvent { Added(u64) }
/// # impl Event for CounterEvent {
/// #     const EVENT_TYPES: &'static [&'static str] = &["Added"];
/// #     fn event_type(&self) -> &'static str { "Added" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn to_data(&self) -> Result<serde_json::Value> { let CounterEvent::Added(n) = self; Ok((*n).into()) }
/// #     fn from_stored(_: &str, _: u32, data: serde_json::Value) -> Result<Self> {
/// #         Ok(CounterEvent::Added(data.as_u64().unwrap_or_default()))
/// #     }
/// # }
/// # #[derive(Debug, thiserror::Error)] #[error("too big")] struct TooBig;
/// #[derive(Default, Debug)]
/// struct Counter { total: u64 }
/// # impl Aggregate for Counter { const CATEGORY: &'static str = "counter"; type Id = u32; type Event = CounterEvent; }
///
/// impl Decide for Counter {
///     type Command = u64;
///     type Error = TooBig;
///     fn handle(&self, add: u64) -> std::result::Result<Vec<CounterEvent>, TooBig> {
///         if self.total + add > 100 { return Err(TooBig) }
///         Ok(vec![CounterEvent::Added(add)])
///     }
///     fn apply(&mut self, CounterEvent::Added(n): &CounterEvent) {
///         self.total += n;
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
/// let counters = Repository::<Counter, _>::new(MemoryEventStore::new());
/// counters.execute(&7, 60).await?;
/// let done = counters.execute(&7, 30).await?;
/// assert_eq!((done.state.total, done.version), (90, Some(1)));
/// assert!(matches!(counters.execute(&7, 30).await, Err(CommandError::Rejected(TooBig))));
/// # Ok(())
/// # }
/// ```
pub struct Repository<A, S> {
    store: S,
    max_retries: usize,
    cache: Option<Arc<Cache<A>>>,
    _aggregate: PhantomData<fn() -> A>,
}

/// Recently used aggregates, by stream: state and version as of the last command this
/// repository (or a clone) committed on them. Only a shortcut: an entry is used to decide, and
/// the append's expected version checks it; see [`Repository::with_cache`].
struct Cache<A> {
    entries: Mutex<LruCache<String, (A, Option<u64>)>>,
    /// `A::clone`, captured where `A: Clone` is known, so that the repository's other methods
    /// need no such bound.
    duplicate: fn(&A) -> A,
}

impl<A> Cache<A> {
    fn get(&self, stream: &StreamName) -> Option<(A, Option<u64>)> {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(stream.as_str()).map(|(state, version)| ((self.duplicate)(state), *version))
    }

    /// Keeps `state` at `version` unless a newer version is cached already (a concurrent
    /// command on the same aggregate committed after this one).
    fn put(&self, stream: &StreamName, state: &A, version: Option<u64>) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.peek(stream.as_str()).is_some_and(|(_, cached)| *cached > version) {
            return;
        }
        entries.insert(stream.as_str().to_owned(), ((self.duplicate)(state), version));
    }

    fn evict(&self, stream: &StreamName) {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(stream.as_str());
    }
}

// Written by hand: derived impls would needlessly require `A: Clone` / `A: Debug`.
impl<A, S: Clone> Clone for Repository<A, S> {
    fn clone(&self) -> Self {
        Repository {
            store: self.store.clone(),
            max_retries: self.max_retries,
            cache: self.cache.clone(),
            _aggregate: PhantomData,
        }
    }
}

impl<A, S: std::fmt::Debug> std::fmt::Debug for Repository<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &std::any::type_name::<A>())
            .field("store", &self.store)
            .field("max_retries", &self.max_retries)
            .field("cache", &self.cache.as_ref().map(|c| c.entries.lock().map_or(0, |e| e.capacity())))
            .finish()
    }
}

/// The id of event `index` of command `command_id` on `stream`: a UUIDv5 in the command id's
/// namespace of the stream name and the index, so that the key is scoped to the aggregate.
/// The state a snapshot holds and its version, or `None` (logged) for one that does not decode:
/// a snapshot is only a shortcut, so the stream is then replayed from the start.
fn restore<A: Decide>(stream: &StreamName, snapshot: Snapshot) -> Option<(A, u64)> {
    match A::from_snapshot(snapshot.state) {
        Ok(state) => Some((state, snapshot.version)),
        Err(error) => {
            tracing::warn!(%stream, %error, "ignoring a snapshot that does not decode");
            None
        }
    }
}

fn command_event_id(command_id: Uuid, stream: &StreamName, index: usize) -> Uuid {
    // Stream names hold no control characters, so the NUL keeps name and index apart.
    let mut name = Vec::with_capacity(stream.as_str().len() + 9);
    name.extend_from_slice(stream.as_str().as_bytes());
    name.push(0);
    name.extend_from_slice(&(index as u64).to_be_bytes());
    Uuid::new_v5(&command_id, &name)
}

/// A random pause before retry number `retry` (from 1): up to 2^(retry-1) ms, at most 50 ms.
fn retry_pause(retry: usize) -> std::time::Duration {
    let ceiling_micros = (1_000u64 << retry.saturating_sub(1).min(6)).min(50_000);
    // A version-4 UUID is 122 random bits: enough randomness without another dependency.
    let random = (Uuid::new_v4().as_u128() as u64) % ceiling_micros.max(1);
    std::time::Duration::from_micros(random)
}

impl<A: Decide + Clone, S: EventStore> Repository<A, S> {
    /// Keeps the state and version of up to `capacity` recently used aggregates in memory
    /// (shared by this repository's clones), so that a command on one of them skips the load:
    /// no snapshot read, no replay, one round trip (the append) instead of two or three.
    ///
    /// The cache is only a shortcut; correctness never depends on it. A command decided on a
    /// cached state is appended with that state's version as the expected version, so if
    /// another process (or another repository) wrote to the stream since, the append conflicts:
    /// the entry is evicted and the command is decided again on a fresh load, without counting
    /// as a retry. A command that a cached state refuses, or that decides nothing, is decided
    /// again on a fresh load too, so a stale entry never refuses a command the stored state
    /// would accept. `capacity` 0 turns the cache off. See `docs/aggregates.md` for when to
    /// leave it off.
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0)
            .then(|| Arc::new(Cache { entries: Mutex::new(LruCache::new(capacity)), duplicate: <A as Clone>::clone }));
        self
    }
}

impl<A: Decide, S: EventStore> Repository<A, S> {
    /// A repository of `A` aggregates in `store`.
    pub fn new(store: S) -> Self {
        Repository { store, max_retries: 3, cache: None, _aggregate: PhantomData }
    }

    /// How many times a command is decided again after a conflict (default 3).
    pub fn with_max_retries(mut self, retries: usize) -> Self {
        self.max_retries = retries;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Loads the aggregate: the latest usable snapshot, then the events after it.
    ///
    /// # Errors
    /// [`Error::InvalidStreamName`] for an id that makes no valid stream name,
    /// [`Error::Decode`] for a stored event the event type cannot read, store errors.
    pub async fn load(&self, id: &A::Id) -> Result<Loaded<A>> {
        self.load_stream(&A::stream_name(id)?).await
    }

    async fn load_stream(&self, stream: &StreamName) -> Result<Loaded<A>> {
        let Some(schema_version) = A::snapshot_policy().schema_version() else {
            return self.replay(stream, A::default(), None).await;
        };
        // The snapshot and the first page after it in one read; anything damaged is read
        // apart, so that a bad snapshot is skipped and a bad event reported as a replay does.
        let (snapshot, events) = match self.store.load_snapshot_and_events(stream, schema_version, PAGE).await {
            Ok(read) => read,
            Err(Error::Corrupt { .. } | Error::Decode { .. } | Error::Unreadable(_)) => {
                return self.load_apart(stream, schema_version).await;
            }
            Err(error) => return Err(error),
        };
        let (mut state, mut version) = (A::default(), None);
        if let Some(snapshot) = snapshot {
            let Some(restored) = restore::<A>(stream, snapshot) else {
                return self.replay(stream, A::default(), None).await;
            };
            (state, version) = (restored.0, Some(restored.1));
        }
        let more = events.len() == PAGE;
        for recorded in &events {
            state.apply(&A::Event::from_recorded(recorded)?);
            version = Some(recorded.version);
        }
        if more { self.replay(stream, state, version).await } else { Ok(Loaded { state, version }) }
    }

    /// [`load_stream`](Self::load_stream) in two reads: the snapshot, if it can be read (a
    /// snapshot is only a shortcut, so one that is damaged is logged and the stream is
    /// replayed from the start instead), then the events after it.
    async fn load_apart(&self, stream: &StreamName, schema_version: u32) -> Result<Loaded<A>> {
        let snapshot = match self.store.load_snapshot(stream).await {
            Err(error @ (Error::Corrupt { .. } | Error::Decode { .. })) => {
                tracing::warn!(%stream, %error, "ignoring a stored snapshot that cannot be read");
                None
            }
            loaded => loaded?,
        };
        match snapshot.filter(|s| s.schema_version == schema_version).and_then(|s| restore::<A>(stream, s)) {
            Some((state, version)) => self.replay(stream, state, Some(version)).await,
            None => self.replay(stream, A::default(), None).await,
        }
    }

    /// Applies the events after `version` to `state`.
    async fn replay(&self, stream: &StreamName, mut state: A, mut version: Option<u64>) -> Result<Loaded<A>> {
        let from = version.map_or(0, |v| v + 1);
        let mut events = self.store.read_stream(stream, ReadStream::forwards().from_version(from));
        while let Some(recorded) = events.try_next().await? {
            state.apply(&A::Event::from_recorded(&recorded)?);
            version = Some(recorded.version);
        }
        Ok(Loaded { state, version })
    }

    /// Runs `command` against the aggregate and appends the events it decides.
    ///
    /// # Errors
    /// [`CommandError::Rejected`] with the aggregate's reason; [`CommandError::Store`] for store
    /// errors and for conflicts that outlast the retries.
    pub async fn execute(&self, id: &A::Id, command: A::Command) -> Result<Executed<A>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        self.execute_with(id, command, Metadata::default()).await
    }

    /// [`Repository::execute`], with `metadata` (correlation id, causation id, your own fields)
    /// written on every event the command causes.
    ///
    /// # Errors
    /// As [`Repository::execute`].
    pub async fn execute_with(
        &self,
        id: &A::Id,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        self.run(id, command, metadata, None).await
    }

    /// [`Repository::execute_with`], safe to repeat: an idempotent command.
    ///
    /// The events' ids derive from `command_id` and the aggregate's stream (UUIDv5), so the key
    /// is scoped to the aggregate: the same command id sent to two aggregates is two commands.
    /// When a first call committed but its caller never heard (a lost reply, a crash), calling
    /// again with the same `command_id` decides nothing and writes nothing: it returns
    /// `repeated: true` with the events written the first time, whatever the aggregate did
    /// since (`state` and `version` are then the aggregate's current ones). Of concurrent calls
    /// with one id, one writes and reports `repeated: false`; the others report `repeated: true`
    /// with the same events.
    ///
    /// A command that was rejected, or decided that nothing should happen, leaves no trace: a
    /// repeat decides it again.
    ///
    /// # Errors
    /// As [`Repository::execute`].
    pub async fn execute_once(
        &self,
        id: &A::Id,
        command_id: Uuid,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        self.run(id, command, metadata, Some(command_id)).await
    }

    /// [`Repository::attempts`] inside an `annal.command` span showing the command's
    /// correlation and causation ids: the appends run in it, so with the `opentelemetry` feature
    /// the events keep its trace context (see [`TraceParent`](crate::TraceParent)).
    async fn run(
        &self,
        id: &A::Id,
        command: A::Command,
        metadata: Metadata,
        command_id: Option<Uuid>,
    ) -> Result<Executed<A>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let span = tracing::info_span!(
            "annal.command",
            aggregate = std::any::type_name::<A>(),
            correlation_id = metadata.correlation_id.map(tracing::field::display),
            causation_id = metadata.causation_id.map(tracing::field::display),
            command_id = command_id.map(tracing::field::display),
        );
        self.attempts(id, command, metadata, command_id).instrument(span).await
    }

    async fn attempts(
        &self,
        id: &A::Id,
        command: A::Command,
        metadata: Metadata,
        command_id: Option<Uuid>,
    ) -> Result<Executed<A>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let stream = A::stream_name(id)?;
        let mut retries = 0;
        // Whether the next attempt may decide on a cached state: until the cache has been
        // proven wrong once in this call.
        let mut trust_cache = true;
        loop {
            let cached = self.cache.as_ref().filter(|_| trust_cache).and_then(|cache| cache.get(&stream));
            let from_cache = cached.is_some();
            let Loaded { mut state, version } = match cached {
                Some((state, version)) => Loaded { state, version },
                None => self.load_stream(&stream).await?,
            };
            let repeated =
                |state, version, events| Executed { state, version, events, attempts: retries + 1, repeated: true };
            if let Some(command_id) = command_id
                && let Some(events) = self.executed_before(&stream, command_id).await?
            {
                self.evict(&stream);
                return Ok(repeated(state, version, events));
            }
            let events = match state.handle(command.clone()) {
                Ok(events) if !events.is_empty() => events,
                // A refusal or a no-op is only final on the stored state: a cached one may be
                // stale, and nothing would be appended to find out.
                _ if from_cache => {
                    self.evict(&stream);
                    trust_cache = false;
                    continue;
                }
                Ok(_) => {
                    return Ok(Executed { state, version, events: Vec::new(), attempts: retries + 1, repeated: false });
                }
                Err(rejected) => return Err(CommandError::Rejected(rejected)),
            };
            let new = events
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let event = e.to_new_event()?.with_metadata(metadata.clone());
                    Ok(match command_id {
                        Some(command_id) => event.with_id(command_event_id(command_id, &stream, i)),
                        None => event,
                    })
                })
                .collect::<Result<Vec<NewEvent>>>()?;
            let ids: Vec<Uuid> = new.iter().map(|e| e.id).collect();
            // The state the events lead to (dropped if the append fails: the next attempt
            // loads or decides again), and the snapshot of it if one is due, which the append
            // writes in the same commit.
            events.iter().for_each(|e| state.apply(e));
            let after = version.map_or(0, |v| v + 1) + events.len() as u64 - 1;
            let expected = ExpectedVersion::from_current(version);
            let appended = match self.snapshot_if_due(&stream, &state, version, after) {
                Some(snapshot) => self.store.append_with_snapshot(&stream, expected, new, &snapshot).await,
                None => self.store.append(&stream, expected, new).await,
            };
            if let Some(command_id) = command_id
                && matches!(&appended, Ok(w) if w.already_written)
                    | matches!(&appended, Err(Error::DuplicateEvents { .. }))
            {
                // A concurrent call with this command id wrote first: report what it wrote.
                self.evict(&stream);
                if let Some(events) = self.executed_before(&stream, command_id).await? {
                    let Loaded { state, version } = self.load_stream(&stream).await?;
                    return Ok(repeated(state, version, events));
                }
                if let Err(error) = appended {
                    return Err(error.into());
                }
            }
            match appended {
                Ok(written) => {
                    if let Some(cache) = &self.cache {
                        cache.put(&stream, &state, Some(written.version));
                    }
                    let first = version.map_or(0, |v| v + 1);
                    let committed = events
                        .into_iter()
                        .zip(ids)
                        .zip(written.positions)
                        .enumerate()
                        .map(|(i, ((event, id), position))| Committed {
                            event,
                            id,
                            version: first + i as u64,
                            position,
                        })
                        .collect();
                    return Ok(Executed {
                        state,
                        version: Some(written.version),
                        events: committed,
                        attempts: retries + 1,
                        repeated: false,
                    });
                }
                // Someone else wrote since the cached state: decide again on the stored one.
                Err(error) if error.is_conflict() && from_cache => {
                    self.evict(&stream);
                    trust_cache = false;
                    tracing::debug!(%stream, "stale cached aggregate; reloading and deciding again");
                }
                Err(error) if error.is_conflict() && retries < self.max_retries => {
                    self.evict(&stream);
                    retries += 1;
                    tracing::debug!(%stream, retries, "conflict; reloading and deciding again");
                    tokio::time::sleep(retry_pause(retries)).await;
                }
                Err(error) => {
                    self.evict(&stream);
                    return Err(error.into());
                }
            }
        }
    }

    fn evict(&self, stream: &StreamName) {
        if let Some(cache) = &self.cache {
            cache.evict(stream);
        }
    }

    /// The events an earlier execution of command `command_id` wrote to `stream`, if there was
    /// one: one batch, found by the id of its first event, then read forwards while the ids
    /// follow.
    async fn executed_before(&self, stream: &StreamName, command_id: Uuid) -> Result<Option<Vec<Committed<A::Event>>>> {
        let Some(first) = self.store.read_event(command_event_id(command_id, stream, 0)).await? else {
            return Ok(None);
        };
        let mut committed = Vec::new();
        let mut events = self.store.read_stream(stream, ReadStream::forwards().from_version(first.version));
        while let Some(recorded) = events.try_next().await? {
            if recorded.id != command_event_id(command_id, stream, committed.len()) {
                break;
            }
            committed.push(Committed {
                event: A::Event::from_recorded(&recorded)?,
                id: recorded.id,
                version: recorded.version,
                position: recorded.position,
            });
        }
        Ok(Some(committed))
    }

    /// The snapshot of `state` at `after` when the policy says one is due and it can be
    /// stored. A snapshot that cannot be only costs a slower load later, so the problem is
    /// logged and the command appends without it.
    fn snapshot_if_due(&self, stream: &StreamName, state: &A, before: Option<u64>, after: u64) -> Option<Snapshot> {
        let policy = A::snapshot_policy();
        let (Some(schema_version), true) = (policy.schema_version(), policy.due(before, after)) else { return None };
        let snapshot = state.to_snapshot().map(|payload| Snapshot::new(after, schema_version, payload));
        match snapshot.and_then(|snapshot| crate::event::encode_snapshot(&snapshot).map(|_| snapshot)) {
            Ok(snapshot) => Some(snapshot),
            Err(error) => {
                tracing::warn!(%stream, version = after, %error, "could not take a snapshot");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> Cache<u64> {
        Cache { entries: Mutex::new(LruCache::new(capacity)), duplicate: |n| *n }
    }

    fn stream(n: u32) -> StreamName {
        StreamName::from_parts("counter", n).unwrap()
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity_and_drops_the_least_recently_used() {
        let cache = cache(2);
        cache.put(&stream(1), &10, Some(0));
        cache.put(&stream(2), &20, Some(0));
        assert_eq!(cache.get(&stream(1)), Some((10, Some(0))));
        // 1 was used last, so 2 makes room for 3.
        cache.put(&stream(3), &30, Some(0));
        assert_eq!(cache.get(&stream(2)), None);
        assert_eq!(cache.get(&stream(1)), Some((10, Some(0))));
        assert_eq!(cache.get(&stream(3)), Some((30, Some(0))));
        cache.evict(&stream(3));
        assert_eq!(cache.get(&stream(3)), None);
    }

    #[test]
    fn a_late_put_never_replaces_a_newer_version() {
        let cache = cache(4);
        cache.put(&stream(1), &12, Some(5));
        cache.put(&stream(1), &11, Some(4));
        assert_eq!(cache.get(&stream(1)), Some((12, Some(5))));
        cache.put(&stream(1), &13, Some(6));
        assert_eq!(cache.get(&stream(1)), Some((13, Some(6))));
    }
}
