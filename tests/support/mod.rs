//! Shared helpers for tests that need a PostgreSQL server.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "postgres")]
pub mod pg {
    use std::str::FromStr;

    use annal::PgEventStore;
    use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

    /// The server the tests use. Failing here is deliberate: PostgreSQL tests never pass by
    /// being skipped.
    pub fn url() -> String {
        std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            panic!(
                "the PostgreSQL tests need DATABASE_URL; run `scripts/test`, which starts a throwaway \
                 PostgreSQL, or set DATABASE_URL to a server of your own"
            )
        })
    }

    /// Connection options for a fresh, empty schema of its own, so tests run in parallel
    /// without seeing each other's events.
    pub async fn fresh_schema() -> PgConnectOptions {
        let url = url();
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&url).await.expect("connect to DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
        admin.close().await;
        PgConnectOptions::from_str(&url).unwrap().options([("search_path", schema.as_str())])
    }

    /// A pool on a fresh schema.
    pub async fn fresh_pool(max_connections: u32) -> PgPool {
        let options = fresh_schema().await;
        PgPoolOptions::new().max_connections(max_connections).connect_with(options).await.unwrap()
    }

    /// A store on a fresh schema.
    pub async fn fresh_store() -> PgEventStore {
        PgEventStore::from_pool(fresh_pool(20).await).await.unwrap()
    }
}
