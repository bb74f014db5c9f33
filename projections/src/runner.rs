//! Running projections: a coordinator per projection that holds partition leases shared with
//! other runner processes through the database, and a worker per partition it holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use annal_eventstore::{EventStore, Filter, Position};
use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::projection::validate_name;
use crate::store::{Fence, ProjectionStore};
use crate::worker::{Latency, Progress, Worker, WorkerOptions};
use crate::{Error, Projection, Result};

/// Builds a set of projections to run against one event store.
///
/// Every projection partition is run under a lease kept in the projection store, so several
/// runner processes (on several machines) can run the same projections: each takes a fair share
/// of the partitions, a runner that joins gets partitions released to it, and the partitions of
/// a runner that dies are taken over once its leases expire. Every checkpoint write is fenced by
/// the lease, so a runner that lost its lease writes nothing.
///
/// ```
/// use std::sync::Arc;
/// use annal_eventstore::{BoxError, MemoryEventStore, RecordedEvent};
/// use annal_projections::{MemoryProjectionStore, Projection, ProjectionRunner, Tx, WorkerOptions};
///
/// struct Counter;
///
/// #[annal_eventstore::async_trait]
/// impl Projection for Counter {
///     fn name(&self) -> &str { "counter" }
///     async fn handle(&self, events: &[RecordedEvent], _tx: &mut Tx<'_>) -> Result<(), BoxError> {
///         println!("{} events", events.len());
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let running = ProjectionRunner::new(Arc::new(MemoryEventStore::new()), Arc::new(MemoryProjectionStore::new()))
///     .with(Arc::new(Counter), WorkerOptions::default())?
///     .start();
/// running.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub struct ProjectionRunner {
    events: Arc<dyn EventStore>,
    store: Arc<dyn ProjectionStore>,
    projections: Vec<(Arc<dyn Projection>, WorkerOptions)>,
    owner: String,
    lease: Duration,
}

impl std::fmt::Debug for ProjectionRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.projections.iter().map(|(p, _)| p.name()).collect();
        f.debug_struct("ProjectionRunner")
            .field("projections", &names)
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl ProjectionRunner {
    /// A runner reading `events` and keeping checkpoints, dead letters and leases in `store`.
    pub fn new(events: Arc<dyn EventStore>, store: Arc<dyn ProjectionStore>) -> Self {
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple());
        ProjectionRunner { events, store, projections: Vec::new(), owner, lease: Duration::from_secs(10) }
    }

    /// Adds a projection.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a bad name, [`Error::DuplicateName`] for a name already added.
    pub fn with(mut self, projection: Arc<dyn Projection>, options: WorkerOptions) -> Result<Self> {
        validate_name(projection.name())?;
        if self.projections.iter().any(|(p, _)| p.name() == projection.name()) {
            return Err(Error::DuplicateName(projection.name().to_owned()));
        }
        self.projections.push((projection, options));
        Ok(self)
    }

    /// Names this runner in leases (default: the process id and a UUID).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// How long a lease lasts unless renewed (default 10 s): a dead runner's partitions are taken
    /// over within about this long. Leases are renewed every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// Starts a coordinator task per projection; they run until the returned
    /// [`RunningProjections`] is shut down or dropped.
    #[must_use = "projections stop when the returned RunningProjections is dropped"]
    pub fn start(self) -> RunningProjections {
        let cancel = CancellationToken::new();
        let crash = CancellationToken::new();
        let mut running = HashMap::new();
        for (projection, options) in self.projections {
            let progress = Progress::new();
            let coordinator = Coordinator {
                events: self.events.clone(),
                store: self.store.clone(),
                projection: projection.clone(),
                options,
                progress: progress.clone(),
                owner: self.owner.clone(),
                lease: self.lease,
            };
            let task = tokio::spawn(coordinator.run(cancel.clone(), crash.clone()));
            running.insert(projection.name().to_owned(), Running { projection, progress, task });
        }
        RunningProjections {
            events: self.events,
            store: self.store,
            running,
            cancel,
            crash,
            owner: self.owner,
            lease: self.lease,
        }
    }
}

struct Running {
    projection: Arc<dyn Projection>,
    progress: Arc<Progress>,
    task: JoinHandle<Result<()>>,
}

