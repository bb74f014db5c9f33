//! Checkpoints and dead letters in PostgreSQL, in the event store's database; exactly-once
//! effect through one transaction for read model and checkpoint.

use annal_eventstore::convert::{to_i64, to_u64};
use annal_eventstore::{PgEventStore, Position, RecordedEvent, StreamName};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgRow};

use crate::projection::Tx;
use crate::queries;
use crate::rebuilds::{RebuildMode, RebuildOutcome, RebuildProgress, RebuildUpdate};
use crate::sql_store::sql_projection_store;
use crate::store::{Applied, Checkpoint, Control, DeadLetter, DedupStore, Fence, Lease, Park, Pause, ProjectionStore};
use crate::{Error, Projection, Result};

/// Checkpoints and dead letters in PostgreSQL, beside a [`PgEventStore`]'s events.
///
/// For [`crate::Delivery::ExactlyOnce`] projections, the handler gets [`Tx::Postgres`]: its
/// writes and the checkpoint's move commit in one transaction.
#[derive(Clone, Debug)]
pub struct PgProjectionStore {
    pool: PgPool,
}

impl PgProjectionStore {
    /// Uses the event store's pool, creating or upgrading the tables first.
    ///
    /// # Errors
    /// Store errors when migrating.
    pub async fn new(events: &PgEventStore) -> Result<Self> {
        let pool = events.pool().clone();
        migrator().run(&pool).await.map_err(|e| Error::Store(annal_eventstore::Error::Backend(Box::new(e))))?;
        Ok(PgProjectionStore { pool })
    }

    /// Uses the event store's pool without migrating or writing anything: the tables must be up
    /// to date already. A role with `SELECT` rights alone can read checkpoints, leases and dead
    /// letters through it.
    ///
    /// # Errors
    /// [`annal_eventstore::Error::NotMigrated`] (as [`Error::Store`]) if migrations are missing;
    /// store errors if the database cannot be read.
    pub async fn migrated(events: &PgEventStore) -> Result<Self> {
        events.check_migrated(&migrator()).await?;
        Ok(PgProjectionStore { pool: events.pool().clone() })
    }
}

/// The projection store's migrations, with a history of their own beside the event store's.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.dangerous_set_table_name("annal_projection_migrations");
    migrator
}

/// The statement that opens a batch's transaction. A lease holder's is bounded on the server
/// (see [`crate::batch_timeouts`]): ended if it sits idle, or runs one statement, for longer.
/// The bounds are set in the same simple-query message as the `BEGIN`, so they cost no round
/// trip of their own; the text holds nothing but numbers this code formats.
fn batch_begin(fence: Option<&Fence>) -> sqlx::AssertSqlSafe<String> {
    let Some(fence) = fence else { return sqlx::AssertSqlSafe("BEGIN".to_owned()) };
    let (idle, statement) = crate::store::batch_timeouts(fence.lease);
    let ms = |d: Duration| d.as_millis().max(1);
    sqlx::AssertSqlSafe(format!(
        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}; SET LOCAL statement_timeout = {}",
        ms(idle),
        ms(statement)
    ))
}

/// Starts projection $1's rebuild record for owner $2, mode $3, stale after $4 ms, replacing
/// any earlier one; stamped with the server's clock.
const REBUILD_START: &str = "INSERT INTO annal_rebuilds (projection, owner, mode, started_at, updated_at, \
     outcome, stale_after_ms) VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp(), 'running', $4) \
     ON CONFLICT (projection) DO UPDATE SET owner = excluded.owner, mode = excluded.mode, \
     started_at = excluded.started_at, updated_at = excluded.updated_at, total = 0, done = 0, rate = 0, \
     eta_seconds = NULL, outcome = excluded.outcome, reason = NULL, stale_after_ms = excluded.stale_after_ms";

/// Writes the figures ($3 to $8) of projection $1's rebuild record if owner $2 still has it.
const REBUILD_UPDATE: &str = "UPDATE annal_rebuilds SET total = $3, done = $4, rate = $5, eta_seconds = $6, \
     outcome = $7, reason = $8, updated_at = clock_timestamp() WHERE projection = $1 AND owner = $2";

/// Every rebuild record, with its age in seconds by the server's clock.
const REBUILDS: &str = "SELECT projection, owner, mode, started_at, updated_at, total, done, rate, eta_seconds, \
     outcome, reason, stale_after_ms, extract(epoch FROM clock_timestamp() - updated_at)::float8 \
     FROM annal_rebuilds ORDER BY projection";

