//! The database the runner works on: one of the backends it was built with, chosen by the URL.
// Built without a backend, the runner can only refuse every URL.
#![cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(unreachable_code, unused_variables))]

use std::sync::Arc;

use annal_eventstore::EventStore;
use annal_projections::{Projection, ProjectionStore};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
use sqlx::{AssertSqlSafe, Executor, SqlSafeStr};

use crate::{Error, Result, SqlProjection};

/// How long connecting to the database may take before the command gives up.
#[cfg(feature = "postgres")]
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The event store and projection store of one database.
#[derive(Clone)]
pub(crate) enum Database {
    #[cfg(feature = "postgres")]
    Postgres(annal_eventstore::PgEventStore),
    #[cfg(feature = "sqlite")]
    Sqlite(annal_eventstore::SqliteEventStore),
}

/// Runs `$body` with `$store` bound to the backend's event store, `$pool` to the pool that
/// writes, `$statements` to the SQL projection's statements in the backend's spelling and `$begin`
/// to the backend's BEGIN.
macro_rules! each_backend {
    ($database:expr, |$store:ident, $pool:ident, $statements:ident, $begin:ident| $body:expr) => {
        match *$database {
            #[cfg(feature = "postgres")]
            Database::Postgres(ref $store) => {
                #[allow(unused_variables)]
                let ($pool, $begin, $statements) = ($store.pool(), "BEGIN", SqlProjection::postgres_statements);
                $body
            }
            #[cfg(feature = "sqlite")]
            Database::Sqlite(ref $store) => {
                #[allow(unused_variables)]
                let ($pool, $begin, $statements) =
                    ($store.writer(), "BEGIN IMMEDIATE", SqlProjection::sqlite_statements);
                $body
            }
        }
    };
}

impl Database {
    /// Connects, giving up after [`CONNECT_TIMEOUT`] with an error naming the host (or the file)
    /// and the cause, such as "connection refused".
    pub(crate) async fn connect(url: &str) -> Result<Self> {
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres") {
            use std::str::FromStr;
            let options = sqlx::postgres::PgConnectOptions::from_str(url)
                .map_err(|e| Error::Connect { target: "PostgreSQL (invalid URL)".into(), source: Box::new(e) })?;
            let target = format!("PostgreSQL at {}:{}", options.get_host(), options.get_port());
            let failed = |source: annal_eventstore::BoxError| Error::Connect { target: target.clone(), source };
            // One connection first: its error says why (a pool's would only say it timed out).
            let probe = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::ConnectOptions::connect(&options))
                .await
                .map_err(|_| failed(format!("no answer within {CONNECT_TIMEOUT:?}").into()))?
                .map_err(|e| failed(Box::new(e)))?;
            drop(probe);
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| failed(Box::new(e)))?;
            let store = annal_eventstore::PgEventStore::from_pool(pool).await.map_err(|e| failed(Box::new(e)))?;
            return Ok(Database::Postgres(store));
        }
        #[cfg(feature = "sqlite")]
        if url.starts_with("sqlite:") {
            let file = url.trim_start_matches("sqlite:").trim_start_matches("//");
            let target = format!("SQLite database {file}");
            return annal_eventstore::SqliteEventStore::connect(url)
                .await
                .map(Database::Sqlite)
                .map_err(|e| Error::Connect { target, source: Box::new(e) });
        }
        Err(Error::UnsupportedDatabase(url.to_owned()))
    }

    /// The streams of `category` (or all), with their event counts, by category and name.
    pub(crate) async fn streams(&self, category: Option<&str>) -> Result<Vec<(String, String, i64)>> {
        let rows = each_backend!(self, |store, pool, statements, begin| {
            let sql = if self.is_postgres() {
                "SELECT category, stream, count(*)::bigint FROM annal_events WHERE ($1::text IS NULL OR category = $1) \
                 GROUP BY category, stream ORDER BY category, stream"
            } else {
                "SELECT category, stream, count(*) FROM annal_events WHERE (?1 IS NULL OR category = ?1) \
                 GROUP BY category, stream ORDER BY category, stream"
            };
            sqlx::query_as::<_, (String, String, i64)>(sql).bind(category).fetch_all(pool).await?
        });
        Ok(rows)
    }

    /// Whether this is PostgreSQL (whose shadow-table swap locks the live tables first).
    pub(crate) fn is_postgres(&self) -> bool {
        match *self {
            #[cfg(feature = "postgres")]
            Database::Postgres(_) => true,
            #[cfg(feature = "sqlite")]
            Database::Sqlite(_) => false,
        }
    }

    /// How long the oldest transaction holding an id has been open (PostgreSQL; `None` elsewhere
    /// or when there is none).
    pub(crate) async fn oldest_transaction_age(&self) -> Result<Option<std::time::Duration>> {
        match *self {
            #[cfg(feature = "postgres")]
            Database::Postgres(ref store) => Ok(store.oldest_open_transaction().await?.map(|t| t.age)),
            #[cfg(feature = "sqlite")]
            Database::Sqlite(_) => Ok(None),
        }
    }

    pub(crate) fn events(&self) -> Arc<dyn EventStore> {
        let events: Arc<dyn EventStore> = each_backend!(self, |store, pool, statements, begin| Arc::new(store.clone()));
        events
    }

    pub(crate) async fn projection_store(&self) -> Result<Arc<dyn ProjectionStore>> {
        Ok(match *self {
            #[cfg(feature = "postgres")]
            Database::Postgres(ref store) => Arc::new(annal_projections::PgProjectionStore::new(store).await?),
            #[cfg(feature = "sqlite")]
            Database::Sqlite(ref store) => Arc::new(annal_projections::SqliteProjectionStore::new(store).await?),
        })
    }

    /// Runs statements in one transaction, committing only if `commit`.
    pub(crate) async fn execute(&self, statements: &[String], commit: bool) -> Result<()> {
        each_backend!(self, |store, pool, handlers, begin| {
            let mut tx = pool.begin().await?;
            for statement in statements {
                sqlx::raw_sql(AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
            }
            if commit { tx.commit().await? } else { tx.rollback().await? }
        });
        Ok(())
    }

    /// Runs the `setup` statements, then prepares every handler statement: invalid SQL, or SQL
    /// naming a table that does not exist, is found here, before anything runs.
    pub(crate) async fn check(&self, setup: &[String], projections: &[SqlProjection], commit: bool) -> Result<()> {
        each_backend!(self, |store, pool, handlers, begin| {
            let mut tx = pool.begin_with(begin).await?;
            // Serialised between runners starting together: concurrent `CREATE TABLE IF NOT
            // EXISTS` can fail on PostgreSQL.
            if self.is_postgres() {
                sqlx::query("SELECT pg_advisory_xact_lock(7046716111)").execute(&mut *tx).await?;
            }
            for statement in setup {
                sqlx::raw_sql(AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
            }
            for projection in projections {
                for (event_type, statement) in handlers(projection) {
                    tx.prepare(AssertSqlSafe(statement.sql.clone()).into_sql_str()).await.map_err(|e| {
                        Error::Handler {
                            projection: projection.name().to_owned(),
                            event_type: event_type.clone(),
                            source: Box::new(e),
                        }
                    })?;
                }
            }
            if commit { tx.commit().await? } else { tx.rollback().await? }
        });
        Ok(())
    }
}

/// The projection named `name` among `projections`.
pub(crate) fn find(projections: &[Arc<dyn Projection>], name: &str) -> Result<Arc<dyn Projection>> {
    projections.iter().find(|p| p.name() == name).cloned().ok_or_else(|| Error::UnknownProjection(name.to_owned()))
}
