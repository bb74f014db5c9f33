//! Declarative SQL projections: each event type runs a parameterised statement in the
//! projection's transaction.

use std::collections::HashMap;

use annal_eventstore::{BoxError, Filter, RecordedEvent};
use annal_projections::{Projection, Tx};
use async_trait::async_trait;

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
        Ok(SqlProjection {
            name: config.name.clone(),
            filter: Filter::categories(&config.categories).with_event_types(config.handlers.keys()),
            batch_size: config.batch_size,
            partitions: config.partitions,
            postgres: compile_all('$')?,
            sqlite: compile_all('?')?,
        })
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
