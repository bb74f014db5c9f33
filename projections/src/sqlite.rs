//! Checkpoints and dead letters in SQLite, in the event store's file; exactly-once effect
//! through one transaction for read model and checkpoint.

use annal_eventstore::{Position, RecordedEvent, SqliteEventStore, StreamName};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};

use crate::projection::Tx;
use crate::sql::{self, to_i64, to_u64};
use crate::store::{Applied, Checkpoint, DeadLetter, DedupStore, Fence, Lease, Park, ProjectionStore};
use crate::{Error, Projection, Result};

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
        let pool = events.writer().clone();
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name("annal_projection_migrations");
        SqliteEventStore::run_migrations(&migrator, &pool)
            .await
            .map_err(|e| Error::Store(annal_eventstore::Error::Backend(Box::new(e))))?;
        Ok(SqliteProjectionStore { pool })
    }
}

async fn advance_on(
    conn: &mut SqliteConnection,
    projection: &str,
    partition: u32,
    from: Position,
    to: Position,
    last: Option<DateTime<Utc>>,
    fence: Option<&Fence>,
) -> Result<bool> {
    let (owner, token) = (fence.map(|f| f.owner.as_str()), fence.map(|f| to_i64(f.token)));
    let now = Utc::now().timestamp_micros();
    let last = last.map(|t| t.timestamp_micros());
    let partition = i64::from(partition);
    let updated = sqlx::query(sql::sqlite(sql::ADVANCE))
        .bind(projection)
        .bind(partition)
        .bind(to_i64(to.transaction()))
        .bind(to_i64(to.sequence()))
        .bind(to_i64(from.transaction()))
        .bind(to_i64(from.sequence()))
        .bind(now)
        .bind(last)
        .bind(owner)
        .bind(token)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if updated == 1 || from != Position::START {
        return Ok(updated == 1);
    }
    let created = sqlx::query(sql::sqlite(sql::CREATE))
        .bind(projection)
        .bind(partition)
        .bind(to_i64(to.transaction()))
        .bind(to_i64(to.sequence()))
        .bind(now)
        .bind(last)
        .bind(owner)
        .bind(token)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(created == 1)
}

fn dead_letter(row: &SqliteRow) -> Result<DeadLetter> {
    let stream: String = row.try_get("stream")?;
    Ok(DeadLetter {
        id: row.try_get("id")?,
        projection: row.try_get("projection")?,
        partition: u32::try_from(row.try_get::<i64, _>("partition")?).unwrap_or_default(),
        event_id: row.try_get("event_id")?,
        stream: StreamName::new(&stream)?,
        version: to_u64(row.try_get("version")?),
        position: Position::new(to_u64(row.try_get("position_tx")?), to_u64(row.try_get("position_seq")?)),
        error: row.try_get("error")?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or_default(),
        parked_at: micros(row.try_get("parked_at")?),
    })
}

