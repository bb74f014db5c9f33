//! Wake-ups across processes: one coalesced `NOTIFY` per process, outside append transactions.
//!
//! `pg_notify` inside an append's transaction takes a cluster-wide lock held through the commit
//! flush and serialises every writer (measured here: −32% throughput at 4 writers, −63% at 16).
//! Instead, appends only flag that something was committed; one task per store sends at most
//! one `NOTIFY` per interval, by one prepared statement on a connection of its own (outside the
//! pool, `synchronous_commit = off` for the session), and every
//! store listening in any process turns it into a local wake-up. A lost notification costs only
//! latency: subscribers still poll at their safety-net interval.
//!
//! The `NOTIFY` payload is the furthest position the store committed and the store's own random
//! id (`transaction.sequence.origin`), so that a woken subscriber knows when it has read what
//! was announced and need not re-poll (`crate::follower`), and a store ignores its own echo (its
//! subscribers were woken when it committed); an empty or unreadable payload is a wake-up that
//! did not say.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgListener, PgPool};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Position;
use crate::subscription::Notifier;

/// The channel every store of a database uses.
const CHANNEL: &str = "annal_events";

/// The shortest gap between two `NOTIFY`s sent by one process.
const MIN_INTERVAL: Duration = Duration::from_millis(2);

/// Owns the listening and announcing tasks; they stop when it is dropped.
#[derive(Debug)]
pub(super) struct Announcer {
    pending: Arc<Notify>,
    /// The furthest position committed by this process.
    up_to: Arc<Mutex<Position>>,
    enabled: AtomicBool,
    cancel: CancellationToken,
}

impl Announcer {
    pub(super) fn start(pool: PgPool, notifier: Notifier) -> Self {
        let pending = Arc::new(Notify::new());
        let up_to = Arc::new(Mutex::new(Position::START));
        let cancel = CancellationToken::new();
        let origin = uuid::Uuid::new_v4().as_u64_pair().0;
        tokio::spawn(listen(pool.clone(), notifier, origin, cancel.clone()));
        tokio::spawn(announce(pool, pending.clone(), up_to.clone(), origin, cancel.clone()));
        Announcer { pending, up_to, enabled: AtomicBool::new(true), cancel }
    }

    /// Flags a commit of events up to `position`; cheap, never waits. Flags coalesce until the
    /// next `NOTIFY`.
    pub(super) fn announce(&self, position: Position) {
        if self.enabled.load(Ordering::Relaxed) {
            let mut up_to = self.up_to.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *up_to = (*up_to).max(position);
            drop(up_to);
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

async fn announce(
    pool: PgPool,
    pending: Arc<Notify>,
    up_to: Arc<Mutex<Position>>,
    origin: u64,
    cancel: CancellationToken,
) {
    // A connection of its own, outside the pool, with asynchronous commits for the session: a
    // wake-up is then one prepared statement, and never waits for a pool connection or a flush.
    let mut connection: Option<PgConnection> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = pending.notified() => {}
        }
        let started = tokio::time::Instant::now();
        let position = *up_to.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = send(&pool, &mut connection, position, origin).await {
            if pool.is_closed() {
                break;
            }
            tracing::debug!(%error, "could not send the wake-up NOTIFY; other processes will poll");
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(started + MIN_INTERVAL) => {}
        }
    }
    if let Some(conn) = connection {
        let _ = conn.close().await;
    }
}

async fn announcing_connection(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let mut conn = pool.connect_options().connect().await?;
    sqlx::raw_sql("SET synchronous_commit TO off").execute(&mut conn).await?;
    Ok(conn)
}

/// Sends one wake-up on `connection`, connecting first if there is none; a connection that
/// fails (the server restarted, an operator ended the session) is replaced and the wake-up sent
/// again on the new one, so that losing it does not also lose the wake-up.
async fn send(
    pool: &PgPool,
    connection: &mut Option<PgConnection>,
    position: Position,
    origin: u64,
) -> Result<(), sqlx::Error> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let conn = match connection {
            Some(conn) => conn,
            None => connection.insert(announcing_connection(pool).await?),
        };
        let sent =
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload(position, origin)).execute(conn).await;
        match sent {
            Ok(_) => return Ok(()),
            Err(error) => {
                *connection = None;
                if attempts == 2 {
                    return Err(error);
                }
            }
        }
    }
}

async fn listen(pool: PgPool, notifier: Notifier, origin: u64, cancel: CancellationToken) {
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
                    Ok(Some(notification)) => match parse_payload(notification.payload()) {
                        Some((_, from)) if from == origin => {}
                        Some((position, _)) => notifier.notify_up_to(position),
                        None => notifier.notify(),
                    },
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

/// The `NOTIFY` payload announcing events up to `position`, committed by the store `origin`.
fn payload(position: Position, origin: u64) -> String {
    format!("{}.{}.{origin}", position.transaction(), position.sequence())
}

/// The position a `NOTIFY` payload announces and the store that sent it; `None` for one that
/// does not say (empty, or from another program).
fn parse_payload(payload: &str) -> Option<(Position, u64)> {
    let mut parts = payload.split('.');
    let mut next = || parts.next()?.parse::<u64>().ok();
    let parsed = (Position::new(next()?, next()?), next()?);
    parts.next().is_none().then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_anything_else_says_nothing() {
        for position in [Position::START, Position::new(734, 2), Position::new(u64::MAX, u64::MAX)] {
            for origin in [0, 42, u64::MAX] {
                assert_eq!(parse_payload(&payload(position, origin)), Some((position, origin)));
            }
        }
        for other in ["", "7", "7.1", "7.1.", ".7.1", "a.b.c", "1.2.3.4", "-1.2.3", "18446744073709551616.0.1"] {
            assert_eq!(parse_payload(other), None, "{other:?}");
        }
    }
}
