//! Declarative SQL projections: each event type runs a parameterised statement in the
//! projection's transaction.
//!
//! On PostgreSQL a batch is one statement once [`SqlProjection::install_postgres`] has made a
//! function of each handler statement: the statement runs every event's function in order, so
//! a batch of a hundred events costs one round trip instead of a hundred.

use std::collections::HashMap;
#[cfg(feature = "postgres")]
use std::sync::atomic::{AtomicBool, Ordering};

use annal_eventstore::{BoxError, Filter, RecordedEvent};
use annal_projections::{Projection, Tx};
use async_trait::async_trait;
#[cfg(feature = "postgres")]
use sqlx::{AssertSqlSafe, SqlSafeStr};
#[cfg(feature = "postgres")]
use uuid::Uuid;

use crate::compile::{Statement, compile};
use crate::config::SqlProjectionConfig;
use crate::{Error, Result};

/// A projection made from configuration: event type → SQL statement with bound parameters.
/// Values are always bound, never spliced into the SQL text.
#[derive(Debug)]
pub struct SqlProjection {
    name: String,
    filter: Filter,
    batch_size: usize,
    partitions: u32,
    postgres: HashMap<String, Statement>,
    sqlite: HashMap<String, Statement>,
    /// The handlers as functions, and the statement that runs a batch through them.
    #[cfg(feature = "postgres")]
    batch: Batch,
}

impl SqlProjection {
    /// Compiles a configured projection.
    ///
    /// # Errors
    /// [`Error::Handler`] naming the handler whose parameters are wrong.
    pub fn new(config: &SqlProjectionConfig) -> Result<Self> {
        let compile_all = |placeholder| {
            config
                .handlers
                .iter()
                .map(|(event_type, sql)| {
                    compile(sql, placeholder).map(|s| (event_type.clone(), s)).map_err(|e| Error::Handler {
                        projection: config.name.clone(),
                        event_type: event_type.clone(),
                        source: Box::new(e),
                    })
                })
                .collect::<Result<HashMap<_, _>>>()
        };
        let postgres = compile_all('$')?;
        Ok(SqlProjection {
            name: config.name.clone(),
            filter: Filter::categories(&config.categories).with_event_types(config.handlers.keys()),
            batch_size: config.batch_size,
            partitions: config.partitions,
            #[cfg(feature = "postgres")]
            batch: Batch::new(&postgres),
            postgres,
            sqlite: compile_all('?')?,
        })
    }

    /// Makes each handler statement a function in `pool`'s database (`annal_handler_` and a
    /// hash of its text, in the first schema of the search path; one that exists is left
    /// alone), so that from then on this projection applies a batch in one statement instead of
    /// one per event. The runner calls it when it starts; without it, or if it fails, every
    /// event runs its statement as its own round trip, with the same effect.
    ///
    /// The functions are `LANGUAGE sql`: each runs its statement with the event's values as
    /// arguments, bound, never spliced. If one is dropped later, the batch that meets its
    /// absence fails, is retried event by event with plain statements, and the projection goes
    /// on that way until the next start installs it again.
    ///
    /// # Errors
    /// The database's, for a role that may not create functions in the schema, for example.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn install_postgres(&self, pool: &sqlx::PgPool) -> Result<()> {
        let mut tx = pool.begin().await?;
        // Serialised between runners starting together, as their setup statements are.
        sqlx::query("SELECT pg_advisory_xact_lock(7046716111)").execute(&mut *tx).await?;
        for function in &self.batch.functions {
            let exists: bool = sqlx::query_scalar("SELECT to_regprocedure($1) IS NOT NULL")
                .bind(&function.signature)
                .fetch_one(&mut *tx)
                .await?;
            if !exists {
                sqlx::raw_sql(AssertSqlSafe(function.create.clone())).execute(&mut *tx).await?;
            }
        }
        if !self.batch.handlers.is_empty() {
            sqlx::Executor::prepare(&mut *tx, AssertSqlSafe(self.batch.call.clone()).into_sql_str()).await?;
        }
        tx.commit().await?;
        self.batch.installed.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether a batch runs as one statement ([`install_postgres`](Self::install_postgres)
    /// succeeded, and no function has gone missing since).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn batches_in_one_statement(&self) -> bool {
        self.batch.installed.load(Ordering::Acquire)
    }

