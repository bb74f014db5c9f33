//! Where checkpoints and dead letters live: beside the events, in the same database.

use annal_eventstore::{BoxError, Position, RecordedEvent, StreamName};
use async_trait::async_trait;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::rebuilds::{RebuildMode, RebuildProgress, RebuildUpdate};
use crate::{Projection, Result};

/// Where a projection partition has got to.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Checkpoint {
    /// Every selected event up to here has been handled (or parked).
    pub position: Position,
    /// When the checkpoint last moved.
    pub updated_at: DateTime<Utc>,
    /// When the last event applied was recorded (`None` before the first).
    pub last_recorded_at: Option<DateTime<Utc>>,
    /// The commit-to-applied p99 latency the partition's runner last reported.
    pub latency_p99: Option<Duration>,
}

/// An event a projection gave up on, with why.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id in the dead-letter table.
    pub id: i64,
    /// The projection that parked it.
    pub projection: String,
    /// The partition that parked it.
    pub partition: u32,
    /// The event.
    pub event_id: Uuid,
    /// The event's stream.
    pub stream: StreamName,
    /// The event's version in its stream.
    pub version: u64,
    /// The event's position.
    pub position: Position,
    /// The last error.
    pub error: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// A projection's control record: whether it is paused, and its epoch.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Control {
    /// Set while the projection is paused: no runner but [`Pause::by`] holds its partitions.
    pub paused: Option<Pause>,
    /// Grows with every reset, rebuild and checkpoint move of the projection, so a worker
    /// learns its checkpoint was changed under it even when no new event arrives.
    pub epoch: u64,
}

impl Control {
    /// Whether runner `owner` may hold the projection's partitions: it is not paused, or
    /// paused by `owner` itself (a rebuild that took it over).
    pub fn runnable_by(&self, owner: &str) -> bool {
        self.paused.as_ref().is_none_or(|pause| pause.by == owner)
    }
}

/// Who paused a projection, why and when.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Pause {
    /// The only runner that may hold the projection's partitions while it is paused: the
    /// owner name of a rebuild or reset that took it over, or an operator's name (no runner).
    pub by: String,
    /// Why, for `status` and the console.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

impl Pause {
    /// A pause by `by` for `reason`, now.
    pub fn new(by: impl Into<String>, reason: impl Into<String>) -> Self {
        Pause { by: by.into(), reason: reason.into(), at: Utc::now() }
    }
}

/// A runner's hold on a partition, carried by every checkpoint write: a writer whose lease
/// was taken over writes nothing (fencing).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The runner holding the lease.
    pub owner: String,
    /// The lease's token: it grows with every new holder.
    pub token: u64,
    /// The lease period it was taken for. On PostgreSQL it bounds the holder's batch
    /// transactions (see [`batch_timeouts`]), so that a holder frozen mid-batch is cut off by
    /// the server before its lease can be taken over.
    pub lease: Duration,
}

/// How long a batch transaction of a lease holder may sit idle, and how long one of its
/// statements may run, on PostgreSQL: a fifth and a third of the lease period (2 s and 3.3 s for
/// the default 10 s lease). A holder frozen mid-batch (a GC pause, SIGSTOP, a frozen VM) holds
/// back every subscriber in the cluster (its transaction holds an id) and its checkpoint row;
/// the server ends its session after these bounds, which, added up, stay below the two thirds
/// of a lease period that always remain when it last renewed, so the transaction is gone before
/// another runner can take the lease, and the frozen runner can never commit after losing it.
/// (They are at least 100 ms and 250 ms, so the guarantee holds for leases of a second or more.)
pub fn batch_timeouts(lease: Duration) -> (Duration, Duration) {
    ((lease / 5).max(Duration::from_millis(100)), (lease / 3).max(Duration::from_millis(250)))
}

/// A lease on a projection partition, as stored.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// The runner holding (or last holding) it.
    pub owner: String,
    /// The token of that holder.
    pub token: u64,
    /// When it runs out unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// What a transactional apply did.
#[derive(Debug)]
pub enum Applied {
    /// Handler effects and checkpoint committed together.
    Committed,
    /// The checkpoint was not where this worker thought (another worker moved it): nothing was
    /// committed.
    Moved,
    /// The handler failed: nothing was committed.
    Failed(BoxError),
    /// A stream of the batch has a dead letter in the projection's partition: its later events
    /// wait behind it, so nothing was committed (apply the batch event by event, parking those).
    Blocked,
}

