//! The rebuild record a rebuilding process publishes (see `annal_projections::RebuildProgress`):
//! its figures every [`EVERY`], and how it ended, so that `status` and the console of any
//! process show the rebuild, and show it stale if this process dies without a word.
//!
//! A failed write of the record is logged once and otherwise ignored: the record is for eyes,
//! and a rebuild must not fail because it could not say how far it got.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annal_projections::{ProjectionStore, RebuildMode, RebuildOutcome, RebuildUpdate};

/// How often the record is written while the rebuild runs.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// One rebuild's record, as this process writes it.
pub(crate) struct Publisher {
    store: Arc<dyn ProjectionStore>,
    projection: String,
    owner: String,
    began: Instant,
    /// Events already replayed when this process began (a resumed shadow rebuild starts part
    /// way), so the rate is this process's own.
    first_done: Option<u64>,
    last_write: Option<Instant>,
    latest: RebuildUpdate,
    warned: bool,
}

impl Publisher {
    /// Starts the record of `projection`'s rebuild by `owner`, stale once unwritten for the
    /// larger of `lease` and three writes.
    pub(crate) async fn start(
        store: Arc<dyn ProjectionStore>,
        projection: &str,
        owner: &str,
        mode: RebuildMode,
        lease: Duration,
    ) -> Publisher {
        let mut publisher = Publisher {
            store,
            projection: projection.to_owned(),
            owner: owner.to_owned(),
            began: Instant::now(),
            first_done: None,
            last_write: None,
            latest: RebuildUpdate { total: 0, done: 0, rate: 0.0, eta: None, outcome: RebuildOutcome::Running },
            warned: false,
        };
        let stale_after = annal_projections::rebuild_stale_after(lease, EVERY);
        if let Err(error) = publisher.store.start_rebuild(projection, owner, mode, stale_after).await {
            publisher.warn(&error);
        }
        publisher
    }

    /// Notes that `done` of `total` events are replayed; writes the record if a write is due.
    pub(crate) async fn progress(&mut self, done: u64, total: u64) {
        let first = *self.first_done.get_or_insert(done);
        let seconds = self.began.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 { done.saturating_sub(first) as f64 / seconds } else { 0.0 };
        let left = total.saturating_sub(done) as f64;
        let eta = (rate > 0.0).then(|| Duration::try_from_secs_f64(left / rate).unwrap_or(Duration::MAX));
        self.latest = RebuildUpdate { total, done, rate, eta, outcome: RebuildOutcome::Running };
        if self.last_write.is_none_or(|at| at.elapsed() >= EVERY) {
            self.last_write = Some(Instant::now());
            self.write().await;
        }
    }

    /// Writes how the rebuild ended, with the last figures noted.
    pub(crate) async fn end(mut self, outcome: RebuildOutcome) {
        if outcome != RebuildOutcome::Running {
            self.latest.eta = None;
        }
        self.latest.outcome = outcome;
        self.write().await;
    }

    async fn write(&mut self) {
        match self.store.update_rebuild(&self.projection, &self.owner, &self.latest).await {
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
