//! What every example shares: which database it runs on, its short mode, and percentiles.
//!
//! Each example runs on the embedded SQLite store in a temporary directory, or on PostgreSQL
//! when `DATABASE_URL` is set (built with `--features postgres`), in a schema of its own that
//! is dropped at the end, so runs never see each other's events. Its code is generic over
//! [`EventStore`], as an application's can be; only `main` names a backend.
//!
//! Not an example itself: Cargo only builds `examples/*.rs` and `examples/*/main.rs`.

// Each example uses its own part of this module.
#![allow(dead_code, unused_macros)]

use std::sync::Arc;
use std::time::Duration;

use annal::EventStore;
use annal::projections::ProjectionStore;

/// `true` when the example should only run briefly: `--short` on the command line or
/// `ANNAL_EXAMPLE_SHORT=1` in the environment (the test suite runs every example so).
pub(crate) fn short() -> bool {
    std::env::args().any(|a| a == "--short") || std::env::var("ANNAL_EXAMPLE_SHORT").is_ok_and(|v| v == "1")
}

/// The read models' database: the event store's own, so that projections write exactly once
/// through the transaction that moves their checkpoint.
#[derive(Clone, Debug)]
pub(crate) enum Db {
    /// The SQLite file's writer pool.
    Sqlite(annal::sqlx::SqlitePool),
    /// The PostgreSQL pool.
    #[cfg(feature = "postgres")]
    Postgres(annal::sqlx::PgPool),
}

/// Runs `$body` with `$conn` bound to the pool of either backend; the SQL must suit both
/// (`$1` placeholders work on SQLite too).
macro_rules! on_db {
    ($db:expr, |$conn:ident| $body:expr) => {
        match $db {
            $crate::support::Db::Sqlite($conn) => $body,
            #[cfg(feature = "postgres")]
            $crate::support::Db::Postgres($conn) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to a projection handler's transaction on either backend,
/// discarding its value.
macro_rules! on_tx {
    ($tx:expr, |$conn:ident| $body:expr) => {
        match &mut *$tx {
            annal::projections::Tx::Sqlite($conn) => {
                $body;
            }
            #[cfg(feature = "postgres")]
            annal::projections::Tx::Postgres($conn) => {
                $body;
            }
            _ => return Err("this read model lives in the event store's SQL database".into()),
        }
    };
}

impl Db {
    /// Runs statements that take no parameters (creating the read models' tables).
    pub(crate) async fn execute_all(&self, statements: &[&'static str]) -> anyhow::Result<()> {
        for &statement in statements {
            on_db!(self, |pool| annal::sqlx::query(statement).execute(pool).await.map(drop))?;
        }
        Ok(())
    }
}

/// Runs `$run(store, projection_store, db)` on the backend the environment chooses: SQLite in a
/// temporary directory, or PostgreSQL in a fresh schema when `DATABASE_URL` is set. `$run` is a
/// generic `async fn` taking any `EventStore + Clone + 'static`.
macro_rules! on_backend {
    ($name:expr, $run:path) => {{
        match std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty()) {
            None => {
                let dir = tempfile::tempdir()?;
                let store = annal::SqliteEventStore::open(dir.path().join(concat!($name, ".db"))).await?;
                println!("backend: SQLite, {}", dir.path().display());
                let projections = std::sync::Arc::new(annal::projections::SqliteProjectionStore::new(&store).await?);
                let db = $crate::support::Db::Sqlite(store.writer().clone());
                let outcome = $run(store.clone(), projections, db).await;
                store.close().await;
                outcome
            }
            #[cfg(feature = "postgres")]
            Some(url) => {
                let (store, schema) = $crate::support::postgres($name, &url).await?;
                println!("backend: PostgreSQL, schema {schema}");
                let projections = std::sync::Arc::new(annal::projections::PgProjectionStore::new(&store).await?);
                let db = $crate::support::Db::Postgres(store.pool().clone());
                let outcome = $run(store.clone(), projections, db).await;
                store.close().await;
                $crate::support::drop_schema(&url, &schema).await;
                outcome
            }
            #[cfg(not(feature = "postgres"))]
            Some(_) => anyhow::bail!("DATABASE_URL is set: build with `--features postgres` to run on PostgreSQL"),
        }
    }};
}

/// A store in a new schema of the database at `url`, and the schema's name.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres(name: &str, url: &str) -> anyhow::Result<(annal::PgEventStore, String)> {
    use std::str::FromStr;

    use annal::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use annal::sqlx::{AssertSqlSafe, Connection, PgConnection};

    // The name is ours, made of letters, digits and `_`: safe to splice in.
    let schema = format!("example_{name}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(url).await?;
    annal::sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut admin).await?;
    admin.close().await?;
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new().max_connections(20).connect_with(options).await?;
    Ok((annal::PgEventStore::from_pool(pool).await?, schema))
}

/// Drops an example's schema; a failure only leaves it behind, so it is reported, not returned.
#[cfg(feature = "postgres")]
pub(crate) async fn drop_schema(url: &str, schema: &str) {
    use annal::sqlx::{AssertSqlSafe, Connection, PgConnection};
    let dropped = async {
        let mut admin = PgConnection::connect(url).await?;
        annal::sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut admin).await?;
        admin.close().await
    };
    if let Err(error) = dropped.await {
        eprintln!("could not drop schema {schema}: {error}");
    }
}

/// The `q` quantile (0 to 1) of sorted durations, nearest rank.
pub(crate) fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `p50 1.2 ms, p99 3.4 ms, max 5.6 ms (n samples)`, from unsorted durations.
pub(crate) fn distribution(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        ms(quantile(&samples, 0.5)),
        ms(quantile(&samples, 0.99)),
        ms(quantile(&samples, 1.0)),
        samples.len()
    )
}

/// A small, seeded random number generator (xorshift64*): the simulations need no
/// cryptographic randomness, only a different stream per client.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value).
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `[low, high)`.
    pub(crate) fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the examples' generic code asks of an event store.
pub(crate) trait Store: EventStore + Clone + 'static {}
impl<S: EventStore + Clone + 'static> Store for S {}

/// The projection store `on_backend!` hands to an example, beside its event store.
pub(crate) type Projections = Arc<dyn ProjectionStore>;
