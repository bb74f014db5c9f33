//! The worker: follows the global log from a projection's checkpoint, applies batches under the
//! projection's delivery guarantee, retries, parks, and records its progress and latency.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annal_eventstore::{EventStore, Follower, Page, Position, RecordedEvent, StreamName, SubscriptionOptions};
use chrono::Utc;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::projection::{Tx, validate_name};
use crate::store::{Applied, Fence, Park, ProjectionStore};
use crate::{Delivery, Error, OnFailure, Projection, Result, RetryPolicy};

/// How a worker runs a projection.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// How failing events are retried.
    pub retry: RetryPolicy,
    /// What happens to an event that still fails.
    pub on_failure: OnFailure,
    /// How long a caught-up worker waits for a wake-up before polling anyway.
    pub poll_interval: Duration,
    /// The partition this worker runs (0 for an unpartitioned projection).
    pub partition: u32,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            retry: RetryPolicy::default(),
            on_failure: OnFailure::default(),
            poll_interval: Duration::from_secs(1),
            partition: 0,
        }
    }
}

impl WorkerOptions {
    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets what happens to an event that still fails.
    pub fn on_failure(mut self, on_failure: OnFailure) -> Self {
        self.on_failure = on_failure;
        self
    }
}

/// Commit-to-applied latency percentiles of the events a worker applied.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Latency {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// The slowest.
    pub max: Duration,
}

