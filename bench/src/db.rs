//! What every measurement needs: a fresh schema per suite, and the benchmark's events.

use std::str::FromStr;

use annal_eventstore::{Metadata, NewEvent};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

/// Drops and recreates `schema`, and returns a pool whose connections work in it (their
/// `search_path`), so each suite has tables of its own made by the real migrations.
pub(crate) async fn schema_pool(admin: &PgPool, url: &str, schema: &str, connections: u32) -> anyhow::Result<PgPool> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};")))
        .execute(admin)
        .await?;
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    // As `PgEventStore::connect` does: no test query on acquire, so that a baseline pool and
    // Annal's pay the same round trips.
    Ok(PgPoolOptions::new().max_connections(connections).test_before_acquire(false).connect_with(options).await?)
}

/// Drops a suite's schema once it is measured, so later suites run on a small database.
pub(crate) async fn drop_schema(admin: &PgPool, schema: &str) -> anyhow::Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).execute(admin).await?;
    Ok(())
}

/// `n` deposit events: about 70 bytes of JSON data and a correlation id in the metadata.
pub(crate) fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            NewEvent::new("Deposited", json!({ "amount": 42 + i, "currency": "EUR", "note": "benchmark payload" }))
                .with_metadata(Metadata::default().with_correlation_id(Uuid::now_v7()))
        })
        .collect()
}

/// A unique suffix for stream names, so runs never collide.
pub(crate) fn run_id() -> String {
    Uuid::now_v7().simple().to_string()
}
