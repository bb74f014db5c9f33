//! Running several projections: one task per projection, a handle to watch and stop them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use annal_eventstore::{EventStore, Position};
use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::projection::validate_name;
use crate::store::ProjectionStore;
use crate::worker::{Latency, Progress, Worker, WorkerOptions};
use crate::{Error, Projection, Result};

/// Builds a set of projections to run against one event store.
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
}

impl ProjectionRunner {
    /// A runner reading `events` and keeping checkpoints in `store`.
    pub fn new(events: Arc<dyn EventStore>, store: Arc<dyn ProjectionStore>) -> Self {
        ProjectionRunner { events, store, projections: Vec::new() }
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

    /// Starts one task per projection.
    pub fn start(self) -> RunningProjections {
        let cancel = CancellationToken::new();
        let mut workers = HashMap::new();
        for (projection, options) in self.projections {
            let progress = Progress::new();
            let task = tokio::spawn({
                let (events, store, progress, cancel) =
                    (self.events.clone(), self.store.clone(), progress.clone(), cancel.clone());
                let projection = projection.clone();
                async move {
                    let worker = Worker {
                        events: &*events,
                        store: &*store,
                        projection: &*projection,
                        options: &options,
                        progress: &progress,
                    };
                    let result = worker.run(&cancel).await;
                    if let Err(error) = &result {
                        tracing::error!(projection = projection.name(), %error, "projection stopped");
                    }
                    result
                }
            });
            workers.insert(projection.name().to_owned(), Running { projection, progress, task });
        }
        RunningProjections { events: self.events, store: self.store, workers, cancel }
    }
}

struct Running {
    projection: Arc<dyn Projection>,
    progress: Arc<Progress>,
    task: JoinHandle<Result<()>>,
}

/// How far behind the head a projection is.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Lag {
    /// The projection's checkpoint.
    pub checkpoint: Position,
    /// The head of the global log.
    pub head: Position,
    /// Events the projection selects that it has not applied yet.
    pub events_behind: u64,
    /// How long ago the oldest of them was recorded (zero when caught up).
    pub time_behind: Duration,
    /// Commit-to-applied latency of the events applied since the worker started.
    pub latency: Latency,
}

/// Projections running in this process.
pub struct RunningProjections {
    events: Arc<dyn EventStore>,
    store: Arc<dyn ProjectionStore>,
    workers: HashMap<String, Running>,
    cancel: CancellationToken,
}

impl RunningProjections {
    fn worker(&self, name: &str) -> Result<&Running> {
        self.workers.get(name).ok_or_else(|| Error::UnknownProjection(name.to_owned()))
    }

    /// Waits until projection `name` has passed `position` (read your own writes), or `timeout`.
    ///
    /// # Errors
    /// [`Error::UnknownProjection`], [`Error::Timeout`].
    pub async fn wait_for(&self, name: &str, position: Position, timeout: Duration) -> Result<()> {
        self.worker(name)?.progress.wait_for(position, timeout).await
    }

    /// Whether projection `name` is still running (it stops on a failure under
    /// [`crate::OnFailure::Stop`]).
    ///
    /// # Errors
    /// [`Error::UnknownProjection`].
    pub fn is_running(&self, name: &str) -> Result<bool> {
        Ok(!self.worker(name)?.task.is_finished())
    }

    /// The lag of projection `name`: events and time behind the head, and its latency.
    ///
    /// # Errors
    /// [`Error::UnknownProjection`], store errors.
    pub async fn lag(&self, name: &str) -> Result<Lag> {
        let worker = self.worker(name)?;
        let filter = worker.projection.filter();
        let checkpoint = self.store.checkpoint(name, 0).await?.map_or(Position::START, |c| c.position);
        let head = self.events.head().await?;
        let events_behind = self.events.count(checkpoint, head, &filter).await?;
        let oldest = self.events.read_all_page(checkpoint, &filter, 1).await?.events.into_iter().next();
        let time_behind = oldest
            .filter(|_| events_behind > 0)
            .and_then(|e| (Utc::now() - e.recorded_at).to_std().ok())
            .unwrap_or_default();
        Ok(Lag { checkpoint, head, events_behind, time_behind, latency: worker.progress.latency() })
    }

    /// Stops every projection after its current attempt (each batch is atomic, so nothing is
    /// half applied), and waits for them.
    ///
    /// # Errors
    /// The first error a projection stopped with.
    pub async fn shutdown(self) -> Result<()> {
        self.cancel.cancel();
        let mut first = Ok(());
        for (_, worker) in self.workers {
            let result = worker.task.await.unwrap_or_else(|e| Err(Error::Panicked(e.to_string())));
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}