/// Holds leases on a projection's partitions and runs a worker for each one held.
struct Coordinator {
    events: Arc<dyn EventStore>,
    store: Arc<dyn ProjectionStore>,
    projection: Arc<dyn Projection>,
    options: WorkerOptions,
    progress: Arc<Progress>,
    owner: String,
    lease: Duration,
}

struct Held {
    fence: Fence,
    /// The projection's epoch when the worker started: a reset or move since makes it stale.
    epoch: u64,
    cancel: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl Coordinator {
    fn name(&self) -> &str {
        self.projection.name()
    }

    fn spawn(&self, partition: u32, fence: Fence, epoch: u64, parent: &CancellationToken) -> Held {
        let cancel = parent.child_token();
        let (events, store, projection, progress) =
            (self.events.clone(), self.store.clone(), self.projection.clone(), self.progress.clone());
        let options = WorkerOptions { partition, ..self.options.clone() };
        let worker_fence = fence.clone();
        let worker_cancel = cancel.clone();
        let span = tracing::info_span!("projection", name = self.name(), partition);
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let worker = Worker {
                    events: &*events,
                    store: &*store,
                    projection: &*projection,
                    options: &options,
                    progress: &progress,
                    fence: Some(worker_fence),
                };
                let result = worker.run(&worker_cancel).await;
                if let Err(error) = &result {
                    tracing::error!(projection = projection.name(), partition, %error, "projection partition stopped");
                }
                result
            },
            span,
        ));
        tracing::info!(projection = self.name(), partition, token = fence.token, owner = %self.owner, "took partition");
        Held { fence, epoch, cancel, task }
    }

    async fn stop(&self, partition: u32, held: Held, release: bool) -> Result<()> {
        held.cancel.cancel();
        let result = held.task.await.unwrap_or_else(|e| Err(Error::Panicked(e.to_string())));
        if release {
            self.store.release_lease(self.name(), partition, &held.fence).await?;
            tracing::info!(projection = self.name(), partition, "released partition");
        }
        result
    }

    /// One round: read the control record, say we are alive, keep what we hold, give up what is
    /// more than our share, take free partitions up to it. Returns a partition's error if one
    /// stopped. A projection paused for another runner is given up whole; a worker whose
    /// checkpoint was reset or moved since it started (the epoch grew) is restarted from the
    /// stored checkpoint, even if it was waiting for new events.
    async fn round(&self, held: &mut HashMap<u32, Held>, paused: &mut bool, cancel: &CancellationToken) -> Result<()> {
        let control = self.store.control(self.name()).await?;
        if !control.runnable_by(&self.owner) {
            let mut first = Ok(());
            for (partition, h) in held.drain() {
                let stopped = self.stop(partition, h, true).await;
                if first.is_ok() {
                    first = stopped;
                }
            }
            if !*paused {
                *paused = true;
                let pause = control.paused.as_ref();
                tracing::info!(
                    projection = self.name(),
                    by = pause.map(|p| p.by.as_str()),
                    reason = pause.map(|p| p.reason.as_str()),
                    "projection paused: released its partitions"
                );
                self.store.deregister_runner(self.name(), &self.owner).await?;
            }
            return first;
        }
        if std::mem::take(paused) {
            tracing::info!(projection = self.name(), "projection resumed");
        }
        let partitions = self.projection.partitions().max(1);
        let runners = self.store.register_runner(self.name(), &self.owner, self.lease).await?.max(1);
        // Paused for this runner (a rebuild that took the projection over): every partition.
        let share = if control.paused.is_some() {
            usize::try_from(partitions).unwrap_or(usize::MAX)
        } else {
            usize::try_from(partitions).unwrap_or(usize::MAX).div_ceil(runners)
        };
        // Renewals come first in the round: nothing they wait for may hold them up.
        // Partitions whose worker ended (stopped on an event), or whose lease was taken.
        let mut ended = Vec::new();
        for (&partition, h) in held.iter() {
            if h.task.is_finished() || !self.store.renew_lease(self.name(), partition, &h.fence, self.lease).await? {
                ended.push(partition);
            }
        }
        for partition in ended {
            if let Some(h) = held.remove(&partition) {
                let finished = h.task.is_finished();
                let result = self.stop(partition, h, finished).await;
                if finished {
                    result?;
                }
                tracing::warn!(projection = self.name(), partition, "lost the lease of a partition");
            }
        }
        let stale: Vec<u32> = held.iter().filter(|(_, h)| h.epoch != control.epoch).map(|(&p, _)| p).collect();
        for partition in stale {
            if let Some(h) = held.remove(&partition) {
                let fence = h.fence.clone();
                self.stop(partition, h, false).await?;
                tracing::info!(
                    projection = self.name(),
                    partition,
                    epoch = control.epoch,
                    "the checkpoint was reset or moved: restarting the partition from it"
                );
                held.insert(partition, self.spawn(partition, fence, control.epoch, cancel));
            }
        }
        while held.len() > share {
            let Some(&partition) = held.keys().max() else { break };
            if let Some(h) = held.remove(&partition) {
                self.stop(partition, h, true).await?;
            }
        }
        // Start looking at a different partition in each runner, so runners do not all race
        // for the same free one.
        let offset = u32::try_from(self.owner.bytes().map(u64::from).sum::<u64>() % u64::from(partitions)).unwrap_or(0);
        for i in 0..partitions {
            if held.len() >= share {
                break;
            }
            let partition = (offset + i) % partitions;
            if held.contains_key(&partition) {
                continue;
            }
            if let Some(fence) = self.store.acquire_lease(self.name(), partition, &self.owner, self.lease).await? {
                held.insert(partition, self.spawn(partition, fence, control.epoch, cancel));
            }
        }
        // Report the latency measured here, for `annal-runner status` in other processes. It
        // writes checkpoint rows, which a frozen runner's batch may hold locked until the server
        // ends it: bounded, and last, so that it never delays the renewals.
        let latency = self.progress.latency();
        if latency.count > 0 {
            let record = async {
                for &partition in held.keys() {
                    self.store.record_latency(self.name(), partition, latency.p99).await?;
                }
                Ok::<_, Error>(())
            };
            match tokio::time::timeout(self.lease / 6, record).await {
                Ok(recorded) => recorded?,
                Err(_elapsed) => tracing::debug!(projection = self.name(), "recording the latency took too long"),
            }
        }
        Ok(())
    }

    async fn run(self, cancel: CancellationToken, crash: CancellationToken) -> Result<()> {
        let mut held: HashMap<u32, Held> = HashMap::new();
        let mut claimed = false;
        let mut paused = false;
        let mut result = Ok(());
        while !cancel.is_cancelled() {
            if !claimed {
                match self.store.claim_partitions(self.name(), self.projection.partitions().max(1)).await {
                    Ok(()) => claimed = true,
                    Err(error @ Error::PartitionsChanged { .. }) => {
                        tracing::error!(projection = self.name(), %error, "refusing to run the projection");
                        return Err(error);
                    }
                    Err(error) => {
                        tracing::warn!(projection = self.name(), %error, "could not check the partition count")
                    }
                }
            }
            if crash.is_cancelled() {
                // A simulated crash: workers stop, leases and registration are left to expire.
                for (_, h) in held.drain() {
                    h.cancel.cancel();
                    let _ = h.task.await;
                }
                return Ok(());
            }
            let round = if claimed { self.round(&mut held, &mut paused, &cancel).await } else { Ok(()) };
            match round {
                Ok(()) => {}
                Err(error @ Error::Stopped { .. }) => {
                    result = Err(error);
                    break;
                }
                Err(error) => tracing::warn!(projection = self.name(), %error, "lease round failed; retrying"),
            }
            tokio::select! {
                () = cancel.cancelled() => {}
                () = crash.cancelled() => {}
                () = tokio::time::sleep(self.lease / 3) => {}
            }
        }
        // Graceful: stop the workers between two attempts, then hand the partitions over at once.
        for (partition, h) in held.drain() {
            let stopped = self.stop(partition, h, true).await;
            if result.is_ok() {
                result = stopped;
            }
        }
        if let Err(error) = self.store.deregister_runner(self.name(), &self.owner).await {
            tracing::warn!(projection = self.name(), %error, "could not deregister the runner");
        }
        result
    }
}

