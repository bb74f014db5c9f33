//! One writer appending single events, by the forms between the benchmark's raw `INSERT` and
//! Annal's append, alternating in rounds (each form first in turn); prints each form's rate and
//! its ratio to the first one named. Where `annal-bench` gives one figure for the one-writer gap,
//! this tells which part of the statement or the store it comes from.
//!
//! ```sh
//! cargo build --release -p annal-bench --example one_writer
//! ROUNDS=6 SECS=2 scripts/with-postgres --durable target/release/examples/one_writer raw scalar stmt join noguard store quiet alone
//! ```
//!
//! `raw`: the benchmark's baseline (arrays of one); `scalar`: `INSERT ... VALUES`; `stmt`: the
//! guard of the batch statements (`EXISTS` sub-plan) on one event; `join`: the guard as a join,
//! as `APPEND_ONE_EXACT` has it; `noguard`: no guard; `store`: `PgEventStore::append` with the
//! defaults; `quiet`: the same without `NOTIFY`; `alone`: without group commit.
use std::str::FromStr;
use std::time::{Duration, Instant};

use annal_eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent, PgEventStore, StreamName};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            NewEvent::new("Deposited", json!({ "amount": 42 + i, "currency": "EUR", "note": "benchmark payload" }))
                .with_metadata(Metadata::default().with_correlation_id(Uuid::now_v7()))
        })
        .collect()
}

async fn schema_pool(admin: &PgPool, url: &str, schema: &str) -> anyhow::Result<PgPool> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};")))
        .execute(admin)
        .await?;
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    Ok(PgPoolOptions::new().max_connections(24).test_before_acquire(false).connect_with(options).await?)
}

const RAW_ARRAYS: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::jsonb[], $8::jsonb[])";
const RAW_SCALAR: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) \
    VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb, $9)";
const ANNAL_STMT: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) \
    SELECT $3, $1, $2, $8 + 1, $4, $5, $6::jsonb, $7::jsonb, $9 \
    WHERE $8 < 0 OR EXISTS (SELECT 1 FROM annal_events WHERE stream = $1 AND version = $8 AND tx_id <= pg_current_xact_id()::text::bigint) \
    RETURNING version, tx_id, seq";
const ANNAL_NOGUARD: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) \
    SELECT $3, $1, $2, $8 + 1, $4, $5, $6::jsonb, $7::jsonb, $9 RETURNING version, tx_id, seq";

const ANNAL_JOIN: &str = "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) \
    SELECT $3, $1, $2, $8 + 1, $4, $5, $6::jsonb, $7::jsonb, $9 FROM annal_events p \
    WHERE p.stream = $1 AND p.version = $8 AND p.tx_id <= pg_current_xact_id()::text::bigint \
    RETURNING version, tx_id, seq";

#[derive(Clone)]
enum V {
    RawArrays(PgPool),
    RawScalar(PgPool),
    Stmt(PgPool, &'static str),
    Store(PgEventStore),
    Quiet(PgEventStore),
}

async fn one(v: &V, stream: &StreamName, version: u64) -> anyhow::Result<()> {
    let e = &events(1)[0];
    let meta = serde_json::to_string(&e.metadata)?;
    let data = e.data.to_string();
    match v {
        V::RawArrays(pool) => {
            sqlx::query(RAW_ARRAYS)
                .bind(vec![e.id])
                .bind(vec![stream.as_str()])
                .bind(vec![stream.category()])
                .bind(vec![version as i64])
                .bind(vec![e.event_type.as_str()])
                .bind(vec![1i32])
                .bind(vec![e.data.clone()])
                .bind(vec![serde_json::to_value(&e.metadata)?])
                .execute(pool)
                .await?;
        }
        V::RawScalar(pool) => {
            sqlx::query(RAW_SCALAR)
                .bind(e.id)
                .bind(stream.as_str())
                .bind(stream.category())
                .bind(version as i64)
                .bind(e.event_type.as_str())
                .bind(1i32)
                .bind(data)
                .bind(meta)
                .bind(7i64)
                .execute(pool)
                .await?;
        }
        V::Stmt(pool, sql) => {
            let sql: &'static str = if version == 0 { ANNAL_NOGUARD } else { sql };
            let rows = sqlx::query(sql)
                .bind(stream.as_str())
                .bind(stream.category())
                .bind(e.id)
                .bind(e.event_type.as_str())
                .bind(1i32)
                .bind(data)
                .bind(meta)
                .bind(version as i64 - 1)
                .bind(7i64)
                .fetch_all(pool)
                .await?;
            anyhow::ensure!(rows.len() == 1);
        }
        V::Store(store) | V::Quiet(store) => {
            let expected = if version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(version - 1) };
            store.append(stream, expected, events(1)).await?;
        }
    }
    Ok(())
}

async fn run(v: &V, secs: f64) -> anyhow::Result<f64> {
    let stream = StreamName::new(format!("w1-{}", Uuid::now_v7().simple()))?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    if let V::Quiet(s) = v {
        s.clone().notify_other_processes(false);
    }
    while Instant::now() < deadline {
        one(v, &stream, n).await?;
        n += 1;
    }
    if let V::Quiet(s) = v {
        s.clone().notify_other_processes(true);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let admin = PgPoolOptions::new().max_connections(2).connect(&url).await?;
    let raw = schema_pool(&admin, &url, "w1_raw").await?;
    PgEventStore::migrate(&raw).await?;
    let store_pool = schema_pool(&admin, &url, "w1_annal").await?;
    let store = PgEventStore::from_pool(store_pool).await?;
    let which: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(6);
    let secs: f64 = std::env::var("SECS").ok().and_then(|r| r.parse().ok()).unwrap_or(2.0);
    let mut variants: Vec<(String, V)> = Vec::new();
    for w in &which {
        let v = match w.as_str() {
            "raw" => V::RawArrays(raw.clone()),
            "scalar" => V::RawScalar(raw.clone()),
            "stmt" => V::Stmt(raw.clone(), ANNAL_STMT),
            "noguard" => V::Stmt(raw.clone(), ANNAL_NOGUARD),
            "join" => V::Stmt(raw.clone(), ANNAL_JOIN),
            "store" => V::Store(store.clone()),
            "quiet" => V::Quiet(store.clone()),
            "alone" => V::Store(store.clone().with_group_commit(None)),
            other => anyhow::bail!("unknown {other}"),
        };
        variants.push((w.clone(), v));
    }
    // warm-up
    for (_, v) in &variants {
        run(v, 0.5).await?;
    }
    let mut sums = vec![0.0; variants.len()];
    for r in 0..rounds {
        let order: Vec<usize> =
            if r % 2 == 0 { (0..variants.len()).collect() } else { (0..variants.len()).rev().collect() };
        for i in order {
            let rate = run(&variants[i].1, secs).await?;
            sums[i] += rate;
        }
    }
    let base = sums[0];
    for (i, (name, _)) in variants.iter().enumerate() {
        println!("{name:>8}: {:>7.0}/s  {:.3}", sums[i] / rounds as f64, sums[i] / base);
    }
    Ok(())
}