/// What the store must do for a parked event.
#[derive(Clone, Copy, Debug)]
pub struct Park<'a> {
    /// The event.
    pub event: &'a RecordedEvent,
    /// The last error.
    pub error: &'a str,
    /// How many times it was tried.
    pub attempts: u32,
}

/// Checkpoint and dead-letter storage, implemented beside each event store backend.
///
/// Every checkpoint move is guarded: it only happens if the checkpoint is still at `from`, so two
/// workers can never both apply the same batch.
#[async_trait]
pub trait ProjectionStore: Send + Sync {
    /// The checkpoint of a projection partition (`None`: never moved).
    async fn checkpoint(&self, projection: &str, partition: u32) -> Result<Option<Checkpoint>>;

    /// Moves a checkpoint from `from` to `to`. Returns `false` (and changes nothing) if it was
    /// not at `from`.
    async fn advance(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        to: Position,
        last_recorded_at: Option<DateTime<Utc>>,
        fence: Option<&Fence>,
    ) -> Result<bool>;

    /// Runs `projection.handle(events)` in a transaction that also moves the checkpoint from
    /// `from` to `to`: exactly-once effect. Stores without transactions (memory) run the handler
    /// and then move the checkpoint.
    ///
    /// Commits nothing and returns [`Applied::Moved`] if the checkpoint is not at `from` (or the
    /// fence no longer holds), and [`Applied::Blocked`] if a stream of `events` has a dead
    /// letter of this projection in `partition`: later events of a stream wait behind its
    /// parked one, whenever and by whom it was parked.
    async fn apply(
        &self,
        projection: &dyn Projection,
        partition: u32,
        from: Position,
        to: Position,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Applied>;

    /// Records a dead letter and moves the checkpoint from `from` to the event's position, in one
    /// transaction. Returns `false` (nothing written) if the checkpoint was not at `from`.
    async fn park(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        park: Park<'_>,
        fence: Option<&Fence>,
    ) -> Result<bool>;

    /// The dead letters of a projection, oldest first.
    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>>;

    /// Applies a dead letter's event with `projection` and removes the dead letter, in one
    /// transaction where the store has them (exactly-once). `Moved` means it was already gone.
    async fn apply_dead_letter(&self, projection: &dyn Projection, id: i64, event: &RecordedEvent) -> Result<Applied>;

    /// Removes a dead letter without applying it. Returns `false` if it was not there.
    async fn remove_dead_letter(&self, projection: &str, id: i64) -> Result<bool>;

    /// Stores the p99 latency a runner measured for a partition, for status reports from other
    /// processes.
    async fn record_latency(&self, projection: &str, partition: u32, p99: Duration) -> Result<()>;

    /// Takes the lease of a partition for `owner` if it is free or expired (or already
    /// `owner`'s), for `ttl`. Returns the fence to write with, or `None` if another runner holds it.
    async fn acquire_lease(
        &self,
        projection: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>>;

    /// Extends a lease by `ttl`. Returns `false` if another runner has taken it.
    async fn renew_lease(&self, projection: &str, partition: u32, fence: &Fence, ttl: Duration) -> Result<bool>;

    /// Gives a lease up at once, so another runner can take it without waiting for it to expire.
    async fn release_lease(&self, projection: &str, partition: u32, fence: &Fence) -> Result<()>;

    /// The leases of a projection's partitions.
    async fn leases(&self, projection: &str) -> Result<Vec<Lease>>;

    /// Says that runner `owner` runs `projection` and is alive for `ttl` more; returns how many
    /// runners of `projection` are alive (the runner's fair share of its partitions follows).
    async fn register_runner(&self, projection: &str, owner: &str, ttl: Duration) -> Result<usize>;

    /// Says that runner `owner` has stopped running `projection`.
    async fn deregister_runner(&self, projection: &str, owner: &str) -> Result<()>;

    /// Records that `projection` runs with `partitions` partitions, or refuses if its
    /// checkpoints were made with another count: a stream's partition is its hash modulo the
    /// count, so under another count some events would be applied twice and others skipped.
    /// [`ProjectionStore::reset`] forgets the count (a rebuild may choose a new one), and
    /// [`ProjectionStore::promote`] gives the shadow's count to the live projection.
    ///
    /// # Errors
    /// [`Error::PartitionsChanged`](crate::Error::PartitionsChanged), store errors.
    async fn claim_partitions(&self, projection: &str, partitions: u32) -> Result<()>;

    /// Forgets a projection's checkpoints and dead letters, so it starts again from the
    /// beginning (a rebuild; reset the read model in the same breath), and bumps its epoch.
    async fn reset(&self, projection: &str) -> Result<()>;

    /// The control record of `projection`: not paused, epoch 0 if none was ever written.
    async fn control(&self, projection: &str) -> Result<Control>;

    /// Pauses `projection` (replacing any earlier pause): from the next lease round on, every
    /// runner but `pause.by` releases its partitions and takes none, and no lease of it can
    /// be acquired by anyone else.
    async fn pause(&self, projection: &str, pause: &Pause) -> Result<()>;

    /// Ends a pause; returns `false` if `projection` was not paused.
    async fn resume(&self, projection: &str) -> Result<bool>;

    /// Puts every one of the `partitions` checkpoints of `projection` at `to` and removes its
    /// dead letters after `to` (the replay meets their events again), in one transaction, and
    /// bumps its epoch. The caller decides whether the move is safe (`annal-runner reset`).
    async fn move_checkpoints(&self, projection: &str, partitions: u32, to: Position) -> Result<()>;

    /// Ends a rebuild into shadow tables, in one transaction: runs `statements` (which put the
    /// shadow read model in place of the live one), then gives projection `shadow`'s
    /// checkpoints and dead letters to projection `live`, replacing its own, and forgets
    /// `shadow`'s leases. `live`'s leases are kept: its workers find their checkpoint moved and
    /// carry on from the shadow's, on the new read model.
    ///
    /// # Errors
    /// Store errors (nothing is changed); [`crate::Error::Unsupported`] for statements on a store
    /// without SQL.
    async fn promote(&self, shadow: &str, live: &str, statements: &[String]) -> Result<()>;

    /// Starts the rebuild record of `projection` for process `owner`, replacing the record of
    /// any earlier rebuild of it: running, nothing done yet, stamped with the store's clock.
    ///
    /// # Errors
    /// Store errors; [`crate::Error::Unsupported`] from a store that keeps no rebuild records
    /// (the default).
    async fn start_rebuild(
        &self,
        projection: &str,
        owner: &str,
        mode: RebuildMode,
        stale_after: Duration,
    ) -> Result<()> {
        let _ = (projection, owner, mode, stale_after);
        Err(crate::Error::Unsupported("this projection store keeps no rebuild records"))
    }

    /// Writes the figures and outcome of `projection`'s rebuild record, stamped with the store's
    /// clock, if the record is still `owner`'s. Returns `false` (nothing written) if another
    /// process has started a rebuild of it since, or there is no record.
    ///
    /// # Errors
    /// Store errors; [`crate::Error::Unsupported`] as for [`ProjectionStore::start_rebuild`].
    async fn update_rebuild(&self, projection: &str, owner: &str, update: &RebuildUpdate) -> Result<bool> {
        let _ = (projection, owner, update);
        Err(crate::Error::Unsupported("this projection store keeps no rebuild records"))
    }

    /// Every projection's last rebuild record, by projection name, with its age by the store's
    /// clock (see [`RebuildProgress::stale`]).
    ///
    /// # Errors
    /// Store errors; [`crate::Error::Unsupported`] as for [`ProjectionStore::start_rebuild`].
    async fn rebuilds(&self) -> Result<Vec<RebuildProgress>> {
        Err(crate::Error::Unsupported("this projection store keeps no rebuild records"))
    }
}

/// A persistent record of the events an at-least-once consumer has handled, for effects outside
/// the database (emails, HTTP calls): check before the effect, record after it. A crash between
/// the two repeats the effect once, the best at-least-once allows; everything else is skipped.
///
/// Records are kept for a retention window: [`DedupStore::prune`] forgets older ones, so size
/// the window above the longest time an event can be redelivered (a rebuild replays everything,
/// so reset the records with it).
#[async_trait]
pub trait DedupStore: Send + Sync {
    /// Whether `consumer` has recorded `event_id`.
    async fn is_recorded(&self, consumer: &str, event_id: Uuid) -> Result<bool>;

    /// Records that `consumer` handled `event_id`. Returns `false` if it was recorded already.
    async fn record(&self, consumer: &str, event_id: Uuid) -> Result<bool>;

    /// Forgets the records of `consumer` older than `retention`; returns how many.
    async fn prune(&self, consumer: &str, retention: Duration) -> Result<u64>;
}
