//! Checkpoints and dead letters in SQLite, in the event store's file; exactly-once effect
//! through one transaction for read model and checkpoint.

use annal_eventstore::convert::{to_i64, to_u64};
use annal_eventstore::{Position, RecordedEvent, SqliteEventStore, StreamName};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};

use crate::projection::Tx;
use crate::queries;
use crate::rebuilds::{RebuildMode, RebuildOutcome, RebuildProgress, RebuildUpdate};
use crate::sql_store::sql_projection_store;
use crate::store::{Applied, Checkpoint, Control, DeadLetter, DedupStore, Fence, Lease, Park, Pause, ProjectionStore};
use crate::{Projection, Result};

/// Checkpoints and dead letters in SQLite, beside a [`SqliteEventStore`]'s events, written
/// through its one writer connection.
///
/// For [`crate::Delivery::ExactlyOnce`] projections, the handler gets [`Tx::Sqlite`]: its
/// writes and the checkpoint's move commit in one transaction.
#[derive(Clone, Debug)]
pub struct SqliteProjectionStore {
    pool: SqlitePool,
}

impl SqliteProjectionStore {
    /// Uses the event store's pool, creating or upgrading the tables first.
    ///
    /// # Errors
    /// Store errors when migrating.
    pub async fn new(events: &SqliteEventStore) -> Result<Self> {
        events.migrate(&migrator()).await?;
        Ok(SqliteProjectionStore { pool: events.writer().clone() })
    }

    /// Uses the event store's pool without migrating: the tables must be up to date already.
    /// With a store opened by [`SqliteEventStore::open_read_only`], nothing can be written.
    ///
    /// # Errors
    /// [`annal_eventstore::Error::NotMigrated`] (as [`crate::Error::Store`]) if migrations are
    /// missing; store errors if the file cannot be read.
    pub async fn migrated(events: &SqliteEventStore) -> Result<Self> {
        events.check_migrated(&migrator()).await?;
        Ok(SqliteProjectionStore { pool: events.writer().clone() })
    }
}

/// The projection store's migrations, with a history of their own beside the event store's.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.dangerous_set_table_name("annal_projection_migrations");
    migrator
}

/// SQLite has no server to end a frozen writer's transaction: nothing to set. (A writer frozen
/// mid-batch holds the file's write lock; see docs/projections.md, "Pauses".)
fn batch_begin(_: Option<&Fence>) -> &'static str {
    "BEGIN IMMEDIATE"
}

/// SQLite's clock (that of the machine holding the file), in microseconds since the epoch.
macro_rules! now_micros {
    () => {
        "CAST(unixepoch('subsec') * 1000000 AS INTEGER)"
    };
}

/// Starts projection ?1's rebuild record for owner ?2, mode ?3, stale after ?4 ms, replacing
/// any earlier one; stamped with SQLite's clock.
const REBUILD_START: &str = concat!(
    "INSERT INTO annal_rebuilds (projection, owner, mode, started_at, updated_at, outcome, stale_after_ms) \
     VALUES (?1, ?2, ?3, ",
    now_micros!(),
    ", ",
    now_micros!(),
    ", 'running', ?4) ON CONFLICT (projection) DO UPDATE SET owner = excluded.owner, mode = excluded.mode, \
     started_at = excluded.started_at, updated_at = excluded.updated_at, total = 0, done = 0, rate = 0, \
     eta_seconds = NULL, outcome = excluded.outcome, reason = NULL, stale_after_ms = excluded.stale_after_ms"
);

/// Writes the figures (?3 to ?8) of projection ?1's rebuild record if owner ?2 still has it.
const REBUILD_UPDATE: &str = concat!(
    "UPDATE annal_rebuilds SET total = ?3, done = ?4, rate = ?5, eta_seconds = ?6, outcome = ?7, reason = ?8, \
     updated_at = ",
    now_micros!(),
    " WHERE projection = ?1 AND owner = ?2"
);

/// Every rebuild record, with its age in seconds by SQLite's clock.
const REBUILDS: &str = concat!(
    "SELECT projection, owner, mode, started_at, updated_at, total, done, rate, eta_seconds, outcome, reason, \
     stale_after_ms, CAST(",
    now_micros!(),
    " - updated_at AS REAL) / 1000000.0 FROM annal_rebuilds ORDER BY projection"
);

