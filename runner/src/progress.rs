//! The rebuild record a rebuilding process publishes (see `annal_projections::RebuildProgress`):
//! its figures every [`EVERY`], and how it ended, so that `status` and the console of any
//! process show the rebuild, and show it stale if this process dies without a word.
//!
//! The record is written by a task of its own, not from the replay loop: every step of a
//! rebuild can be long (waiting for other runners to let go, counting millions of events, the
//! swap's copy of a large shadow table), and a record left unwritten through one of them would
//! look like a dead process. So stale means what it says: the process stopped writing. The
//! [`Publisher`] owns the task: [`Publisher::end`] stops it (after its current write) before the
//! last write, so no figure can overwrite the outcome, and dropping the publisher aborts it.
//!
//! A failed write is logged once and otherwise ignored: the record is for eyes, and a rebuild
//! must not fail because it could not say how far it got.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use annal_projections::{ProjectionStore, RebuildMode, RebuildOutcome, RebuildUpdate};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How often the record is written while the rebuild runs.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// One rebuild's record, as this process writes it.
pub(crate) struct Publisher {
    figures: Arc<Mutex<Figures>>,
    stop: Option<oneshot::Sender<()>>,
    writer: Option<JoinHandle<Writer>>,
}

/// What the replay has reported so far.
struct Figures {
    began: Instant,
    /// Events already replayed when this process began (a resumed shadow rebuild starts part
    /// way), so the rate is this process's own.
    first_done: Option<u64>,
    latest: RebuildUpdate,
}

/// Writes the record, warning once if it cannot.
struct Writer {
    store: Arc<dyn ProjectionStore>,
    projection: String,
    owner: String,
    warned: bool,
}

impl Publisher {
    /// Starts the record of `projection`'s rebuild by `owner` (stale once unwritten for the
    /// larger of `lease` and three writes), and the task that writes it every [`EVERY`].
    pub(crate) async fn start(
        store: Arc<dyn ProjectionStore>,
        projection: &str,
        owner: &str,
        mode: RebuildMode,
        lease: Duration,
    ) -> Publisher {
        let mut writer = Writer { store, projection: projection.to_owned(), owner: owner.to_owned(), warned: false };
        let stale_after = annal_projections::rebuild_stale_after(lease, EVERY);
        if let Err(error) = writer.store.start_rebuild(projection, owner, mode, stale_after).await {
            writer.warn(&error);
        }
        let figures = Arc::new(Mutex::new(Figures {
            began: Instant::now(),
            first_done: None,
            latest: RebuildUpdate { total: 0, done: 0, rate: 0.0, eta: None, outcome: RebuildOutcome::Running },
        }));
        let (stop, mut stopped) = oneshot::channel();
        let shared = figures.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await; // The first tick is at once: the record was just started.
            loop {
                tokio::select! {
                    _ = &mut stopped => return writer,
                    _ = every.tick() => {
                        let update = lock(&shared).latest.clone();
                        writer.write(&update).await;
                    }
                }
            }
        });
        Publisher { figures, stop: Some(stop), writer: Some(task) }
    }

    /// Notes that `done` of `total` events are replayed, for the next write.
    pub(crate) fn progress(&self, done: u64, total: u64) {
        let mut figures = lock(&self.figures);
        let first = *figures.first_done.get_or_insert(done);
        let seconds = figures.began.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 { done.saturating_sub(first) as f64 / seconds } else { 0.0 };
        let left = total.saturating_sub(done) as f64;
        let eta = (rate > 0.0).then(|| Duration::try_from_secs_f64(left / rate).unwrap_or(Duration::MAX));
        figures.latest = RebuildUpdate { total, done, rate, eta, outcome: RebuildOutcome::Running };
    }

    /// Stops the periodic writes, then writes how the rebuild ended, with the last figures.
    pub(crate) async fn end(mut self, outcome: RebuildOutcome) {
        let mut update = lock(&self.figures).latest.clone();
        if outcome != RebuildOutcome::Running {
            update.eta = None;
        }
        update.outcome = outcome;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.writer.take() else { return };
        match task.await {
            Ok(mut writer) => writer.write(&update).await,
            Err(error) => tracing::warn!(%error, "the rebuild record's writer failed: its outcome is not recorded"),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = &self.writer {
            task.abort();
        }
    }
}

impl Writer {
    async fn write(&mut self, update: &RebuildUpdate) {
        match self.store.update_rebuild(&self.projection, &self.owner, update).await {
            Ok(true) => {}
            Ok(false) => {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(projection = %self.projection, "another rebuild of this projection has \
                        started since this one: its record is no longer this process's to write");
                }
            }
            Err(error) => self.warn(&error),
        }
    }

    fn warn(&mut self, error: &annal_projections::Error) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(projection = %self.projection, error = %crate::observe::chain(error),
                "cannot write the rebuild record: status and the console will not show this rebuild's progress");
        }
    }
}

fn lock(figures: &Mutex<Figures>) -> MutexGuard<'_, Figures> {
    figures.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use annal_projections::MemoryProjectionStore;

    async fn record(store: &MemoryProjectionStore) -> annal_projections::RebuildProgress {
        store.rebuilds().await.unwrap().pop().expect("a record")
    }

    /// Polls until `done` holds for the record.
    async fn until(
        store: &MemoryProjectionStore,
        what: &str,
        done: impl Fn(&annal_projections::RebuildProgress) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&record(store).await) {
            assert!(Instant::now() < deadline, "never saw {what}: {:?}", record(store).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_record_is_written_without_new_figures_and_ends_with_the_outcome() {
        let store = Arc::new(MemoryProjectionStore::new());
        let publisher = Publisher::start(store.clone(), "ledger", "me", RebuildMode::Shadow, EVERY).await;
        let started = record(&store).await;
        assert_eq!(started.stale_after, EVERY * 3);
        publisher.progress(5, 10);
        until(&store, "the figures written", |r| r.update.done == 5 && r.update.total == 10).await;
        // No new figures (a long step: a drain, a count, the swap): the record is still written.
        let written = record(&store).await.updated_at;
        until(&store, "a write without new figures", |r| r.updated_at > written).await;
        publisher.end(RebuildOutcome::SwappedIn).await;
        let ended = record(&store).await;
        assert_eq!((ended.update.outcome, ended.update.done, ended.update.eta), (RebuildOutcome::SwappedIn, 5, None));
    }
}