#[async_trait]
impl ProjectionStore for SqliteProjectionStore {
    async fn checkpoint(&self, projection: &str, partition: u32) -> Result<Option<Checkpoint>> {
        let row = sqlx::query(sql::sqlite(sql::CHECKPOINT))
            .bind(projection)
            .bind(i64::from(partition))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(Checkpoint {
                position: Position::new(to_u64(row.try_get(0)?), to_u64(row.try_get(1)?)),
                updated_at: micros(row.try_get(2)?),
                last_recorded_at: row.try_get::<Option<i64>, _>(3)?.map(micros),
                latency_p99: row.try_get::<Option<i64>, _>(4)?.map(|us| Duration::from_micros(to_u64(us))),
            })
        })
        .transpose()
    }

    async fn advance(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        to: Position,
        last_recorded_at: Option<DateTime<Utc>>,
        fence: Option<&Fence>,
    ) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        advance_on(&mut conn, projection, partition, from, to, last_recorded_at, fence).await
    }

    async fn apply(
        &self,
        projection: &dyn Projection,
        partition: u32,
        from: Position,
        to: Position,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Applied> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // The checkpoint moves first: its row lock makes a second worker on this partition wait
        // here, then find the checkpoint moved and apply nothing.
        let last = events.last().map(|e| e.recorded_at);
        if !advance_on(&mut tx, projection.name(), partition, from, to, last, fence).await? {
            return Ok(Applied::Moved);
        }
        if let Err(error) = projection.handle(events, &mut Tx::Sqlite(&mut tx)).await {
            tx.rollback().await?;
            return Ok(Applied::Failed(error));
        }
        tx.commit().await?;
        Ok(Applied::Committed)
    }

    async fn park(
        &self,
        projection: &str,
        partition: u32,
        from: Position,
        park: Park<'_>,
        fence: Option<&Fence>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let event = park.event;
        if !advance_on(&mut tx, projection, partition, from, event.position, None, fence).await? {
            return Ok(false);
        }
        sqlx::query(sql::sqlite(sql::PARK))
            .bind(projection)
            .bind(i64::from(partition))
            .bind(event.id)
            .bind(event.stream.as_str())
            .bind(to_i64(event.version))
            .bind(to_i64(event.position.transaction()))
            .bind(to_i64(event.position.sequence()))
            .bind(park.error)
            .bind(i64::from(park.attempts))
            .bind(Utc::now().timestamp_micros())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(sql::sqlite(sql::DEAD_LETTERS)).bind(projection).fetch_all(&self.pool).await?;
        rows.iter().map(dead_letter).collect()
    }

    async fn apply_dead_letter(&self, projection: &dyn Projection, id: i64, event: &RecordedEvent) -> Result<Applied> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let removed = sqlx::query(sql::sqlite(sql::REMOVE_DEAD_LETTER))
            .bind(projection.name())
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if removed == 0 {
            return Ok(Applied::Moved);
        }
        if let Err(error) = projection.handle(std::slice::from_ref(event), &mut Tx::Sqlite(&mut tx)).await {
            tx.rollback().await?;
            return Ok(Applied::Failed(error));
        }
        tx.commit().await?;
        Ok(Applied::Committed)
    }

    async fn remove_dead_letter(&self, projection: &str, id: i64) -> Result<bool> {
        let removed =
            sqlx::query(sql::sqlite(sql::REMOVE_DEAD_LETTER)).bind(projection).bind(id).execute(&self.pool).await?;
        Ok(removed.rows_affected() == 1)
    }

    async fn record_latency(&self, projection: &str, partition: u32, p99: Duration) -> Result<()> {
        sqlx::query(sql::sqlite(sql::LATENCY))
            .bind(projection)
            .bind(i64::from(partition))
            .bind(i64::try_from(p99.as_micros()).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn acquire_lease(
        &self,
        projection: &str,
        partition: u32,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>> {
        let now = Utc::now().timestamp_micros();
        let token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO annal_leases (projection, partition, owner, token, expires_at) VALUES (?1, ?2, ?3, 1, ?4 + ?5) \
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
        Ok(token.map(|token| Fence { owner: owner.to_owned(), token: to_u64(token) }))
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

    async fn leases(&self, projection: &str) -> Result<Vec<Lease>> {
        let rows = sqlx::query(sql::sqlite(sql::LEASES)).bind(projection).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(Lease {
                    partition: u32::try_from(row.try_get::<i64, _>(0)?).unwrap_or_default(),
                    owner: row.try_get(1)?,
                    token: to_u64(row.try_get(2)?),
                    expires_at: micros(row.try_get(3)?),
                })
            })
            .collect()
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

    async fn deregister_runner(&self, projection: &str, owner: &str) -> Result<()> {
        sqlx::query(sql::sqlite(sql::DEREGISTER)).bind(projection).bind(owner).execute(&self.pool).await?;
        Ok(())
    }

    async fn reset(&self, projection: &str) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(sql::sqlite(sql::RESET_CHECKPOINTS)).bind(projection).execute(&mut *tx).await?;
        sqlx::query(sql::sqlite(sql::RESET_DEAD_LETTERS)).bind(projection).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn promote(&self, shadow: &str, live: &str, statements: &[String]) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for statement in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
        }
        sqlx::query(sql::sqlite(sql::RESET_CHECKPOINTS)).bind(live).execute(&mut *tx).await?;
        sqlx::query(sql::sqlite(sql::PROMOTE_CHECKPOINTS)).bind(shadow).bind(live).execute(&mut *tx).await?;
        sqlx::query(sql::sqlite(sql::RESET_DEAD_LETTERS)).bind(live).execute(&mut *tx).await?;
        sqlx::query(sql::sqlite(sql::PROMOTE_DEAD_LETTERS)).bind(shadow).bind(live).execute(&mut *tx).await?;
        sqlx::query(sql::sqlite(sql::RESET_LEASES)).bind(shadow).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
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
