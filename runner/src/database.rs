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

/// What a command may do to the database, which decides how it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `migrate` and `run`: a missing SQLite file is created, and the schema brought up to date.
    Migrate,
    /// `rebuild`, `dead-letters retry` and `skip`: they write, but only into an existing schema
    /// that is up to date.
    Write,
    /// Every other command: nothing is created, migrated or written. SQLite files are opened
    /// read-only; PostgreSQL sessions are read-only (`default_transaction_read_only`), so a role
    /// with `SELECT` rights alone is enough.
    ReadOnly,
}

impl Database {
    /// Connects, giving up after [`CONNECT_TIMEOUT`] with an error naming the host (or the file)
    /// and the cause, such as "connection refused". A relative SQLite path is taken relative to
    /// `base`, the configuration file's directory, and must exist unless `access` migrates.
    pub(crate) async fn connect(url: &str, base: &std::path::Path, access: Access) -> Result<Self> {
        // Only SQLite paths are relative to it.
        #[cfg(not(feature = "sqlite"))]
        let _ = base;
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres") {
            use std::str::FromStr;
            let mut options = sqlx::postgres::PgConnectOptions::from_str(url)
                .map_err(|e| Error::Connect { target: "PostgreSQL (invalid URL)".into(), source: Box::new(e) })?;
            if access == Access::ReadOnly {
                options = options.options([("default_transaction_read_only", "on")]);
            }
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
            let store = match access {
                Access::Migrate => annal_eventstore::PgEventStore::from_pool(pool).await,
                Access::Write | Access::ReadOnly => annal_eventstore::PgEventStore::from_migrated_pool(pool).await,
            };
            return store
                .map(Database::Postgres)
                .map_err(|e| not_migrated(&target, e).unwrap_or_else(|e| failed(Box::new(e))));
        }
        #[cfg(feature = "sqlite")]
        if url.starts_with("sqlite:") {
            use annal_eventstore::SqliteEventStore;
            let options = sqlite_options(url, base)?;
            let file = options.get_filename().to_owned();
            let target = format!("SQLite database {}", file.display());
            if access != Access::Migrate && !file.exists() {
                return Err(Error::NoDatabase { file });
            }
            let store = match access {
                Access::Migrate => SqliteEventStore::open_with(options.create_if_missing(true)).await,
                Access::Write => SqliteEventStore::open_migrated(options).await,
                Access::ReadOnly => SqliteEventStore::open_read_only(options).await,
            };
            return store.map(Database::Sqlite).map_err(|e| {
                not_migrated(&target, e).unwrap_or_else(|e| Error::Connect { target, source: Box::new(e) })
            });
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

    /// The projection store, its tables created or upgraded first if `access` migrates, and
    /// otherwise checked to be up to date.
    pub(crate) async fn projection_store(&self, access: Access) -> Result<Arc<dyn ProjectionStore>> {
        use annal_projections::Error::Store;
        let missing = |error: annal_projections::Error| match error {
            Store(e) => not_migrated("the projection store", e).unwrap_or_else(|e| Store(e).into()),
            e => Error::from(e),
        };
        let migrate = access == Access::Migrate;
        Ok(match *self {
            #[cfg(feature = "postgres")]
            Database::Postgres(ref store) => Arc::new(if migrate {
                annal_projections::PgProjectionStore::new(store).await?
            } else {
                annal_projections::PgProjectionStore::migrated(store).await.map_err(missing)?
            }),
            #[cfg(feature = "sqlite")]
            Database::Sqlite(ref store) => Arc::new(if migrate {
                annal_projections::SqliteProjectionStore::new(store).await?
            } else {
                annal_projections::SqliteProjectionStore::migrated(store).await.map_err(missing)?
            }),
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
    /// naming a table that does not exist, is found here, before anything runs. Without
    /// `commit`, it is rolled back (and with no setup statements, it writes nothing: `check`).
    pub(crate) async fn check(&self, setup: &[String], projections: &[SqlProjection], commit: bool) -> Result<()> {
        each_backend!(self, |store, pool, handlers, begin| {
            let mut tx = if commit { pool.begin_with(begin).await? } else { pool.begin().await? };
            // Serialised between runners starting together: concurrent `CREATE TABLE IF NOT
            // EXISTS` can fail on PostgreSQL.
            if commit && self.is_postgres() {
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

impl Database {
    /// On PostgreSQL, makes the handlers of `projections` functions so that each applies a batch
    /// in one statement ([`SqlProjection::install_postgres`]). One that cannot (a role that may
    /// not create functions) is logged, and runs a statement per event instead.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) async fn install(&self, projections: &[SqlProjection]) {
        #[cfg(feature = "postgres")]
        #[allow(irrefutable_let_patterns)] // Built with PostgreSQL alone.
        if let Database::Postgres(store) = self {
            for projection in projections {
                if let Err(error) = projection.install_postgres(store.pool()).await {
                    tracing::warn!(projection = projection.name(), %error,
                        "handler functions could not be made: a statement per event instead of one per batch");
                }
            }
        }
    }
}

/// The runner's error for a schema that is not up to date, naming `target` and what to do; any
/// other error given back.
fn not_migrated(target: &str, error: annal_eventstore::Error) -> std::result::Result<Error, annal_eventstore::Error> {
    match error {
        annal_eventstore::Error::NotMigrated { .. } => {
            Ok(Error::NotMigrated { target: target.to_owned(), source: Box::new(error) })
        }
        error => Err(error),
    }
}

/// The options of a `sqlite:` URL, a relative path taken relative to `base` (the configuration
/// file's directory, not wherever the command is run from).
#[cfg(feature = "sqlite")]
fn sqlite_options(url: &str, base: &std::path::Path) -> Result<sqlx::sqlite::SqliteConnectOptions> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::Connect { target: format!("SQLite database {url}"), source: Box::new(e) })?;
    let file = options.get_filename();
    // sqlx names in-memory databases `file:...`.
    if file.is_absolute() || file.starts_with("file:") {
        return Ok(options);
    }
    let file = base.join(file);
    Ok(options.filename(file))
}

/// The projection named `name` among `projections`.
pub(crate) fn find(projections: &[Arc<dyn Projection>], name: &str) -> Result<Arc<dyn Projection>> {
    projections.iter().find(|p| p.name() == name).cloned().ok_or_else(|| Error::UnknownProjection(name.to_owned()))
}