/// What a projection's workers in this process share with whoever watches them: a signal
/// that a checkpoint moved, and the latency of the events applied.
#[derive(Debug)]
pub struct Progress {
    moved: watch::Sender<u64>,
    latency: Mutex<Histogram<u64>>,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        // Microseconds, from 1 µs to one hour at 3 significant figures; longer waits count as an
        // hour. (A histogram that grows on demand would refuse to grow in `saturating_record`.)
        let histogram = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Arc::new(Progress { moved: watch::Sender::new(0), latency: Mutex::new(histogram) })
    }

    /// A receiver that changes whenever a checkpoint of this projection moves in this process.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }

    /// The commit-to-applied latency of the events applied so far.
    pub fn latency(&self) -> Latency {
        let histogram = self.latency.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let micros = |q: f64| Duration::from_micros(histogram.value_at_quantile(q));
        Latency {
            count: histogram.len(),
            p50: micros(0.5),
            p99: micros(0.99),
            p999: micros(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }

    fn reached(&self) {
        self.moved.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn applied(&self, events: &[RecordedEvent]) {
        let now = Utc::now();
        let mut histogram = self.latency.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for event in events {
            let micros = (now - event.recorded_at).num_microseconds().unwrap_or(i64::MAX).max(0);
            histogram.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
        }
    }
}

/// Runs one projection partition.
pub(crate) struct Worker<'a> {
    pub(crate) events: &'a dyn EventStore,
    pub(crate) store: &'a dyn ProjectionStore,
    pub(crate) projection: &'a dyn Projection,
    pub(crate) options: &'a WorkerOptions,
    pub(crate) progress: &'a Progress,
    /// The lease this worker writes under, when partitions are shared between runners.
    pub(crate) fence: Option<Fence>,
}

/// How a batch ended.
enum Outcome {
    /// The checkpoint is here now.
    At(Position),
    /// Someone else moved the checkpoint: reload it.
    Moved,
}

impl Worker<'_> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    async fn load_checkpoint(&self) -> Result<Position> {
        let position =
            self.store.checkpoint(self.name(), self.options.partition).await?.map_or(Position::START, |c| c.position);
        self.progress.reached();
        Ok(position)
    }

    /// Streams with a parked event in this partition: their later events are parked behind it.
    async fn parked_streams(&self) -> Result<HashSet<StreamName>> {
        let dead = self.store.dead_letters(self.name()).await?;
        Ok(dead.into_iter().filter(|d| d.partition == self.options.partition).map(|d| d.stream).collect())
    }

    /// Whether a stream of `events` has a parked event.
    async fn blocked(&self, events: &[RecordedEvent]) -> Result<bool> {
        let parked = self.parked_streams().await?;
        Ok(events.iter().any(|e| parked.contains(&e.stream)))
    }

    /// Follows the log until `cancel` fires (returns `Ok`) or the projection stops on an event
    /// that keeps failing under [`OnFailure::Stop`] (returns the error).
    pub(crate) async fn run(&self, cancel: &CancellationToken) -> Result<()> {
        validate_name(self.name())?;
        // A partition reads only its own streams, in the database.
        let filter = self.projection.filter().with_partition(self.options.partition, self.projection.partitions());
        let batch = self.projection.batch_size().max(1);
        let mut checkpoint = self.load_checkpoint().await?;
        let options = SubscriptionOptions::default().page_size(batch).poll_interval(self.options.poll_interval);
        let mut follower = Follower::new(self.events, checkpoint, filter, options);
        let mut failures = 0u32;
        // The page after the last batch, read while that batch was applied.
        let mut ahead = None;
        while !cancel.is_cancelled() {
            let page = match ahead.take() {
                Some(page) => page,
                None => tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    // The follower waits for new events and backs off after a failed read itself.
                    page = follower.next_page() => page,
                },
            };
            let page = match page {
                Ok(page) => page,
                Err(annal_eventstore::Error::Unreadable(bad)) => {
                    // No retry can decode it: park it at once (the follower already went past).
                    match self.park_unreadable(checkpoint, &bad).await {
                        Ok(true) => {
                            checkpoint = bad.position;
                            self.progress.reached();
                        }
                        Ok(false) => checkpoint = self.load_checkpoint().await?,
                        Err(error @ Error::Stopped { .. }) => return Err(error),
                        Err(error) => {
                            tracing::warn!(projection = self.name(), %error, "could not park an unreadable event; retrying");
                            follower.seek(checkpoint);
                            tokio::select! {
                                () = cancel.cancelled() => return Ok(()),
                                () = tokio::time::sleep(RetryPolicy::default().pause(1)) => {}
                            }
                        }
                    }
                    continue;
                }
                Err(error) => {
                    // The follower backs off before its next read.
                    tracing::warn!(projection = self.name(), %error, "reading events failed; retrying");
                    continue;
                }
            };
            let outcome = if page.events.is_empty() {
                // Only events the projection does not select: the checkpoint moves past them.
                self.advance(checkpoint, page.next).await
            } else {
                let (outcome, next) = self.apply_reading_ahead(checkpoint, page, &mut follower, cancel).await;
                ahead = next;
                outcome
            };
            match outcome {
                Ok(Outcome::At(position)) => {
                    failures = 0;
                    checkpoint = position;
                    self.progress.reached();
                }
                Ok(Outcome::Moved) => checkpoint = self.load_checkpoint().await?,
                Err(error @ Error::Stopped { .. }) => return Err(error),
                Err(error) => {
                    failures += 1;
                    let pause = RetryPolicy::default().pause(failures);
                    tracing::warn!(projection = self.name(), %error, ?pause, "projection store failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => checkpoint = self.load_checkpoint().await.unwrap_or(checkpoint),
                    }
                }
            }
            // A page read ahead follows the checkpoint; otherwise the follower goes back to it.
            if ahead.is_none() {
                follower.seek(checkpoint);
            }
        }
        Ok(())
    }

    /// Applies `page` (after `from`) while the follower reads the page after it, on a
    /// connection of its own, so the read's round trip overlaps the batch's. Both are polled
    /// together here until the batch ends, so the read never sits unpolled holding a
    /// connection. Returns the batch's outcome and, when the batch ended at the page's end,
    /// the next page; otherwise the read is dropped and the caller moves the follower back.
    async fn apply_reading_ahead<S: EventStore + ?Sized>(
        &self,
        from: Position,
        page: Page,
        follower: &mut Follower<'_, S>,
        cancel: &CancellationToken,
    ) -> (Result<Outcome>, Option<annal_eventstore::Result<Page>>) {
        let (partition, until, len) = (self.options.partition, page.next, page.events.len());
        let span = crate::trace::batch_span(self.name(), partition, from, until, &page.events);
        let started = std::time::Instant::now();
        let read = follower.next_page();
        tokio::pin!(read);
        let mut next = None;
        let outcome = {
            // Dropped at the end of this block, which ends the batch's span: it must not stay
            // open while the read waits for new events.
            let process = self.process(from, page, cancel).instrument(span);
            tokio::pin!(process);
            loop {
                tokio::select! {
                    outcome = &mut process => break outcome,
                    page = &mut read, if next.is_none() => next = Some(page),
                }
            }
        };
        crate::metrics::batch(self.name(), partition, self.phase(len), started.elapsed());
        if !matches!(outcome, Ok(Outcome::At(at)) if at == until) {
            return (outcome, None);
        }
        if next.is_none() {
            // Caught up: say so before waiting for new events.
            self.progress.reached();
            next = tokio::select! {
                () = cancel.cancelled() => None,
                page = &mut read => Some(page),
            };
        }
        (outcome, next)
    }

    /// The metrics' phase of a batch of `events` (`crate::metrics::phase`).
    fn phase(&self, events: usize) -> &'static str {
        crate::metrics::phase(self.name(), events, self.projection.batch_size().max(1))
    }

    /// Records events applied: this process's latency, and the metrics.
    fn applied(&self, page: &Page, events: &[RecordedEvent]) {
        self.progress.applied(events);
        crate::metrics::applied(self.name(), self.options.partition, self.phase(page.events.len()), events);
    }

    async fn advance(&self, from: Position, to: Position) -> Result<Outcome> {
        let moved =
            self.store.advance(self.name(), self.options.partition, from, to, None, self.fence.as_ref()).await?;
        Ok(if moved { Outcome::At(to) } else { Outcome::Moved })
    }

    /// Applies a page as one batch; on failure, or behind a dead letter, event by event.
    async fn process(&self, from: Position, page: Page, cancel: &CancellationToken) -> Result<Outcome> {
        let partition = self.options.partition;
        let error = match self.projection.delivery() {
            // The store refuses a batch behind a dead letter itself, in the statement that moves
            // the checkpoint: no lookup before each batch.
            Delivery::ExactlyOnce => {
                match self
                    .store
                    .apply(self.projection, partition, from, page.next, &page.events, self.fence.as_ref())
                    .await?
                {
                    Applied::Committed => {
                        self.applied(&page, &page.events);
                        return Ok(Outcome::At(page.next));
                    }
                    Applied::Moved => return Ok(Outcome::Moved),
                    Applied::Blocked => BLOCKED.into(),
                    Applied::Failed(error) => error,
                }
            }
            // The handler runs outside the store: look before it runs.
            _ if self.blocked(&page.events).await? => BLOCKED.into(),
            Delivery::AtLeastOnce => {
                match crate::projection::run_handler(self.projection, &page.events, &mut Tx::none()).await {
                    Ok(()) => {
                        let last = page.events.last().map(|e| e.recorded_at);
                        if !self
                            .store
                            .advance(self.name(), partition, from, page.next, last, self.fence.as_ref())
                            .await?
                        {
                            return Ok(Outcome::Moved);
                        }
                        self.progress.applied(&page.events);
                        return Ok(Outcome::At(page.next));
                    }
                    Err(error) => error,
                }
            }
            Delivery::AtMostOnce => {
                let last = page.events.last().map(|e| e.recorded_at);
                if !self.store.advance(self.name(), partition, from, page.next, last, self.fence.as_ref()).await? {
                    return Ok(Outcome::Moved);
                }
                match crate::projection::run_handler(self.projection, &page.events, &mut Tx::none()).await {
                    Ok(()) => self.applied(&page, &page.events),
                    Err(error) => tracing::error!(
                        projection = self.name(),
                        %error,
                        first = %page.events[0].position,
                        count = page.events.len(),
                        "at-most-once batch failed; its events are not retried"
                    ),
                }
                return Ok(Outcome::At(page.next));
            }
        };
        tracing::debug!(projection = self.name(), %error, "batch failed; retrying event by event");
        crate::metrics::count(crate::metrics::FAILED, self.name(), partition, page.events.len());
        let parked = self.parked_streams().await?;
        self.one_by_one(from, page, parked, cancel).await
    }

    async fn one_by_one(
        &self,
        from: Position,
        page: Page,
        mut parked: HashSet<StreamName>,
        cancel: &CancellationToken,
    ) -> Result<Outcome> {
        let partition = self.options.partition;
        let policy = &self.options.retry;
        let mut at = from;
        for event in &page.events {
            if parked.contains(&event.stream) {
                if !self.park_behind(at, event).await? {
                    return Ok(Outcome::Moved);
                }
                at = event.position;
                continue;
            }
            let mut attempt = 1;
            loop {
                let result = match self.projection.delivery() {
                    Delivery::ExactlyOnce => {
                        let one = std::slice::from_ref(event);
                        self.store
                            .apply(self.projection, partition, at, event.position, one, self.fence.as_ref())
                            .await?
                    }
                    _ => match crate::projection::run_handler(
                        self.projection,
                        std::slice::from_ref(event),
                        &mut Tx::none(),
                    )
                    .await
                    {
                        Ok(()) => {
                            let (last, fence) = (Some(event.recorded_at), self.fence.as_ref());
                            let moved =
                                self.store.advance(self.name(), partition, at, event.position, last, fence).await?;
                            if moved { Applied::Committed } else { Applied::Moved }
                        }
                        Err(error) => Applied::Failed(error),
                    },
                };
                if matches!(result, Applied::Failed(_)) {
                    crate::metrics::count(crate::metrics::FAILED, self.name(), partition, 1);
                }
                match result {
                    Applied::Committed => {
                        self.applied(&page, std::slice::from_ref(event));
                        at = event.position;
                        self.progress.reached();
                        break;
                    }
                    Applied::Moved => return Ok(Outcome::Moved),
                    // Parked since the batch began (a takeover's worker, say): wait behind it.
                    Applied::Blocked => {
                        if !self.park_behind(at, event).await? {
                            return Ok(Outcome::Moved);
                        }
                        parked.insert(event.stream.clone());
                        at = event.position;
                        break;
                    }
                    Applied::Failed(error) if attempt >= policy.attempts || is_permanent(&error) => {
                        let error = error.to_string();
                        match self.options.on_failure {
                            OnFailure::Stop => {
                                return Err(Error::Stopped {
                                    projection: self.name().to_owned(),
                                    event_id: event.id,
                                    position: event.position,
                                    attempts: attempt,
                                    reason: error,
                                });
                            }
                            OnFailure::Park => {
                                tracing::warn!(
                                    projection = self.name(),
                                    event = %event.id,
                                    position = %event.position,
                                    attempts = attempt,
                                    %error,
                                    "parking an event that keeps failing"
                                );
                                if !self.park(at, event, &error, attempt).await? {
                                    return Ok(Outcome::Moved);
                                }
                                parked.insert(event.stream.clone());
                                at = event.position;
                                break;
                            }
                        }
                    }
                    Applied::Failed(error) => {
                        let pause = policy.pause(attempt);
                        if attempt == 1 {
                            // The first failure of an event is news; the back-off that follows is not.
                            tracing::warn!(projection = self.name(), event = %event.id, %error, ?pause, "event failed; retrying");
                        } else {
                            tracing::debug!(projection = self.name(), event = %event.id, attempt, %error, ?pause, "retrying");
                        }
                        tokio::select! {
                            // Every attempt is atomic, so stopping between two leaves nothing half done.
                            () = cancel.cancelled() => return Ok(Outcome::At(at)),
                            () = tokio::time::sleep(pause) => {}
                        }
                        attempt += 1;
                        crate::metrics::count(crate::metrics::RETRIED, self.name(), partition, 1);
                    }
                }
            }
        }
        if page.next > at {
            if !self.store.advance(self.name(), partition, at, page.next, None, self.fence.as_ref()).await? {
                return Ok(Outcome::Moved);
            }
            at = page.next;
        }
        Ok(Outcome::At(at))
    }

    /// Parks an event the store cannot decode as a dead letter (its raw columns stay in the event
    /// store), or, when not even its id or stream can be read, moves the checkpoint past it
    /// with an error in the log. Under [`OnFailure::Stop`] the projection stops at it instead.
    async fn park_unreadable(&self, at: Position, bad: &annal_eventstore::UnreadableEvent) -> Result<bool> {
        let reason = format!("the stored event cannot be read: {}", bad.reason);
        if self.options.on_failure == OnFailure::Stop {
            return Err(Error::Stopped {
                projection: self.name().to_owned(),
                event_id: bad.id.unwrap_or_default(),
                position: bad.position,
                attempts: 1,
                reason,
            });
        }
        tracing::warn!(projection = self.name(), position = %bad.position, stream = %bad.stream, %reason,
            "parking an unreadable event");
        match bad.stand_in() {
            Some(event) => self.park(at, &event, &reason, 1).await,
            None => {
                tracing::error!(projection = self.name(), position = %bad.position, %reason,
                    "an unreadable event without a readable id or stream cannot be parked; passing it");
                self.store
                    .advance(self.name(), self.options.partition, at, bad.position, None, self.fence.as_ref())
                    .await
            }
        }
    }

    /// Parks `event` behind an earlier parked event of its stream, without trying it.
    async fn park_behind(&self, at: Position, event: &RecordedEvent) -> Result<bool> {
        let reason = format!("parked behind an earlier parked event of stream {}", event.stream);
        self.park(at, event, &reason, 0).await
    }

    async fn park(&self, at: Position, event: &RecordedEvent, error: &str, attempts: u32) -> Result<bool> {
        let park = Park { event, error, attempts };
        crate::metrics::count(crate::metrics::PARKED, self.name(), self.options.partition, 1);
        self.store.park(self.name(), self.options.partition, at, park, self.fence.as_ref()).await
    }
}

/// Why a batch with a stream that has a parked event goes event by event.
const BLOCKED: &str = "a stream of the batch has a parked event";

/// Errors that no retry can cure: the event cannot even be decoded. They are parked (or stop the
/// projection) at once instead of after every back-off.
fn is_permanent(error: &annal_eventstore::BoxError) -> bool {
    matches!(
        error.downcast_ref::<annal_eventstore::Error>(),
        Some(annal_eventstore::Error::Decode { .. } | annal_eventstore::Error::Corrupt { .. })
    )
}
