//! The projection-store algorithm of the SQL backends, written once: guarded checkpoint moves,
//! the handler run in the transaction that moves the checkpoint, parking, dead letters, resets
//! and promotions. Each backend supplies only what differs: its connection and row types, its
//! BEGIN, the spelling of placeholders, how partitions and timestamps are stored, and the
//! statements that read the database's clock (leases, runners), which it writes itself.
//!
//! Why a macro rather than generic functions over a dialect trait: generic sqlx code needs a
//! bound for every type bound or read (`for<'q> i64: Encode<'q, DB> + Type<DB>`, the same for
//! `&str`, `Option<&str>`, `Uuid`, the timestamp type, `Executor` for the connection, `IntoArguments`
//! for the arguments), repeated on every function: some forty lines of bounds that say nothing
//! about the algorithm. The macro keeps the algorithm in plain, concrete sqlx calls; each
//! expansion is type-checked against its backend.

/// Implements [`crate::ProjectionStore`] for `$store` (a struct with a `pool` field), with:
/// - `connection`, `row`: the backend's sqlx connection and row types;
/// - `tx`: the [`crate::Tx`] variant handlers get;
/// - `begin`: the statement that opens a write transaction (a batch's comes from the backend's
///   `batch_begin(fence)`, which may bound it on the server);
/// - `sql`: a function giving a query of [`crate::queries`] in the backend's spelling;
/// - `batch`: the backend's [`crate::queries::BatchQueries`], and `streams`, a function giving
///   the streams of a batch as they bind there;
/// - `int`: the integer type of partitions and attempts;
/// - `time`: the stored timestamp type, with `to_time` and `from_time` to convert;
/// - `clock { ... }`: the backend's own `acquire_lease`, `renew_lease`, `release_lease` and
///   `register_runner`, which use the database's clock where it has one.
///
/// The expansion site also defines `REBUILD_START`, `REBUILD_UPDATE` and `REBUILDS`, the
/// rebuild record's statements, in its spelling and with its clock.
macro_rules! sql_projection_store {
    (
        store: $store:ty,
        connection: $conn:ty,
        row: $row:ty,
        tx: $tx:ident,
        begin: $begin:tt,
        sql: $sql:ident,
        batch: $batch:expr, streams: $streams:ident,
        int: $int:ident,
        time: $time:ty, to_time: $to_time:ident, from_time: $from_time:ident,
        clock { $($clock:tt)* }
    ) => {
        /// Moves a checkpoint on `conn` (creating it on the first move from the start), fenced;
        /// for a `batch`, only if none of its streams has a dead letter in the partition.
        #[allow(clippy::too_many_arguments)]
        async fn advance_on(
            conn: &mut $conn,
            projection: &str,
            partition: u32,
            from: Position,
            to: Position,
            last: Option<DateTime<Utc>>,
            fence: Option<&Fence>,
            batch: Option<&[RecordedEvent]>,
        ) -> Result<bool> {
            let (owner, token) = (fence.map(|f| f.owner.as_str()), fence.map(|f| to_i64(f.token)));
            let now = $to_time(Utc::now());
            let last = last.map($to_time);
            let partition = $int::try_from(partition).unwrap_or($int::MAX);
            let (advance, create) = match batch {
                Some(_) => ($batch.advance, $batch.create),
                None => (queries::ADVANCE, queries::CREATE),
            };
            let mut update = sqlx::query($sql(advance))
                .bind(projection)
                .bind(partition)
                .bind(to_i64(to.transaction()))
                .bind(to_i64(to.sequence()))
                .bind(to_i64(from.transaction()))
                .bind(to_i64(from.sequence()))
                .bind(now)
                .bind(last)
                .bind(owner)
                .bind(token);
            if let Some(events) = batch {
                update = update.bind($streams(events));
            }
            let updated = update.execute(&mut *conn).await?.rows_affected();
            if updated == 1 || from != Position::START {
                return Ok(updated == 1);
            }
            let mut insert = sqlx::query($sql(create))
                .bind(projection)
                .bind(partition)
                .bind(to_i64(to.transaction()))
                .bind(to_i64(to.sequence()))
                .bind(now)
                .bind(last)
                .bind(owner)
                .bind(token);
            if let Some(events) = batch {
                insert = insert.bind($streams(events));
            }
            Ok(insert.execute(&mut *conn).await?.rows_affected() == 1)
        }

        fn dead_letter(row: &$row) -> Result<DeadLetter> {
            let stream: String = row.try_get("stream")?;
            Ok(DeadLetter {
                id: row.try_get("id")?,
                projection: row.try_get("projection")?,
                partition: u32::try_from(row.try_get::<$int, _>("partition")?).unwrap_or_default(),
                event_id: row.try_get("event_id")?,
                stream: StreamName::new(&stream)?,
                version: to_u64(row.try_get("version")?),
                position: Position::new(to_u64(row.try_get("position_tx")?), to_u64(row.try_get("position_seq")?)),
                error: row.try_get("error")?,
                attempts: u32::try_from(row.try_get::<$int, _>("attempts")?).unwrap_or_default(),
                parked_at: $from_time(row.try_get::<$time, _>("parked_at")?),
            })
        }

        #[async_trait]
        impl ProjectionStore for $store {
            async fn checkpoint(&self, projection: &str, partition: u32) -> Result<Option<Checkpoint>> {
                let row = sqlx::query($sql(queries::CHECKPOINT))
                    .bind(projection)
                    .bind($int::try_from(partition).unwrap_or($int::MAX))
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|row| {
                    Ok(Checkpoint {
                        position: Position::new(to_u64(row.try_get(0)?), to_u64(row.try_get(1)?)),
                        updated_at: $from_time(row.try_get::<$time, _>(2)?),
                        last_recorded_at: row.try_get::<Option<$time>, _>(3)?.map($from_time),
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
                advance_on(&mut conn, projection, partition, from, to, last_recorded_at, fence, None).await
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
                let mut tx = self.pool.begin_with(batch_begin(fence)).await?;
                if let Err(error) = crate::projection::run_handler(projection, events, &mut Tx::$tx(&mut tx)).await {
                    tx.rollback().await?;
                    return Ok(Applied::Failed(error));
                }
                // The checkpoint moves last, fenced, right before the commit: a worker whose lease
                // was taken while its handler ran (or another worker that moved the checkpoint)
                // finds nothing to update and rolls the handler's effects back. The checkpoint row
                // is locked only for that last round trip, so nobody waits behind a long handler.
                // The same statement refuses a batch behind a dead letter, so the worker needs no
                // lookup before each batch, and a dead letter parked meanwhile still counts.
                let last = events.last().map(|e| e.recorded_at);
                if !advance_on(&mut tx, projection.name(), partition, from, to, last, fence, Some(events)).await? {
                    tx.rollback().await?;
                    let blocked: bool = sqlx::query_scalar($sql($batch.blocked))
                        .bind(projection.name())
                        .bind($int::try_from(partition).unwrap_or($int::MAX))
                        .bind($streams(events))
                        .fetch_one(&self.pool)
                        .await?;
                    return Ok(if blocked { Applied::Blocked } else { Applied::Moved });
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
                let mut tx = self.pool.begin_with($begin).await?;
                let event = park.event;
                if !advance_on(&mut tx, projection, partition, from, event.position, None, fence, None).await? {
                    return Ok(false);
                }
                sqlx::query($sql(queries::PARK))
                    .bind(projection)
                    .bind($int::try_from(partition).unwrap_or($int::MAX))
                    .bind(event.id)
                    .bind(event.stream.as_str())
                    .bind(to_i64(event.version))
                    .bind(to_i64(event.position.transaction()))
                    .bind(to_i64(event.position.sequence()))
                    .bind(park.error)
                    .bind($int::try_from(park.attempts).unwrap_or($int::MAX))
                    .bind($to_time(Utc::now()))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>> {
                let rows = sqlx::query($sql(queries::DEAD_LETTERS)).bind(projection).fetch_all(&self.pool).await?;
                rows.iter().map(dead_letter).collect()
            }

            async fn apply_dead_letter(
                &self,
                projection: &dyn Projection,
                id: i64,
                event: &RecordedEvent,
            ) -> Result<Applied> {
                let mut tx = self.pool.begin_with($begin).await?;
                let removed = sqlx::query($sql(queries::REMOVE_DEAD_LETTER))
                    .bind(projection.name())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if removed == 0 {
                    return Ok(Applied::Moved);
                }
                if let Err(error) = crate::projection::run_handler(projection, std::slice::from_ref(event), &mut Tx::$tx(&mut tx)).await {
                    tx.rollback().await?;
                    return Ok(Applied::Failed(error));
                }
                tx.commit().await?;
                Ok(Applied::Committed)
            }

            async fn remove_dead_letter(&self, projection: &str, id: i64) -> Result<bool> {
                let removed =
                    sqlx::query($sql(queries::REMOVE_DEAD_LETTER)).bind(projection).bind(id).execute(&self.pool).await?;
                Ok(removed.rows_affected() == 1)
            }

            async fn record_latency(&self, projection: &str, partition: u32, p99: Duration) -> Result<()> {
                sqlx::query($sql(queries::LATENCY))
                    .bind(projection)
                    .bind($int::try_from(partition).unwrap_or($int::MAX))
                    .bind(i64::try_from(p99.as_micros()).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn leases(&self, projection: &str) -> Result<Vec<Lease>> {
                let rows = sqlx::query($sql(queries::LEASES)).bind(projection).fetch_all(&self.pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok(Lease {
                            partition: u32::try_from(row.try_get::<$int, _>(0)?).unwrap_or_default(),
                            owner: row.try_get(1)?,
                            token: to_u64(row.try_get(2)?),
                            expires_at: $from_time(row.try_get::<$time, _>(3)?),
                        })
                    })
                    .collect()
            }

            async fn deregister_runner(&self, projection: &str, owner: &str) -> Result<()> {
                sqlx::query($sql(queries::DEREGISTER)).bind(projection).bind(owner).execute(&self.pool).await?;
                Ok(())
            }

            async fn claim_partitions(&self, projection: &str, partitions: u32) -> Result<()> {
                let count = $int::try_from(partitions).unwrap_or($int::MAX);
                let mut tx = self.pool.begin_with($begin).await?;
                let stored: Option<$int> =
                    sqlx::query_scalar($sql(queries::PARTITION_COUNT)).bind(projection).fetch_one(&mut *tx).await?;
                if let Some(stored) = stored.filter(|stored| *stored != count) {
                    tx.rollback().await?;
                    return Err(crate::Error::PartitionsChanged {
                        projection: projection.to_owned(),
                        stored: u32::try_from(stored).unwrap_or_default(),
                        configured: partitions,
                    });
                }
                sqlx::query($sql(queries::RECORD_PARTITION_COUNT)).bind(projection).bind(count).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn reset(&self, projection: &str) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query($sql(queries::RESET_PARTITION_COUNT)).bind(projection).execute(&mut *tx).await?;
                sqlx::query($sql(queries::RESET_CHECKPOINTS)).bind(projection).execute(&mut *tx).await?;
                sqlx::query($sql(queries::RESET_DEAD_LETTERS)).bind(projection).execute(&mut *tx).await?;
                sqlx::query($sql(queries::BUMP_EPOCH)).bind(projection).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn control(&self, projection: &str) -> Result<Control> {
                let row = sqlx::query($sql(queries::CONTROL)).bind(projection).fetch_optional(&self.pool).await?;
                let Some(row) = row else { return Ok(Control::default()) };
                let by: Option<String> = row.try_get(0)?;
                let paused = match by {
                    Some(by) => Some(Pause {
                        by,
                        reason: row.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                        at: row.try_get::<Option<$time>, _>(2)?.map($from_time).unwrap_or_default(),
                    }),
                    None => None,
                };
                Ok(Control { paused, epoch: to_u64(row.try_get(3)?) })
            }

            async fn pause(&self, projection: &str, pause: &Pause) -> Result<()> {
                sqlx::query($sql(queries::PAUSE))
                    .bind(projection)
                    .bind(pause.by.as_str())
                    .bind(pause.reason.as_str())
                    .bind($to_time(pause.at))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn resume(&self, projection: &str) -> Result<bool> {
                let resumed = sqlx::query($sql(queries::RESUME)).bind(projection).execute(&self.pool).await?;
                Ok(resumed.rows_affected() == 1)
            }

            async fn move_checkpoints(&self, projection: &str, partitions: u32, to: Position) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                let now = $to_time(Utc::now());
                for partition in 0..partitions.max(1) {
                    sqlx::query($sql(queries::PUT_CHECKPOINT))
                        .bind(projection)
                        .bind($int::try_from(partition).unwrap_or($int::MAX))
                        .bind(to_i64(to.transaction()))
                        .bind(to_i64(to.sequence()))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query($sql(queries::REMOVE_DEAD_LETTERS_AFTER))
                    .bind(projection)
                    .bind(to_i64(to.transaction()))
                    .bind(to_i64(to.sequence()))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query($sql(queries::BUMP_EPOCH)).bind(projection).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn promote(&self, shadow: &str, live: &str, statements: &[String]) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                for statement in statements {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
                }
                sqlx::query($sql(queries::RESET_PARTITION_COUNT)).bind(live).execute(&mut *tx).await?;
                sqlx::query($sql(queries::PROMOTE_PARTITION_COUNT)).bind(shadow).bind(live).execute(&mut *tx).await?;
                sqlx::query($sql(queries::RESET_CHECKPOINTS)).bind(live).execute(&mut *tx).await?;
                sqlx::query($sql(queries::PROMOTE_CHECKPOINTS)).bind(shadow).bind(live).execute(&mut *tx).await?;
                sqlx::query($sql(queries::RESET_DEAD_LETTERS)).bind(live).execute(&mut *tx).await?;
                sqlx::query($sql(queries::PROMOTE_DEAD_LETTERS)).bind(shadow).bind(live).execute(&mut *tx).await?;
                sqlx::query($sql(queries::RESET_LEASES)).bind(shadow).execute(&mut *tx).await?;
                sqlx::query($sql(queries::BUMP_EPOCH)).bind(live).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn start_rebuild(
                &self,
                projection: &str,
                owner: &str,
                mode: RebuildMode,
                stale_after: Duration,
            ) -> Result<()> {
                sqlx::query(REBUILD_START)
                    .bind(projection)
                    .bind(owner)
                    .bind(mode.as_str())
                    .bind(i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn update_rebuild(&self, projection: &str, owner: &str, update: &RebuildUpdate) -> Result<bool> {
                let written = sqlx::query(REBUILD_UPDATE)
                    .bind(projection)
                    .bind(owner)
                    .bind(to_i64(update.total))
                    .bind(to_i64(update.done))
                    .bind(if update.rate.is_finite() { update.rate } else { 0.0 })
                    .bind(update.eta.map(|eta| eta.as_secs_f64()))
                    .bind(update.outcome.as_str())
                    .bind(update.outcome.reason())
                    .execute(&self.pool)
                    .await?;
                Ok(written.rows_affected() == 1)
            }

            async fn rebuilds(&self) -> Result<Vec<RebuildProgress>> {
                let rows = sqlx::query(REBUILDS).fetch_all(&self.pool).await?;
                rows.iter().map(rebuild).collect()
            }

            $($clock)*
        }

        /// A row of `REBUILDS`: the record, with its age by the database's clock (column 12).
        fn rebuild(row: &$row) -> Result<RebuildProgress> {
            let unknown = |what: &str, text: &str| {
                crate::Error::Store(annal_eventstore::Error::Backend(
                    format!("annal_rebuilds holds an unknown {what} {text:?}").into(),
                ))
            };
            let mode: String = row.try_get(2)?;
            let outcome: String = row.try_get(9)?;
            let seconds = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
            Ok(RebuildProgress {
                projection: row.try_get(0)?,
                owner: row.try_get(1)?,
                mode: RebuildMode::parse(&mode).ok_or_else(|| unknown("mode", &mode))?,
                started_at: $from_time(row.try_get::<$time, _>(3)?),
                updated_at: $from_time(row.try_get::<$time, _>(4)?),
                update: RebuildUpdate {
                    total: to_u64(row.try_get(5)?),
                    done: to_u64(row.try_get(6)?),
                    rate: row.try_get(7)?,
                    eta: row.try_get::<Option<f64>, _>(8)?.map(seconds),
                    outcome: RebuildOutcome::parse(&outcome, row.try_get(10)?)
                        .ok_or_else(|| unknown("outcome", &outcome))?,
                },
                stale_after: Duration::from_millis(to_u64(row.try_get(11)?)),
                age: seconds(row.try_get::<f64, _>(12)?.max(0.0)),
            })
        }
    };
}

pub(crate) use sql_projection_store;
