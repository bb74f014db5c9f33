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
use annal_projections::{
    PgProjectionStore, Projection, ProjectionRunner, ProjectionStore, RecordedEvent, Tx, WorkerOptions,
};
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

    // Raw and Annal alternate in rounds, each first in turn; each round replays everything
    // into an emptied read model.
    let head = annal_eventstore::EventStore::head(&events).await?;
    let (mut raw_seconds, mut raw_reading, mut annal_seconds, mut annal_writing) = (0.0, 0.0, 0.0, 0.0);
    for round in 0..plan.rounds {
        for annal_side in if round % 2 == 0 { [false, true] } else { [true, false] } {
            if annal_side {
                sqlx::raw_sql("TRUNCATE rb_balances").execute(&pool).await?;
                store.reset("rebuild_balances").await?;
                let probe = Probe::new()?;
                let began = Instant::now();
                let timed = Timed { inner: store.clone(), probe: probe.clone() };
                let running = ProjectionRunner::new(Arc::new(events.clone()), Arc::new(timed))
                    .with(Arc::new(Balances { sql: upsert("rb_balances") }), WorkerOptions::default())?
                    .start();
                running.wait_for("rebuild_balances", head, Duration::from_secs(1800)).await?;
                annal_seconds += began.elapsed().as_secs_f64();
                running.shutdown().await?;
                annal_writing += probe.total_seconds();
                eprintln!("  Annal round {round}: {}", probe.profile());
            } else {
                sqlx::raw_sql("TRUNCATE rb_balances_raw; UPDATE rb_raw_checkpoint SET tx_id = 0, seq = 0")
                    .execute(&pool)
                    .await?;
                let began = Instant::now();
                let (replayed, reading) = raw_replay(&pool).await?;
                anyhow::ensure!(replayed == total, "the raw replay read {replayed} events of {total}");
                raw_seconds += began.elapsed().as_secs_f64();
                raw_reading += reading;
            }
        }
    }
    let replayed = (total * u64::from(plan.rounds)) as f64;
    let (raw, annal) = (replayed / raw_seconds, replayed / annal_seconds);
    // Where the time went: in the projection's transactions (upsert, checkpoint, commit) or
    // outside them (reading and decoding the log, the runner's own checks).
    let profile = format!(
        "Annal {:.0}% in its transactions, {:.0}% reading and the rest; raw {:.0}% reading",
        100.0 * annal_writing / annal_seconds,
        100.0 * (1.0 - annal_writing / annal_seconds),
        100.0 * raw_reading / raw_seconds
    );
    eprintln!("  {profile}");

    // Both read models must agree, or the figures mean nothing.
    let sums: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(balance)::int8 FROM rb_balances), (SELECT sum(events)::int8 FROM rb_balances), \
                (SELECT sum(balance)::int8 FROM rb_balances_raw), (SELECT sum(events)::int8 FROM rb_balances_raw)",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        sums.0 == sums.2 && sums.1 == sums.3 && u64::try_from(sums.1)? == total,
        "the read models disagree: {sums:?}, {total} events written"
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
        .note(format!(
            "{BATCH}-event batches, one upsert per batch, {}; {profile}",
            if plan.rounds == 1 { "one round".to_owned() } else { format!("{} alternating rounds", plan.rounds) }
        )),
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
