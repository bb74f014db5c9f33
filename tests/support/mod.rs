//! Shared helpers for tests: PostgreSQL servers, partition counts.
#![allow(dead_code, unreachable_pub)]

/// Waits until the global log's visible head reaches `position`, and returns the head.
///
/// Every test that reads the global log right after writing must wait so: on PostgreSQL a
/// committed event becomes visible only once every older transaction in the cluster has ended
/// (docs/ordering.md), and tests running beside it on the same server hold transactions open.
pub async fn visible<S: annal::EventStore + ?Sized>(store: &S, position: annal::Position) -> annal::Position {
    let mut wakeup = store.wakeup();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        wakeup.mark_seen();
        let head = store.head().await.unwrap();
        if head >= position {
            return head;
        }
        assert!(tokio::time::Instant::now() < deadline, "{position} never became visible (head {head})");
        wakeup.wait(std::time::Duration::from_millis(20)).await;
    }
}

/// Counts, partition by partition, the events a partitioned reader of `store` selects.
pub async fn partition_counts(store: &impl annal::EventStore, partitions: u32) -> Vec<u64> {
    let head = store.head().await.unwrap();
    let mut counts = Vec::new();
    for partition in 0..partitions {
        let filter = annal::Filter::all().with_partition(partition, partitions);
        counts.push(store.count(annal::Position::START, head, &filter).await.unwrap());
    }
    counts
}

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
