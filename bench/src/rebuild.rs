//! Rebuild: replay the whole log (1M events, 100k with `--quick`) into a SQL read model of
//! balances, through the projection runner in exactly-once mode.
//!
//! The baseline is the same replay hand-written in plain SQL: read the log in pages of the same
//! size in the same order (keyset on the global position, the same columns), apply each page
//! with the same upsert statement and move a checkpoint row, one transaction per page. It is
//! what the projection has to do at the least, so the ratio is the runner's overhead (the
//! subscription's gap-free reads, decoding, dead-letter and lease checks), not the cost of the
//! read model itself. (A set-based `INSERT ... SELECT ... GROUP BY` would compute the same
//! balances much faster, but no incremental projection can work that way.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use annal_eventstore::{BoxError, PgEventStore};
use annal_projections::{PgProjectionStore, Projection, ProjectionRunner, RecordedEvent, Tx, WorkerOptions};
use async_trait::async_trait;
use sqlx::{PgPool, Row};

use crate::Plan;
use crate::db::{drop_schema, schema_pool};
use crate::lag::{Probe, Timed};
use crate::report::{Better, Measurement};

/// Events per page and per projection batch.
const BATCH: usize = 1000;
/// Accounts the events are spread over.
const ACCOUNTS: u64 = 10_000;

const TABLES: &str = "\
    CREATE TABLE rb_balances (account text PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL); \
    CREATE TABLE rb_balances_raw (account text PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL); \
    CREATE TABLE rb_raw_checkpoint (id int PRIMARY KEY, tx_id bigint NOT NULL, seq bigint NOT NULL); \
    INSERT INTO rb_raw_checkpoint VALUES (1, 0, 0);";

/// One upsert per batch: the batch's deposits summed per account, added to the balances.
fn upsert(table: &str) -> String {
    format!(
        "INSERT INTO {table} (account, balance, events) \
         SELECT account, sum(amount), count(*) FROM unnest($1::text[], $2::int8[]) AS e(account, amount) GROUP BY account \
         ON CONFLICT (account) DO UPDATE SET balance = {table}.balance + excluded.balance, \
             events = {table}.events + excluded.events"
    )
}

/// The balances read model, written one statement per batch.
struct Balances {
    sql: String,
}

#[async_trait]
impl Projection for Balances {
    fn name(&self) -> &str {
        "rebuild_balances"
    }

    fn batch_size(&self) -> usize {
        BATCH
    }

    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        let conn = tx.postgres().ok_or("the balances need a PostgreSQL transaction")?;
        let accounts: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
        let amounts: Vec<i64> = events.iter().map(|e| e.data["amount"].as_i64().unwrap_or_default()).collect();
        sqlx::query(sqlx::AssertSqlSafe(self.sql.clone())).bind(accounts).bind(amounts).execute(&mut *conn).await?;
        Ok(())
    }
}