    /// The handler statements in PostgreSQL's spelling, to check them against the database.
    pub fn postgres_statements(&self) -> impl Iterator<Item = (&String, &Statement)> {
        self.postgres.iter()
    }

    /// The handler statements in SQLite's spelling.
    pub fn sqlite_statements(&self) -> impl Iterator<Item = (&String, &Statement)> {
        self.sqlite.iter()
    }
}

#[async_trait]
impl Projection for SqlProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> Filter {
        self.filter.clone()
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> Result<(), BoxError> {
        #[cfg(feature = "postgres")]
        if let Tx::Postgres(conn) = tx
            && self.batches_in_one_statement()
        {
            return self.batch.run(events, conn).await;
        }
        #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(unused_variables))]
        for event in events {
            match tx {
                #[cfg(feature = "postgres")]
                Tx::Postgres(conn) => {
                    let Some(statement) = self.postgres.get(&event.event_type) else { continue };
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(statement.sql.clone()));
                    for parameter in &statement.parameters {
                        query = match *parameter {
                            "recorded_at" => query.bind(event.recorded_at),
                            "data" => query.bind(event.data.clone()),
                            "metadata" => query.bind(serde_json::to_value(&event.metadata)?),
                            "event_id" => query.bind(event.id),
                            "version" => query.bind(i64::try_from(event.version)?),
                            "schema_version" => query.bind(i64::from(event.schema_version)),
                            other => query.bind(text(event, other)),
                        };
                    }
                    query.execute(&mut **conn).await?;
                }
                #[cfg(feature = "sqlite")]
                Tx::Sqlite(conn) => {
                    let Some(statement) = self.sqlite.get(&event.event_type) else { continue };
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(statement.sql.clone()));
                    for parameter in &statement.parameters {
                        query = match *parameter {
                            "recorded_at" => query.bind(event.recorded_at.timestamp_micros()),
                            "data" => query.bind(event.data.to_string()),
                            "metadata" => query.bind(serde_json::to_string(&event.metadata)?),
                            "event_id" => query.bind(event.id),
                            "version" => query.bind(i64::try_from(event.version)?),
                            "schema_version" => query.bind(i64::from(event.schema_version)),
                            other => query.bind(text(event, other)),
                        };
                    }
                    query.execute(&mut **conn).await?;
                }
                _ => return Err("a SQL projection needs a database transaction".into()),
            }
        }
        Ok(())
    }
}

/// A projection's handlers as PostgreSQL functions, and the one statement that runs a batch
/// through them.
#[cfg(feature = "postgres")]
#[derive(Debug)]
struct Batch {
    /// Each handled event type's place in the call's `CASE`.
    handlers: HashMap<String, i32>,
    functions: Vec<Function>,
    /// The parameters the call binds, an array each, after the handlers' places.
    columns: Vec<&'static str>,
    /// `SELECT CASE e.handler WHEN 0 THEN annal_handler_..(e.c1, ..) .. END FROM unnest(..) AS e(..)`.
    call: String,
    installed: AtomicBool,
}

/// One handler statement as a function.
#[cfg(feature = "postgres")]
#[derive(Debug)]
struct Function {
    /// `name(type, ..)`, as `to_regprocedure` reads it.
    signature: String,
    /// `CREATE FUNCTION ...`.
    create: String,
}