/// How far behind the head a projection is.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Lag {
    /// The projection's checkpoint (the lowest of its partitions').
    pub checkpoint: Position,
    /// The head of the global log.
    pub head: Position,
    /// Events the projection selects that are not yet applied, over all its partitions.
    pub events_behind: u64,
    /// How long ago the oldest of them was recorded (zero when caught up).
    pub time_behind: Duration,
    /// Commit-to-applied latency of the events applied in this process since it started.
    pub latency: Latency,
    /// The same, partition by partition (one entry for an unpartitioned projection).
    pub partitions: Vec<PartitionLag>,
}

/// How far behind the head one partition of a projection is.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// Its checkpoint.
    pub checkpoint: Position,
    /// Events of its streams that the projection selects and has not applied yet.
    pub events_behind: u64,
    /// How long ago the oldest of them was recorded (zero when caught up).
    pub time_behind: Duration,
}

/// The lag of partition `partition` of `count` of a projection selecting `filter`, whose
/// checkpoint is `checkpoint`, against `head`: for reports on projections that run in other
/// processes ([`RunningProjections::lag`] covers those running here).
///
/// # Errors
/// Event store errors.
pub async fn partition_lag(
    events: &dyn EventStore,
    filter: &Filter,
    (partition, count): (u32, u32),
    checkpoint: Position,
    head: Position,
) -> Result<PartitionLag> {
    let filter = filter.clone().with_partition(partition, count);
    let events_behind = events.count(checkpoint, head, &filter).await?;
    let oldest = if events_behind > 0 {
        match events.read_all_page(checkpoint, &filter, 1).await {
            Ok(page) => page.events.into_iter().next(),
            // An event the store cannot decode has no age to read: the lag is counted, not timed.
            Err(annal_eventstore::Error::Unreadable(_)) => None,
            Err(error) => return Err(error.into()),
        }
    } else {
        None
    };
    let time_behind = oldest.and_then(|e| (Utc::now() - e.recorded_at).to_std().ok()).unwrap_or_default();
    Ok(PartitionLag { partition, checkpoint, events_behind, time_behind })
}

