//! Checkpoints and dead letters in memory, for tests beside `MemoryEventStore`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use annal_eventstore::{Position, RecordedEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::projection::Tx;
use crate::rebuilds::{RebuildMode, RebuildOutcome, RebuildProgress, RebuildUpdate};
use crate::store::{Applied, Checkpoint, Control, DeadLetter, DedupStore, Fence, Lease, Park, Pause, ProjectionStore};
use crate::{Projection, Result};

/// Checkpoints and dead letters in memory. Without transactions, [`ProjectionStore::apply`]
/// runs the handler and then moves the checkpoint, so exactly-once holds only while the process
/// lives, which is what tests of in-memory read models need.
#[derive(Clone, Debug, Default)]
pub struct MemoryProjectionStore {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    checkpoints: HashMap<(String, u32), Checkpoint>,
    dead_letters: Vec<DeadLetter>,
    next_id: i64,
    leases: HashMap<(String, u32), Lease>,
    runners: HashMap<(String, String), DateTime<Utc>>,
    dedup: HashMap<(String, uuid::Uuid), DateTime<Utc>>,
    partition_counts: HashMap<String, u32>,
    controls: HashMap<String, Control>,
    rebuilds: HashMap<String, RebuildProgress>,
}

impl MemoryProjectionStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn bump_epoch(&mut self, projection: &str) {
        self.controls.entry(projection.to_owned()).or_default().epoch += 1;
    }

    /// Whether `fence` holds the partition's lease, or there is no fence.
    fn holds(&self, projection: &str, partition: u32, fence: Option<&Fence>) -> bool {
        fence.is_none_or(|fence| {
            self.leases
                .get(&(projection.to_owned(), partition))
                .is_some_and(|l| l.owner == fence.owner && l.token == fence.token)
        })
    }

    /// Whether the projection is not paused for a runner other than `fence`'s (as the SQL
    /// stores' `ADVANCE` checks).
    fn unpaused_for(&self, projection: &str, fence: Option<&Fence>) -> bool {
        fence.is_none_or(|fence| self.controls.get(projection).is_none_or(|c| c.runnable_by(&fence.owner)))
    }

    fn advance(
        &mut self,
        projection: &str,
        partition: u32,
        from: Position,
        to: Position,
        last: Option<DateTime<Utc>>,
        fence: Option<&Fence>,
    ) -> bool {
        if !self.holds(projection, partition, fence) {
            return false;
        }
        let key = (projection.to_owned(), partition);
        let current = self.checkpoints.get(&key).map_or(Position::START, |c| c.position);
        if current != from {
            return false;
        }
        let previous = self.checkpoints.get(&key).and_then(|c| c.last_recorded_at);
        let latency_p99 = self.checkpoints.get(&key).and_then(|c| c.latency_p99);
        self.checkpoints.insert(
            key,
            Checkpoint { position: to, updated_at: Utc::now(), last_recorded_at: last.or(previous), latency_p99 },
        );
        true
    }
}

#[async_trait]
impl ProjectionStore for MemoryProjectionStore {
    async fn checkpoint(&self, projection: &str, partition: u32) -> Result<Option<Checkpoint>> {
        Ok(self.state().checkpoints.get(&(projection.to_owned(), partition)).cloned())
    }

    async fn advance(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        to: Position,
        last_recorded_at: Option<DateTime<Utc>>,
        fence: Option<&Fence>,
    ) -> Result<bool> {
        let mut state = self.state();
        Ok(state.unpaused_for(projection, fence)
            && state.advance(projection, partition, from, to, last_recorded_at, fence))
    }