#[cfg(feature = "postgres")]
impl Batch {
    fn new(statements: &HashMap<String, Statement>) -> Self {
        use crate::compile::{PARAMETERS, postgres_type};
        let columns: Vec<&'static str> =
            PARAMETERS.iter().copied().filter(|p| statements.values().any(|s| s.parameters.contains(p))).collect();
        let column = |parameter: &str| columns.iter().position(|c| *c == parameter).map_or(0, |i| i + 1);
        let mut event_types: Vec<&String> = statements.keys().collect();
        event_types.sort();
        let (mut handlers, mut functions, mut cases) = (HashMap::new(), Vec::new(), String::new());
        for (index, event_type) in event_types.into_iter().enumerate() {
            let statement = &statements[event_type];
            let types: Vec<&str> = statement.parameters.iter().map(|p| postgres_type(p)).collect();
            // A dollar-quote tag the statement does not contain.
            let tag = (0..).map(|n| format!("$annal{n}$")).find(|tag| !statement.sql.contains(tag)).unwrap_or_default();
            let definition =
                format!("({}) RETURNS void LANGUAGE sql VOLATILE AS {tag}\n{}\n{tag}", types.join(", "), statement.sql);
            let name = format!("annal_handler_{}", Uuid::new_v5(&Uuid::NAMESPACE_OID, definition.as_bytes()).simple());
            let arguments: Vec<String> = statement.parameters.iter().map(|p| format!("e.c{}", column(p))).collect();
            cases.push_str(&format!(" WHEN {index} THEN {name}({})", arguments.join(", ")));
            functions.push(Function {
                signature: format!("{name}({})", types.join(",")),
                create: format!("CREATE FUNCTION {name}{definition}"),
            });
            handlers.insert(event_type.clone(), i32::try_from(index).unwrap_or(i32::MAX));
        }
        let arrays = std::iter::once("$1::int4[]".to_owned())
            .chain(columns.iter().enumerate().map(|(i, p)| format!("${}::{}[]", i + 2, postgres_type(p))))
            .collect::<Vec<_>>();
        let aliases = std::iter::once("handler".to_owned())
            .chain((1..=columns.len()).map(|i| format!("c{i}")))
            .collect::<Vec<_>>();
        let call =
            format!("SELECT CASE e.handler{cases} END FROM unnest({}) AS e({})", arrays.join(", "), aliases.join(", "));
        Batch { handlers, functions, columns, call, installed: AtomicBool::new(false) }
    }

    /// Applies `events` in one statement, each through its event type's function, in order.
    async fn run(&self, events: &[RecordedEvent], conn: &mut sqlx::PgConnection) -> Result<(), BoxError> {
        let (events, handlers): (Vec<&RecordedEvent>, Vec<i32>) =
            events.iter().filter_map(|e| Some((e, *self.handlers.get(&e.event_type)?))).unzip();
        if events.is_empty() {
            return Ok(());
        }
        let mut query = sqlx::query(AssertSqlSafe(self.call.clone())).bind(handlers);
        for column in &self.columns {
            query = match *column {
                "recorded_at" => query.bind(events.iter().map(|e| e.recorded_at).collect::<Vec<_>>()),
                "data" => query.bind(events.iter().map(|e| e.data.clone()).collect::<Vec<_>>()),
                "metadata" => {
                    query.bind(events.iter().map(|e| serde_json::to_value(&e.metadata)).collect::<Result<Vec<_>, _>>()?)
                }
                "event_id" => query.bind(events.iter().map(|e| e.id).collect::<Vec<_>>()),
                "version" => {
                    query.bind(events.iter().map(|e| i64::try_from(e.version)).collect::<Result<Vec<_>, _>>()?)
                }
                "schema_version" => query.bind(events.iter().map(|e| i64::from(e.schema_version)).collect::<Vec<_>>()),
                other => query.bind(events.iter().map(|e| text(e, other)).collect::<Vec<_>>()),
            };
        }
        match query.execute(conn).await {
            Ok(_) => Ok(()),
            // A function dropped since it was installed: this batch fails and is retried event
            // by event, and from now on every event runs its statement.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42883") => {
                self.installed.store(false, Ordering::Release);
                tracing::warn!(%error, "a handler function is missing: statements run one per event until the next start");
                Err(sqlx::Error::Database(error).into())
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// The text parameters.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
fn text(event: &RecordedEvent, parameter: &str) -> String {
    match parameter {
        "stream" => event.stream.to_string(),
        "stream_id" => event.stream.id().unwrap_or_default().to_owned(),
        "category" => event.stream.category().to_owned(),
        "position" => event.position.to_string(),
        _ => event.event_type.clone(),
    }
}