/// Projections running in this process. Dropping it stops them, as
/// [`RunningProjections::shutdown`] does but without waiting (their leases then expire, or are
/// released by the coordinators as they end).
#[must_use = "projections stop when this is dropped; keep it, and call `shutdown` to stop them"]
pub struct RunningProjections {
    events: Arc<dyn EventStore>,
    store: Arc<dyn ProjectionStore>,
    running: HashMap<String, Running>,
    cancel: CancellationToken,
    /// Cancelled only by [`RunningProjections::crash`] (the `test-util` feature).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    crash: CancellationToken,
    owner: String,
    lease: Duration,
}

impl Drop for RunningProjections {
    fn drop(&mut self) {
        // Coordinators release their leases and deregister as they end.
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for RunningProjections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&String> = self.running.keys().collect();
        f.debug_struct("RunningProjections")
            .field("projections", &names)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl RunningProjections {
    fn get(&self, name: &str) -> Result<&Running> {
        self.running.get(name).ok_or_else(|| Error::UnknownProjection(name.to_owned()))
    }

    /// This runner's name in leases.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The lowest checkpoint of projection `name` over all its partitions, wherever they run.
    ///
    /// # Errors
    /// [`Error::UnknownProjection`], store errors.
    pub async fn checkpoint(&self, name: &str) -> Result<Position> {
        let partitions = self.get(name)?.projection.partitions().max(1);
        let mut lowest = None::<Position>;
        for partition in 0..partitions {
            let position = self.store.checkpoint(name, partition).await?.map_or(Position::START, |c| c.position);
            lowest = Some(lowest.map_or(position, |l| l.min(position)));
        }
        Ok(lowest.unwrap_or(Position::START))
    }

    /// Waits until every partition of projection `name` has passed `position` (read your own
    /// writes), or `timeout`.
    ///
    /// It is honest about what it waited for: it fails at once, naming the projection, when the
    /// projection stopped in this process, when it is paused ([`Error::Paused`]; unless paused
    /// for this very runner, as a rebuild's is), or when a partition it does not run here has no live
    /// lease anywhere (no runner is working on it); and when the projection got there but
    /// parked events on the way (the event at `position` itself, or any it passed during the
    /// wait), it says so with [`Error::Parked`] instead of `Ok`: the read model lacks them.
    ///
    /// # Errors
    /// [`Error::UnknownProjection`], [`Error::Timeout`], [`Error::NotRunning`],
    /// [`Error::Paused`], [`Error::Parked`], store errors.
    pub async fn wait_for(&self, name: &str, position: Position, timeout: Duration) -> Result<()> {
        let running = self.get(name)?;
        let mut moved = running.progress.subscribe();
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let started_at = self.checkpoint(name).await?;
        let not_running = |reason: String| Error::NotRunning { projection: name.to_owned(), position, reason };
        loop {
            moved.borrow_and_update();
            let checkpoint = self.checkpoint(name).await?;
            if checkpoint >= position {
                let parked: Vec<Position> = self
                    .store
                    .dead_letters(name)
                    .await?
                    .into_iter()
                    .map(|d| d.position)
                    .filter(|p| *p == position || (*p > started_at && *p <= position))
                    .collect();
                if !parked.is_empty() {
                    return Err(Error::Parked { projection: name.to_owned(), position, parked });
                }
                return Ok(());
            }
            if running.task.is_finished() {
                return Err(not_running("it stopped in this process (see its error in the log)".into()));
            }
            if let Some(pause) = self.store.control(name).await?.paused.filter(|p| p.by != self.owner) {
                return Err(Error::Paused {
                    projection: name.to_owned(),
                    position,
                    by: pause.by,
                    reason: pause.reason,
                });
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Timeout { projection: name.to_owned(), position, waited: timeout });
            }
            // A partition behind `position` that nobody holds a lease on will not move. Checked
            // after two lease periods of waiting: time for a starting or taking-over runner.
            if now.duration_since(started) > self.lease * 2 {
                let leases = self.store.leases(name).await?;
                for partition in 0..running.projection.partitions().max(1) {
                    let at = self.store.checkpoint(name, partition).await?.map_or(Position::START, |c| c.position);
                    let held = leases.iter().any(|l| l.partition == partition && l.expires_at > Utc::now());
                    if at < position && !held {
                        return Err(not_running(format!("no runner holds partition {partition} (no live lease)")));
                    }
                }
            }
            // Woken by this process's workers; partitions run elsewhere are polled.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(50)), moved.changed()).await;
        }
    }

    /// Whether projection `name` is still running (it stops on a failure under
    /// [`crate::OnFailure::Stop`]).
    ///
    /// # Errors
    /// [`Error::UnknownProjection`].
    pub fn is_running(&self, name: &str) -> Result<bool> {
        Ok(!self.get(name)?.task.is_finished())
    }

    /// The lag of projection `name`: events and time behind the head, in total and partition by
    /// partition (each counted in its own streams, in the database), and its latency.
    ///
    /// # Errors
    /// [`Error::UnknownProjection`], store errors.
    pub async fn lag(&self, name: &str) -> Result<Lag> {
        let running = self.get(name)?;
        let filter = running.projection.filter();
        let count = running.projection.partitions().max(1);
        let head = self.events.head().await?;
        let mut partitions = Vec::new();
        for partition in 0..count {
            let checkpoint = self.store.checkpoint(name, partition).await?.map_or(Position::START, |c| c.position);
            partitions.push(partition_lag(&*self.events, &filter, (partition, count), checkpoint, head).await?);
        }
        Ok(Lag {
            checkpoint: partitions.iter().map(|p| p.checkpoint).min().unwrap_or(Position::START),
            head,
            events_behind: partitions.iter().map(|p| p.events_behind).sum(),
            time_behind: partitions.iter().map(|p| p.time_behind).max().unwrap_or_default(),
            latency: running.progress.latency(),
            partitions,
        })
    }

    /// Stops as a crashed process would, for tests of failover: workers stop between two
    /// attempts, but leases are neither released nor renewed, and the runner is not
    /// deregistered, so other runners take over only when the leases expire. Behind the
    /// `test-util` feature.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub async fn crash(mut self) {
        self.crash.cancel();
        for (_, running) in std::mem::take(&mut self.running) {
            let _ = running.task.await;
        }
    }

    /// Stops every projection after its current attempt (each batch is atomic, so nothing is
    /// half applied), releases its leases so other runners take over at once, and waits.
    ///
    /// # Errors
    /// The first error a projection stopped with.
    pub async fn shutdown(mut self) -> Result<()> {
        self.cancel.cancel();
        let mut first = Ok(());
        for (_, running) in std::mem::take(&mut self.running) {
            let result = running.task.await.unwrap_or_else(|e| Err(Error::Panicked(e.to_string())));
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}