    async fn apply(
        &self,
        projection: &dyn Projection,
        partition: u32,
        from: Position,
        to: Position,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Applied> {
        let current = self.checkpoint(projection.name(), partition).await?.map_or(Position::START, |c| c.position);
        // The pause is checked before the handler only: its effects here cannot be rolled back,
        // so once they are made the checkpoint must follow (the lease still fences it).
        let (allowed, blocked) = {
            let state = self.state();
            (
                state.holds(projection.name(), partition, fence) && state.unpaused_for(projection.name(), fence),
                state.dead_letters.iter().any(|d| {
                    d.projection == projection.name()
                        && d.partition == partition
                        && events.iter().any(|e| e.stream == d.stream)
                }),
            )
        };
        if current != from || !allowed {
            return Ok(Applied::Moved);
        }
        if blocked {
            return Ok(Applied::Blocked);
        }
        if let Err(error) = crate::projection::run_handler(projection, events, &mut Tx::none()).await {
            return Ok(Applied::Failed(error));
        }
        let last = events.last().map(|e| e.recorded_at);
        Ok(if self.state().advance(projection.name(), partition, from, to, last, fence) {
            Applied::Committed
        } else {
            Applied::Moved
        })
    }

    async fn park(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        park: Park<'_>,
        fence: Option<&Fence>,
    ) -> Result<bool> {
        let mut state = self.state();
        if !state.unpaused_for(projection, fence)
            || !state.advance(projection, partition, from, park.event.position, None, fence)
        {
            return Ok(false);
        }
        state.next_id += 1;
        let id = state.next_id;
        let event = park.event;
        state.dead_letters.push(DeadLetter {
            id,
            projection: projection.to_owned(),
            partition,
            event_id: event.id,
            stream: event.stream.clone(),
            version: event.version,
            position: event.position,
            error: park.error.to_owned(),
            attempts: park.attempts,
            parked_at: Utc::now(),
        });
        Ok(true)
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>> {
        Ok(self.state().dead_letters.iter().filter(|d| d.projection == projection).cloned().collect())
    }

    async fn apply_dead_letter(&self, projection: &dyn Projection, id: i64, event: &RecordedEvent) -> Result<Applied> {
        let present = self.state().dead_letters.iter().any(|d| d.id == id && d.projection == projection.name());
        if !present {
            return Ok(Applied::Moved);
        }
        if let Err(error) =
            crate::projection::run_handler(projection, std::slice::from_ref(event), &mut Tx::none()).await
        {
            return Ok(Applied::Failed(error));
        }
        Ok(if self.remove_dead_letter(projection.name(), id).await? { Applied::Committed } else { Applied::Moved })
    }

    async fn remove_dead_letter(&self, projection: &str, id: i64) -> Result<bool> {
        let mut state = self.state();
        let before = state.dead_letters.len();
        state.dead_letters.retain(|d| !(d.id == id && d.projection == projection));
        Ok(state.dead_letters.len() < before)
    }

    async fn record_latency(&self, projection: &str, partition: u32, p99: Duration) -> Result<()> {
        if let Some(checkpoint) = self.state().checkpoints.get_mut(&(projection.to_owned(), partition)) {
            checkpoint.latency_p99 = Some(p99);
        }
        Ok(())
    }

    async fn acquire_lease(
        &self,
        projection: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>> {
        let mut state = self.state();
        if !state.controls.get(projection).is_none_or(|c| c.runnable_by(owner)) {
            return Ok(None);
        }
        let now = Utc::now();
        let key = (projection.to_owned(), partition);
        let token = match state.leases.get(&key) {
            Some(lease) if lease.owner != owner && lease.expires_at >= now => return Ok(None),
            Some(lease) => lease.token + 1,
            None => 1,
        };
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        state.leases.insert(key, Lease { partition, owner: owner.to_owned(), token, expires_at });
        Ok(Some(Fence { owner: owner.to_owned(), token, lease: ttl }))
    }

    async fn renew_lease(&self, projection: &str, partition: u32, fence: &Fence, ttl: Duration) -> Result<bool> {
        let mut state = self.state();
        match state.leases.get_mut(&(projection.to_owned(), partition)) {
            Some(lease) if lease.owner == fence.owner && lease.token == fence.token => {
                lease.expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lease(&self, projection: &str, partition: u32, fence: &Fence) -> Result<()> {
        let mut state = self.state();
        if let Some(lease) = state.leases.get_mut(&(projection.to_owned(), partition))
            && lease.owner == fence.owner
            && lease.token == fence.token
        {
            lease.expires_at = DateTime::<Utc>::MIN_UTC;
        }
        Ok(())
    }

    async fn leases(&self, projection: &str) -> Result<Vec<Lease>> {
        let state = self.state();
        let mut leases: Vec<Lease> =
            state.leases.iter().filter(|((p, _), _)| p == projection).map(|(_, l)| l.clone()).collect();
        leases.sort_by_key(|l| l.partition);
        Ok(leases)
    }

    async fn register_runner(&self, projection: &str, owner: &str, ttl: Duration) -> Result<usize> {
        let mut state = self.state();
        let now = Utc::now();
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        state.runners.insert((projection.to_owned(), owner.to_owned()), expires);
        state.runners.retain(|_, expires| *expires >= now);
        Ok(state.runners.keys().filter(|(p, _)| p == projection).count())
    }

    async fn deregister_runner(&self, projection: &str, owner: &str) -> Result<()> {
        self.state().runners.remove(&(projection.to_owned(), owner.to_owned()));
        Ok(())
    }

    async fn claim_partitions(&self, projection: &str, partitions: u32) -> Result<()> {
        let mut state = self.state();
        let implied = state.checkpoints.keys().filter(|(name, _)| name == projection).map(|(_, p)| p + 1).max();
        let stored = state.partition_counts.get(projection).copied().or(implied);
        if let Some(stored) = stored.filter(|stored| *stored != partitions) {
            return Err(crate::Error::PartitionsChanged {
                projection: projection.to_owned(),
                stored,
                configured: partitions,
            });
        }
        state.partition_counts.insert(projection.to_owned(), partitions);
        Ok(())
    }

    async fn reset(&self, projection: &str) -> Result<()> {
        let mut state = self.state();
        state.partition_counts.remove(projection);
        state.checkpoints.retain(|(name, _), _| name != projection);
        state.dead_letters.retain(|d| d.projection != projection);
        state.bump_epoch(projection);
        Ok(())
    }

    async fn control(&self, projection: &str) -> Result<Control> {
        Ok(self.state().controls.get(projection).cloned().unwrap_or_default())
    }

    async fn pause(&self, projection: &str, pause: &Pause) -> Result<()> {
        self.state().controls.entry(projection.to_owned()).or_default().paused = Some(pause.clone());
        Ok(())
    }

    async fn resume(&self, projection: &str) -> Result<bool> {
        Ok(self.state().controls.get_mut(projection).and_then(|c| c.paused.take()).is_some())
    }

    async fn move_checkpoints(&self, projection: &str, partitions: u32, to: Position) -> Result<()> {
        let mut state = self.state();
        for partition in 0..partitions.max(1) {
            let key = (projection.to_owned(), partition);
            let previous = state.checkpoints.get(&key).cloned();
            state.checkpoints.insert(
                key,
                Checkpoint {
                    position: to,
                    updated_at: Utc::now(),
                    last_recorded_at: previous.as_ref().and_then(|c| c.last_recorded_at),
                    latency_p99: previous.and_then(|c| c.latency_p99),
                },
            );
        }
        state.dead_letters.retain(|d| d.projection != projection || d.position <= to);
        state.bump_epoch(projection);
        Ok(())
    }

    async fn promote(&self, shadow: &str, live: &str, statements: &[String]) -> Result<()> {
        if !statements.is_empty() {
            return Err(crate::Error::Unsupported("the in-memory projection store runs no SQL statements"));
        }
        let mut state = self.state();
        state.partition_counts.remove(live);
        if let Some(count) = state.partition_counts.remove(shadow) {
            state.partition_counts.insert(live.to_owned(), count);
        }
        state.checkpoints.retain(|(name, _), _| name != live);
        let promoted: Vec<_> = state.checkpoints.keys().filter(|(name, _)| name == shadow).cloned().collect();
        for key in promoted {
            if let Some(checkpoint) = state.checkpoints.remove(&key) {
                state.checkpoints.insert((live.to_owned(), key.1), checkpoint);
            }
        }
        state.dead_letters.retain(|d| d.projection != live);
        for dead in state.dead_letters.iter_mut().filter(|d| d.projection == shadow) {
            live.clone_into(&mut dead.projection);
        }
        state.leases.retain(|(name, _), _| name != shadow);
        state.bump_epoch(live);
        Ok(())
    }

    async fn start_rebuild(
        &self,
        projection: &str,
        owner: &str,
        mode: RebuildMode,
        stale_after: Duration,
    ) -> Result<()> {
        let now = Utc::now();
        let record = RebuildProgress {
            projection: projection.to_owned(),
            owner: owner.to_owned(),
            mode,
            started_at: now,
            updated_at: now,
            update: RebuildUpdate { total: 0, done: 0, rate: 0.0, eta: None, outcome: RebuildOutcome::Running },
            stale_after,
            age: Duration::ZERO,
        };
        self.state().rebuilds.insert(projection.to_owned(), record);
        Ok(())
    }

    async fn update_rebuild(&self, projection: &str, owner: &str, update: &RebuildUpdate) -> Result<bool> {
        let mut state = self.state();
        match state.rebuilds.get_mut(projection) {
            Some(record) if record.owner == owner => {
                record.update = update.clone();
                record.updated_at = Utc::now();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildProgress>> {
        let now = Utc::now();
        let mut records: Vec<RebuildProgress> = self
            .state()
            .rebuilds
            .values()
            .map(|record| RebuildProgress {
                age: (now - record.updated_at).to_std().unwrap_or_default(),
                ..record.clone()
            })
            .collect();
        records.sort_by(|a, b| a.projection.cmp(&b.projection));
        Ok(records)
    }
}

#[async_trait]
impl DedupStore for MemoryProjectionStore {
    async fn is_recorded(&self, consumer: &str, event_id: uuid::Uuid) -> Result<bool> {
        Ok(self.state().dedup.contains_key(&(consumer.to_owned(), event_id)))
    }

    async fn record(&self, consumer: &str, event_id: uuid::Uuid) -> Result<bool> {
        let mut state = self.state();
        let key = (consumer.to_owned(), event_id);
        if state.dedup.contains_key(&key) {
            return Ok(false);
        }
        state.dedup.insert(key, Utc::now());
        Ok(true)
    }

    async fn prune(&self, consumer: &str, retention: Duration) -> Result<u64> {
        let cutoff = Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let mut state = self.state();
        let before = state.dedup.len();
        state.dedup.retain(|(c, _), at| c != consumer || *at >= cutoff);
        Ok((before - state.dedup.len()) as u64)
    }
}