pub(crate) async fn postgres(admin: &PgPool, url: &str, plan: Plan) -> anyhow::Result<Vec<Measurement>> {
    let pool = schema_pool(admin, url, "bench_rebuild", 8).await?;
    let events = PgEventStore::from_pool(pool.clone()).await?;
    let store = PgProjectionStore::new(&events).await?;
    sqlx::raw_sql(TABLES).execute(&pool).await?;
    let total = plan.rebuild_events;
    let filled = Instant::now();
    fill(&pool, total).await?;
    sqlx::raw_sql("VACUUM ANALYZE annal_events").execute(&pool).await?;
    eprintln!("  {total} events written in {:.1} s", filled.elapsed().as_secs_f64());

    // Raw first, then Annal: both read a log that the fill has just left in the cache.
    let began = Instant::now();
    let (raw_events, raw_reading) = raw_replay(&pool).await?;
    let raw_seconds = began.elapsed().as_secs_f64();
    let raw = raw_events as f64 / raw_seconds;

    let head = annal_eventstore::EventStore::head(&events).await?;
    let probe = Probe::new()?;
    let began = Instant::now();
    let running =
        ProjectionRunner::new(Arc::new(events.clone()), Arc::new(Timed { inner: store, probe: probe.clone() }))
            .with(Arc::new(Balances { sql: upsert("rb_balances") }), WorkerOptions::default())?
            .start();
    running.wait_for("rebuild_balances", head, Duration::from_secs(1800)).await?;
    let annal_seconds = began.elapsed().as_secs_f64();
    let annal = total as f64 / annal_seconds;
    running.shutdown().await?;
    // Where the time went: in the projection's transactions (upsert, checkpoint, commit) or
    // outside them (reading and decoding the log, the runner's own checks).
    let annal_writing = probe.total_seconds();
    let profile = format!(
        "Annal {:.0}% in its transactions, {:.0}% reading and the rest; raw {:.0}% reading",
        100.0 * annal_writing / annal_seconds,
        100.0 * (1.0 - annal_writing / annal_seconds),
        100.0 * raw_reading / raw_seconds
    );
    eprintln!("  {profile}; {}", probe.profile());

    // Both read models must agree, or the figures mean nothing.
    let sums: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(balance)::int8 FROM rb_balances), (SELECT sum(events)::int8 FROM rb_balances), \
                (SELECT sum(balance)::int8 FROM rb_balances_raw), (SELECT sum(events)::int8 FROM rb_balances_raw)",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        sums.0 == sums.2 && sums.1 == sums.3 && u64::try_from(sums.1)? == total && raw_events == total,
        "the read models disagree: {sums:?}, {raw_events} raw events, {total} written"
    );
    events.close().await;
    drop_schema(admin, "bench_rebuild").await?;

    let size = if total >= 1_000_000 { format!("{}M", total / 1_000_000) } else { format!("{}k", total / 1000) };
    Ok(vec![
        Measurement::against(
            format!("PostgreSQL rebuild of a SQL read model, {size} events"),
            annal,
            "events/s",
            Better::Higher,
            "hand-written SQL replay",
            raw,
        )
        .at_least(50_000.0)
        .note(format!("{BATCH}-event batches, one upsert per batch; {profile}")),
    ])
}

/// Writes `total` deposits over 10k account streams, 50k per transaction, as SQL generates them
/// (writing them through appends would take longer than the replay being measured).
async fn fill(pool: &PgPool, total: u64) -> anyhow::Result<()> {
    let chunk = 50_000;
    let mut from = 0;
    while from < total {
        let to = (from + chunk).min(total) - 1;
        sqlx::query(
            "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
             SELECT gen_random_uuid(), 'account-' || (i % $3), 'account', i / $3, 'Deposited', 1, \
                    jsonb_build_object('amount', i % 100 + 1, 'currency', 'EUR', 'note', 'benchmark payload'), \
                    jsonb_build_object('correlation_id', gen_random_uuid()) \
             FROM generate_series($1::int8, $2::int8) AS i ORDER BY i",
        )
        .bind(i64::try_from(from)?)
        .bind(i64::try_from(to)?)
        .bind(i64::try_from(ACCOUNTS)?)
        .execute(pool)
        .await?;
        from = to + 1;
    }
    Ok(())
}

/// The hand-written replay; returns the events applied and the seconds spent reading.
async fn raw_replay(pool: &PgPool) -> anyhow::Result<(u64, f64)> {
    let upsert = upsert("rb_balances_raw");
    let (mut tx_id, mut seq) = (0i64, 0i64);
    let mut applied = 0u64;
    let mut reading = 0.0;
    loop {
        let began = Instant::now();
        let rows = sqlx::query(
            "SELECT tx_id, seq, event_id, stream, version, event_type, schema_version, data, metadata, recorded_at \
             FROM annal_events WHERE (tx_id, seq) > ($1, $2) ORDER BY tx_id, seq LIMIT $3",
        )
        .bind(tx_id)
        .bind(seq)
        .bind(i64::try_from(BATCH)?)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        (tx_id, seq) = (last.try_get(0)?, last.try_get(1)?);
        let mut accounts = Vec::with_capacity(rows.len());
        let mut amounts = Vec::with_capacity(rows.len());
        for row in &rows {
            let data: serde_json::Value = row.try_get(7)?;
            accounts.push(row.try_get::<String, _>(3)?);
            amounts.push(data["amount"].as_i64().unwrap_or_default());
        }
        reading += began.elapsed().as_secs_f64();
        let mut tx = pool.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(upsert.clone())).bind(&accounts).bind(&amounts).execute(&mut *tx).await?;
        sqlx::query("UPDATE rb_raw_checkpoint SET tx_id = $1, seq = $2 WHERE id = 1")
            .bind(tx_id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        applied += rows.len() as u64;
    }
    Ok((applied, reading))
}