sql_projection_store! {
    store: SqliteProjectionStore,
    connection: SqliteConnection,
    row: SqliteRow,
    tx: Sqlite,
    begin: "BEGIN IMMEDIATE",
    sql: spelled,
    batch: queries::SQLITE_BATCH, streams: streams,
    int: i64,
    time: i64, to_time: micros_since_epoch, from_time: micros,
    clock {
    async fn acquire_lease(
        &self,
        projection: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>> {
        // A projection paused for another runner gives no lease.
        let now = Utc::now().timestamp_micros();
        let token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO annal_leases (projection, partition, owner, token, expires_at) SELECT ?1, ?2, ?3, 1, ?4 + ?5 \
             WHERE NOT EXISTS (SELECT 1 FROM annal_projection_control c \
                               WHERE c.projection = ?1 AND c.paused_by IS NOT NULL AND c.paused_by <> ?3) \
             ON CONFLICT (projection, partition) DO UPDATE \
                 SET owner = excluded.owner, token = annal_leases.token + 1, expires_at = excluded.expires_at \
                 WHERE annal_leases.expires_at < ?4 OR annal_leases.owner = excluded.owner \
             RETURNING token",
        )
        .bind(projection)
        .bind(i64::from(partition))
        .bind(owner)
        .bind(now)
        .bind(micros_of(ttl))
        .fetch_optional(&self.pool)
        .await?;
        Ok(token.map(|token| Fence { owner: owner.to_owned(), token: to_u64(token), lease: ttl }))
    }

    async fn renew_lease(&self, projection: &str, partition: u32, fence: &Fence, ttl: Duration) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE annal_leases SET expires_at = ?5 WHERE projection = ?1 AND partition = ?2 AND owner = ?3 AND token = ?4",
        )
        .bind(projection)
        .bind(i64::from(partition))
        .bind(&fence.owner)
        .bind(to_i64(fence.token))
        .bind(Utc::now().timestamp_micros() + micros_of(ttl))
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release_lease(&self, projection: &str, partition: u32, fence: &Fence) -> Result<()> {
        sqlx::query(
            "UPDATE annal_leases SET expires_at = 0 WHERE projection = ?1 AND partition = ?2 AND owner = ?3 AND token = ?4",
        )
        .bind(projection)
        .bind(i64::from(partition))
        .bind(&fence.owner)
        .bind(to_i64(fence.token))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn register_runner(&self, projection: &str, owner: &str, ttl: Duration) -> Result<usize> {
        let now = Utc::now().timestamp_micros();
        sqlx::query(
            "INSERT INTO annal_runners (projection, owner, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (projection, owner) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(projection)
        .bind(owner)
        .bind(now + micros_of(ttl))
        .execute(&self.pool)
        .await?;
        let live: i64 =
            sqlx::query_scalar("SELECT count(*) FROM annal_runners WHERE projection = ?1 AND expires_at >= ?2")
                .bind(projection)
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
        Ok(usize::try_from(live).unwrap_or(1))
    }
    }
}

/// The streams of a batch, bound as a JSON array (SQLite has no arrays).
fn streams(events: &[RecordedEvent]) -> String {
    serde_json::to_string(&events.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>()).unwrap_or_default()
}

/// A query of [`queries`] in SQLite's spelling (`?n` for `$n`).
fn spelled(query: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(query.replace('$', "?"))
}

fn micros_since_epoch(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

fn micros(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(value).unwrap_or_default()
}

fn micros_of(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[async_trait]
impl DedupStore for SqliteProjectionStore {
    async fn is_recorded(&self, consumer: &str, event_id: uuid::Uuid) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM annal_dedup WHERE consumer = ?1 AND event_id = ?2")
            .bind(consumer)
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn record(&self, consumer: &str, event_id: uuid::Uuid) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO annal_dedup (consumer, event_id, recorded_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(event_id)
        .bind(Utc::now().timestamp_micros())
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn prune(&self, consumer: &str, retention: Duration) -> Result<u64> {
        let cutoff = Utc::now().timestamp_micros() - micros_of(retention);
        let pruned = sqlx::query("DELETE FROM annal_dedup WHERE consumer = ?1 AND recorded_at < ?2")
            .bind(consumer)
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(pruned.rows_affected())
    }
}
