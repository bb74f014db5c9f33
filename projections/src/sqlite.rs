//! Checkpoints and dead letters in SQLite, in the event store's file; exactly-once effect
//! through one transaction for read model and checkpoint.

use annal_eventstore::{Position, RecordedEvent, SqliteEventStore, StreamName};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};

use crate::projection::Tx;
use crate::sql::{self, to_i64, to_u64};
use crate::store::{Applied, Checkpoint, DeadLetter, Park, ProjectionStore};
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
        migrator.run(&pool).await.map_err(|e| Error::Store(annal_eventstore::Error::Backend(Box::new(e))))?;
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
) -> Result<bool> {
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
    ) -> Result<bool> {
        let mut conn = self.pool.acquire().await?;
        advance_on(&mut conn, projection, partition, from, to, last_recorded_at).await
    }

    async fn apply(
        &self,
        projection: &dyn Projection,
        partition: u32,
        from: Position,
        to: Position,
        events: &[RecordedEvent],
    ) -> Result<Applied> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // The checkpoint moves first: its row lock makes a second worker on this partition wait
        // here, then find the checkpoint moved and apply nothing.
        let last = events.last().map(|e| e.recorded_at);
        if !advance_on(&mut tx, projection.name(), partition, from, to, last).await? {
            return Ok(Applied::Moved);
        }
        if let Err(error) = projection.handle(events, &mut Tx::Sqlite(&mut tx)).await {
            tx.rollback().await?;
            return Ok(Applied::Failed(error));
        }
        tx.commit().await?;
        Ok(Applied::Committed)
    }

    async fn park(&self, projection: &str, partition: u32, from: Position, park: Park<'_>) -> Result<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let event = park.event;
        if !advance_on(&mut tx, projection, partition, from, event.position, None).await? {
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

    async fn reset(&self, projection: &str) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(sql::sqlite(sql::RESET_CHECKPOINTS)).bind(projection).execute(&mut *tx).await?;
        sqlx::query(sql::sqlite(sql::RESET_DEAD_LETTERS)).bind(projection).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

fn micros(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(value).unwrap_or_default()
}
