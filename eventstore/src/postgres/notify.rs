//! Wake-ups across processes: one coalesced `NOTIFY` per process, outside append transactions.
//!
//! `pg_notify` inside an append's transaction takes a cluster-wide lock held through the commit
//! flush and serialises every writer (measured here: −32% throughput at 4 writers, −63% at 16).
//! Instead, appends only flag that something was committed; one task per store sends at most
//! one `NOTIFY` per interval, in its own transaction with `synchronous_commit = off`, and every
//! store listening in any process turns it into a local wake-up. A lost notification costs only
//! latency: subscribers still poll at their safety-net interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::subscription::Notifier;

/// The channel every store of a database uses.
const CHANNEL: &str = "annal_events";

/// The shortest gap between two `NOTIFY`s sent by one process.
const MIN_INTERVAL: Duration = Duration::from_millis(2);

/// Owns the listening and announcing tasks; they stop when it is dropped.
#[derive(Debug)]
pub(super) struct Announcer {
    pending: Arc<Notify>,
    enabled: AtomicBool,
    cancel: CancellationToken,
}

impl Announcer {
    pub(super) fn start(pool: PgPool, notifier: Notifier) -> Self {
        let pending = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        tokio::spawn(listen(pool.clone(), notifier, cancel.clone()));
        tokio::spawn(announce(pool, pending.clone(), cancel.clone()));
        Announcer { pending, enabled: AtomicBool::new(true), cancel }
    }

    /// Flags a commit; cheap, never waits. Flags coalesce until the next `NOTIFY`.
    pub(super) fn announce(&self) {
        if self.enabled.load(Ordering::Relaxed) {
            self.pending.notify_one();
        }
    }

    /// Turns sending `NOTIFY` on or off; listening goes on either way.
    pub(super) fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub(super) fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn announce(pool: PgPool, pending: Arc<Notify>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = pending.notified() => {}
        }
        let started = tokio::time::Instant::now();
        let sent =
            sqlx::raw_sql("BEGIN; SET LOCAL synchronous_commit TO off; SELECT pg_notify('annal_events', ''); COMMIT;")
                .execute(&pool)
                .await;
        if let Err(error) = sent {
            if pool.is_closed() {
                return;
            }
            tracing::debug!(%error, "could not send the wake-up NOTIFY; other processes will poll");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(started + MIN_INTERVAL) => {}
        }
    }
}

async fn listen(pool: PgPool, notifier: Notifier, cancel: CancellationToken) {
    let mut retry = Duration::from_millis(100);
    while !cancel.is_cancelled() && !pool.is_closed() {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "could not LISTEN for wake-ups; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        retry = Duration::from_millis(100);
        // Anything committed while not listening is caught by this wake-up.
        notifier.notify();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => notifier.notify(),
                    // The connection was lost; `try_recv` reconnects on the next call.
                    Ok(None) => notifier.notify(),
                    Err(error) => {
                        tracing::debug!(%error, "lost the wake-up listener; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