sql_projection_store! {
    store: PgProjectionStore,
    connection: PgConnection,
    row: PgRow,
    tx: Postgres,
    begin: "BEGIN",
    sql: spelled,
    batch: queries::POSTGRES_BATCH, streams: streams,
    int: i32,
    time: DateTime<Utc>, to_time: stored, from_time: stored,
    clock {
    async fn acquire_lease(
        &self,
        projection: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>> {
        // The database's clock decides expiry, so runners on machines whose clocks disagree
        // still agree on who holds what. A projection paused for another runner gives no lease.
        let token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO annal_leases (projection, partition, owner, token, expires_at) \
             SELECT $1, $2, $3, 1, clock_timestamp() + $4 * interval '1 millisecond' \
             WHERE NOT EXISTS (SELECT 1 FROM annal_projection_control c \
                               WHERE c.projection = $1 AND c.paused_by IS NOT NULL AND c.paused_by <> $3) \
             ON CONFLICT (projection, partition) DO UPDATE \
                 SET owner = excluded.owner, token = annal_leases.token + 1, expires_at = excluded.expires_at \
                 WHERE annal_leases.expires_at < clock_timestamp() OR annal_leases.owner = excluded.owner \
             RETURNING token",
        )
        .bind(projection)
        .bind(i32::try_from(partition).unwrap_or(i32::MAX))
        .bind(owner)
        .bind(ttl.as_secs_f64() * 1e3)
        .fetch_optional(&self.pool)
        .await?;
        Ok(token.map(|token| Fence { owner: owner.to_owned(), token: to_u64(token), lease: ttl }))
    }

    async fn renew_lease(&self, projection: &str, partition: u32, fence: &Fence, ttl: Duration) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE annal_leases SET expires_at = clock_timestamp() + $5 * interval '1 millisecond' \
             WHERE projection = $1 AND partition = $2 AND owner = $3 AND token = $4",
        )
        .bind(projection)
        .bind(i32::try_from(partition).unwrap_or(i32::MAX))
        .bind(&fence.owner)
        .bind(to_i64(fence.token))
        .bind(ttl.as_secs_f64() * 1e3)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release_lease(&self, projection: &str, partition: u32, fence: &Fence) -> Result<()> {
        sqlx::query(
            "UPDATE annal_leases SET expires_at = clock_timestamp() - interval '1 second' \
             WHERE projection = $1 AND partition = $2 AND owner = $3 AND token = $4",
        )
        .bind(projection)
        .bind(i32::try_from(partition).unwrap_or(i32::MAX))
        .bind(&fence.owner)
        .bind(to_i64(fence.token))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn register_runner(&self, projection: &str, owner: &str, ttl: Duration) -> Result<usize> {
        // The database's clock, as for leases: runners' clocks may disagree.
        sqlx::query(
            "INSERT INTO annal_runners (projection, owner, expires_at) \
             VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond') \
             ON CONFLICT (projection, owner) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(projection)
        .bind(owner)
        .bind(ttl.as_secs_f64() * 1e3)
        .execute(&self.pool)
        .await?;
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM annal_runners WHERE projection = $1 AND expires_at >= clock_timestamp()",
        )
        .bind(projection)
        .fetch_one(&self.pool)
        .await?;
        Ok(usize::try_from(live).unwrap_or(1))
    }
    }
}

/// The streams of a batch, bound as a `text[]`.
fn streams(events: &[RecordedEvent]) -> Vec<&str> {
    events.iter().map(|e| e.stream.as_str()).collect()
}

/// The queries are written in PostgreSQL's spelling.
fn spelled(query: &'static str) -> &'static str {
    query
}

/// Timestamps are stored as they are (`timestamptz`).
fn stored(time: DateTime<Utc>) -> DateTime<Utc> {
    time
}

#[async_trait]
impl DedupStore for PgProjectionStore {
    async fn is_recorded(&self, consumer: &str, event_id: uuid::Uuid) -> Result<bool> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM annal_dedup WHERE consumer = $1 AND event_id = $2")
            .bind(consumer)
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn record(&self, consumer: &str, event_id: uuid::Uuid) -> Result<bool> {
        let inserted =
            sqlx::query("INSERT INTO annal_dedup (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(consumer)
                .bind(event_id)
                .execute(&self.pool)
                .await?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn prune(&self, consumer: &str, retention: Duration) -> Result<u64> {
        let pruned = sqlx::query(
            "DELETE FROM annal_dedup WHERE consumer = $1 AND recorded_at < clock_timestamp() - $2 * interval '1 millisecond'",
        )
        .bind(consumer)
        .bind(retention.as_secs_f64() * 1e3)
        .execute(&self.pool)
        .await?;
        Ok(pruned.rows_affected())
    }
}
