//! The in-memory store: always available, for tests and examples.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use chrono::Utc;

use crate::append::{Written, first_version, resolve_written};
use crate::event::{DEFAULT_MAX_EVENT_SIZE, encode_batch, encode_snapshot};
use crate::store::check_limit;
use crate::subscription::{Notifier, Wakeup};
use crate::{
    AppendResult, Direction, EventStore, ExpectedVersion, Filter, NewEvent, Page, Position, RecordedEvent, Result,
    Snapshot, StreamName,
};

/// An event store in memory, with the same guarantees as the database backends (atomic
/// batches, optimistic concurrency, idempotent retries, one global order) but no durability.
///
/// Cloning is cheap; clones share the same events.
///
/// ```
/// use annal_eventstore::MemoryEventStore;
///
/// let store = MemoryEventStore::new().with_max_event_size(64 * 1024);
/// # let _ = store;
/// ```
#[derive(Clone, Debug)]
pub struct MemoryEventStore {
    inner: Arc<RwLock<Log>>,
    notifier: Notifier,
    max_event_size: usize,
}

#[derive(Debug, Default)]
struct Log {
    /// Every event; the one at index `i` has position `(0, i + 1)`.
    events: Vec<RecordedEvent>,
    /// Indexes into `events`, per stream, in version order.
    streams: HashMap<StreamName, Vec<usize>>,
    /// Index into `events` of every event id.
    ids: HashMap<uuid::Uuid, usize>,
    /// The latest snapshot of each stream.
    snapshots: HashMap<StreamName, Snapshot>,
}

impl MemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryEventStore { inner: Arc::default(), notifier: Notifier::new(), max_event_size: DEFAULT_MAX_EVENT_SIZE }
    }

    /// Sets the limit on one event's encoded size (default 1 MiB).
    pub fn with_max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes;
        self
    }

    // A panic while holding the lock cannot leave the log half-written (each append checks
    // everything before its first push), so a poisoned lock is safe to keep using.
    fn read(&self) -> RwLockReadGuard<'_, Log> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Log> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Stores `snapshot` unless the stream has one at a later version of the same schema.
fn keep_snapshot(log: &mut Log, stream: &StreamName, snapshot: Snapshot) {
    let newer = |old: &Snapshot| old.version < snapshot.version || old.schema_version != snapshot.schema_version;
    if log.snapshots.get(stream).is_none_or(newer) {
        log.snapshots.insert(stream.clone(), snapshot);
    }
}

fn position_of(index: usize) -> Position {
    Position::new(0, index as u64 + 1)
}

impl MemoryEventStore {
    fn append_now(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Option<Snapshot>,
    ) -> Result<AppendResult> {
        let encoded = encode_batch(events, self.max_event_size)?;
        let ids: Vec<_> = encoded.iter().map(|e| e.event.id).collect();
        let result = {
            let mut log = self.write();
            let written: Vec<Written> = ids
                .iter()
                .filter_map(|id| log.ids.get(id))
                .map(|&i| {
                    let e = &log.events[i];
                    Written { id: e.id, stream: e.stream.to_string(), version: e.version, position: e.position }
                })
                .collect();
            if let Some(original) = resolve_written(stream, expected, &ids, written)? {
                return Ok(original);
            }
            let current = log.streams.get(stream).and_then(|v| v.last()).map(|&i| log.events[i].version);
            let first = first_version(stream, expected, current)?;
            let recorded_at = Utc::now();
            let mut positions = Vec::with_capacity(encoded.len());
            for (offset, event) in encoded.into_iter().map(|e| e.event).enumerate() {
                let index = log.events.len();
                positions.push(position_of(index));
                log.ids.insert(event.id, index);
                log.streams.entry(stream.clone()).or_default().push(index);
                log.events.push(RecordedEvent {
                    id: event.id,
                    stream: stream.clone(),
                    version: first + offset as u64,
                    position: position_of(index),
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    data: event.data,
                    metadata: event.metadata,
                    recorded_at,
                });
            }
            if let Some(snapshot) = snapshot {
                keep_snapshot(&mut log, stream, snapshot);
            }
            AppendResult::new(first + positions.len() as u64 - 1, positions)
        };
        self.notifier.notify_up_to(result.position());
        Ok(result)
    }
}

#[async_trait]
impl EventStore for MemoryEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        crate::metrics::append("memory", stream, events.len(), async {
            self.append_now(stream, expected, events, None)
        })
        .await
    }

    async fn append_with_snapshot(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: &Snapshot,
    ) -> Result<AppendResult> {
        let (state, _) = crate::append::check_snapshot_with_append(expected, events.len(), snapshot)?;
        let snapshot = Snapshot::new(snapshot.version, snapshot.schema_version, state);
        crate::metrics::append("memory", stream, events.len(), async {
            self.append_now(stream, expected, events, Some(snapshot))
        })
        .await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        check_limit(limit)?;
        let log = self.read();
        let Some(indexes) = log.streams.get(stream) else { return Ok(Vec::new()) };
        // Versions are dense from 0, so a version is its index in the stream.
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        let picked: Box<dyn Iterator<Item = &usize>> = match direction {
            Direction::Forwards => Box::new(indexes.iter().skip(from)),
            Direction::Backwards => Box::new(indexes.iter().take(from.saturating_add(1)).rev()),
        };
        Ok(picked.take(limit).map(|&i| log.events[i].clone()).collect())
    }

    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> Result<Page> {
        check_limit(limit)?;
        let log = self.read();
        let start = usize::try_from(from.flat_sequence()).unwrap_or(usize::MAX).min(log.events.len());
        let mut events = Vec::new();
        let mut next = from;
        for event in &log.events[start..] {
            if events.len() == limit {
                break;
            }
            next = event.position;
            if filter.matches(event) {
                events.push(event.clone());
            }
        }
        Ok(Page::new(events, next))
    }

    async fn read_event(&self, id: uuid::Uuid) -> Result<Option<RecordedEvent>> {
        let log = self.read();
        Ok(log.ids.get(&id).map(|&i| log.events[i].clone()))
    }

    async fn head(&self) -> Result<Position> {
        Ok(self.read().events.len().checked_sub(1).map_or(Position::START, position_of))
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>> {
        Ok(self.read().snapshots.get(stream).cloned())
    }

    async fn save_snapshot(&self, stream: &StreamName, snapshot: &Snapshot) -> Result<()> {
        let (state, _) = encode_snapshot(snapshot)?;
        keep_snapshot(&mut self.write(), stream, Snapshot::new(snapshot.version, snapshot.schema_version, state));
        Ok(())
    }

    fn wakeup(&self) -> Wakeup {
        self.notifier.subscribe()
    }
}
