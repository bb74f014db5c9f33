//! The configuration file (TOML): its schema and the rules it is checked against.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use annal_projections::validate_name;

use crate::compile::compile;
use crate::shadow::{SHADOW_SUFFIX, shadow_sql};
use crate::{Error, Result};

/// The configuration file (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://...` or `sqlite://path`.
    pub database: String,
    /// Where `/health` and `/metrics` are served (default `127.0.0.1:9187`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// How long a partition lease lasts, in seconds (default 10).
    #[serde(default = "default_lease")]
    pub lease_seconds: f64,
    /// The token the console's actions (retry, skip) require, as `Authorization: Bearer
    /// TOKEN`; without one the console is read-only. Put it in the environment: `"${ANNAL_TOKEN}"`.
    #[serde(default)]
    pub console_token: Option<String>,
    /// When `/health/ready` fails, beyond a stopped partition or an unreadable log.
    #[serde(default)]
    pub health: HealthConfig,
    /// The declarative SQL projections.
    #[serde(default, rename = "projection")]
    pub projections: Vec<SqlProjectionConfig>,
}

/// Readiness thresholds (`[health]`): `/health/ready` answers 503 when a projection partition
/// passes one. Each is off when left out.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthConfig {
    /// The most events a partition may be behind the head.
    pub max_events_behind: Option<u64>,
    /// The most seconds a partition may be behind (the age of its oldest unapplied event).
    pub max_seconds_behind: Option<f64>,
    /// The most dead letters a projection may have.
    pub max_dead_letters: Option<u64>,
}

/// `on_failure` in the configuration file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailureConfig {
    /// Park the event as a dead letter and go on.
    #[default]
    Park,
    /// Stop the projection at the event (`/health/ready` then fails with `stopped`).
    Stop,
}

impl From<OnFailureConfig> for annal_projections::OnFailure {
    fn from(value: OnFailureConfig) -> Self {
        match value {
            OnFailureConfig::Park => annal_projections::OnFailure::Park,
            OnFailureConfig::Stop => annal_projections::OnFailure::Stop,
        }
    }
}

/// The range `lease_seconds` must be in: long enough for a renewal round trip, short enough
/// that a dead runner's partitions are taken over within a day.
pub(crate) const LEASE_SECONDS: std::ops::RangeInclusive<f64> = 0.5..=86_400.0;

/// The largest `batch_size`.
pub(crate) const MAX_BATCH_SIZE: usize = 100_000;

/// The largest `partitions`.
pub(crate) const MAX_PARTITIONS: u32 = 1024;

/// The largest `retry_attempts`.
pub(crate) const MAX_RETRY_ATTEMPTS: u32 = 1000;

/// The largest `retry_initial_ms` (one hour).
pub(crate) const MAX_RETRY_INITIAL_MS: u64 = 3_600_000;

/// Reads `handlers`, refusing a nested table with the hint TOML users need: an unquoted dotted
/// key (`shop.OrderPlaced = "..."`) is a table `shop` holding `OrderPlaced`, not an event type.
fn handlers<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    raw.into_iter()
        .map(|(event_type, value)| match value {
            toml::Value::String(sql) => Ok((event_type, sql)),
            toml::Value::Table(table) => {
                let dotted = dotted_key(&event_type, &table);
                Err(serde::de::Error::custom(format!(
                    "handler {dotted} is read as nested tables because its key has dots: quote the event type, as in \"{dotted}\" = \"...\""
                )))
            }
            other => Err(serde::de::Error::custom(format!(
                "handler {event_type:?} must be an SQL statement in a string, not {other}"
            ))),
        })
        .collect()
}

/// The dotted key TOML split into nested tables, back in one piece (`shop.OrderPlaced`).
fn dotted_key(first: &str, table: &toml::Table) -> String {
    match table.iter().next() {
        Some((key, toml::Value::Table(inner))) => dotted_key(&format!("{first}.{key}"), inner),
        Some((key, _)) => format!("{first}.{key}"),
        None => first.to_owned(),
    }
}

fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

fn default_lease() -> f64 {
    10.0
}

/// One SQL projection: each event type maps to a parameterised statement.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlProjectionConfig {
    /// The projection's name.
    pub name: String,
    /// Only streams of these categories (default: all).
    #[serde(default)]
    pub categories: Vec<String>,
    /// Events per batch (default 100).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Partitions (default 1).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Attempts per failing event before it is parked (default 7).
    #[serde(default = "default_attempts")]
    pub retry_attempts: u32,
    /// The first pause between attempts, in milliseconds (default 100; it doubles, up to 60 s).
    #[serde(default = "default_retry_ms")]
    pub retry_initial_ms: u64,
    /// What happens to an event that still fails after its last attempt: `"park"` it as a dead
    /// letter and go on (the default), or `"stop"` the projection at it.
    #[serde(default)]
    pub on_failure: OnFailureConfig,
    /// Statements run once before the projection starts (create its tables).
    #[serde(default)]
    pub setup: Vec<String>,
    /// Statements that empty the read model, run by `rebuild --in-place` with the checkpoint
    /// reset.
    #[serde(default)]
    pub reset: Vec<String>,
    /// The tables the projection owns. With them, `rebuild` builds the read model anew in
    /// shadow tables (`<table>__rebuild`, made by the setup statements rewritten) while the live
    /// one keeps serving, and swaps it in when it has caught up; without them, it rebuilds in
    /// place.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Event type → statement, with named parameters such as `:stream_id` and `:data`. An event
    /// type with dots (`shop.OrderPlaced`) needs a quoted key, or TOML reads it as nested tables.
    #[serde(deserialize_with = "handlers")]
    pub handlers: BTreeMap<String, String>,
}

impl SqlProjectionConfig {
    /// The same projection working on shadow copies of its tables, named with
    /// [`SHADOW_SUFFIX`], for a rebuild that swaps them in when caught up; `None` if it
    /// declares no tables.
    pub fn shadow(&self) -> Option<SqlProjectionConfig> {
        if self.tables.is_empty() {
            return None;
        }
        let rewrite = |statements: &[String]| statements.iter().map(|s| shadow_sql(s, &self.tables)).collect();
        Some(SqlProjectionConfig {
            name: format!("{}{SHADOW_SUFFIX}", self.name),
            setup: rewrite(&self.setup),
            reset: rewrite(&self.reset),
            handlers: self.handlers.iter().map(|(t, sql)| (t.clone(), shadow_sql(sql, &self.tables))).collect(),
            tables: self.tables.iter().map(|t| format!("{t}{SHADOW_SUFFIX}")).collect(),
            ..self.clone()
        })
    }

    /// Statements that drop the shadow tables of a rebuild.
    pub fn drop_shadow(&self) -> Vec<String> {
        self.tables.iter().map(|t| format!("DROP TABLE IF EXISTS {t}{SHADOW_SUFFIX}")).collect()
    }

    /// Statements that put the shadow tables' rows in place of the live ones and drop the
    /// shadow tables, in one transaction: readers see the old read model until it commits. On
    /// PostgreSQL, the live tables are locked against writes first, so that a live batch in
    /// flight commits before the swap or waits for it.
    pub fn promotion(&self, postgres: bool) -> Vec<String> {
        let mut statements = Vec::new();
        if postgres {
            statements.push(format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", self.tables.join(", ")));
        }
        for table in &self.tables {
            statements.push(format!("DELETE FROM {table}"));
            statements.push(format!("INSERT INTO {table} SELECT * FROM {table}{SHADOW_SUFFIX}"));
        }
        statements.extend(self.drop_shadow());
        statements
    }
}

/// Checks a table name: the rules of projection names, and room for [`SHADOW_SUFFIX`].
fn validate_table(table: &str) -> Result<(), String> {
    validate_name(table).map_err(|e| e.to_string().replace("projection name", "table name"))?;
    if table.len() + SHADOW_SUFFIX.len() > 63 {
        return Err(format!("table name {table:?} is too long: at most {} characters", 63 - SHADOW_SUFFIX.len()));
    }
    Ok(())
}

fn default_batch() -> usize {
    100
}

fn default_partitions() -> u32 {
    1
}

fn default_attempts() -> u32 {
    7
}

fn default_retry_ms() -> u64 {
    100
}

impl Config {
    /// Reads and checks a configuration: names, duplicates, parameters. (The SQL itself is
    /// checked against the database by `annal-runner check` and before `run`.)
    ///
    /// # Errors
    /// [`Error::Config`] for a file that is not valid TOML of this schema or breaks a rule,
    /// [`Error::Projections`] for an invalid projection name, [`Error::Handler`] for a handler
    /// with an unknown parameter.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let mut names = HashSet::new();
        for projection in &config.projections {
            validate_name(&projection.name)?;
            if !names.insert(projection.name.as_str()) {
                return Err(Error::Config(format!("two projections are named {:?}", projection.name)));
            }
            if projection.handlers.is_empty() {
                return Err(Error::Config(format!("projection {:?} has no handlers", projection.name)));
            }
            if projection.name.ends_with(SHADOW_SUFFIX) {
                return Err(Error::Config(format!(
                    "projection {:?}: names ending in {SHADOW_SUFFIX} are for rebuilds",
                    projection.name
                )));
            }
            if !projection.tables.is_empty() && projection.name.len() + SHADOW_SUFFIX.len() > 63 {
                return Err(Error::Config(format!(
                    "projection {:?}: with tables, a name has at most {} characters (a rebuild adds {SHADOW_SUFFIX})",
                    projection.name,
                    63 - SHADOW_SUFFIX.len()
                )));
            }
            let mut tables = HashSet::new();
            for table in &projection.tables {
                validate_table(table).map_err(|e| Error::Config(format!("projection {:?}: {e}", projection.name)))?;
                if !tables.insert(table) {
                    return Err(Error::Config(format!("projection {:?} lists table {table:?} twice", projection.name)));
                }
            }
            let range =
                |key: &str, rule: String| Error::Config(format!("projection {:?}: {key} {rule}", projection.name));
            if !(1..=MAX_PARTITIONS).contains(&projection.partitions) {
                return Err(range(
                    "partitions",
                    format!("must be from 1 to {MAX_PARTITIONS}, not {}", projection.partitions),
                ));
            }
            if !(1..=MAX_BATCH_SIZE).contains(&projection.batch_size) {
                return Err(range(
                    "batch_size",
                    format!("must be from 1 to {MAX_BATCH_SIZE}, not {}", projection.batch_size),
                ));
            }
            if !(1..=MAX_RETRY_ATTEMPTS).contains(&projection.retry_attempts) {
                let rule = format!("must be from 1 to {MAX_RETRY_ATTEMPTS}, not {}", projection.retry_attempts);
                return Err(range("retry_attempts", rule));
            }
            if projection.retry_initial_ms > MAX_RETRY_INITIAL_MS {
                let rule = format!("must be at most {MAX_RETRY_INITIAL_MS}, not {}", projection.retry_initial_ms);
                return Err(range("retry_initial_ms", rule));
            }
            for (event_type, sql) in &projection.handlers {
                compile(sql, '$').map_err(|e| Error::Handler {
                    projection: projection.name.clone(),
                    event_type: event_type.clone(),
                    source: Box::new(e),
                })?;
            }
        }
        if !config.lease_seconds.is_finite() || !LEASE_SECONDS.contains(&config.lease_seconds) {
            return Err(Error::Config(format!(
                "lease_seconds must be a number of seconds from {} to {}, not {}",
                LEASE_SECONDS.start(),
                LEASE_SECONDS.end(),
                config.lease_seconds
            )));
        }
        if !config.database.starts_with("postgres") && !config.database.starts_with("sqlite:") {
            return Err(Error::Config(format!("database {:?}: use a postgres:// or sqlite:// URL", config.database)));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let ok = "database = 'sqlite://x.db'\n[[projection]]\nname = 'a'\nhandlers = { E = 'SELECT :data' }\n";
        assert!(Config::parse(ok).is_ok());
        let cases = [
            (ok.replace("name = 'a'", "name = 'a'\ncolour = 'red'"), "unknown field"),
            (format!("{ok}[[projection]]\nname = 'a'\nhandlers = {{ E = 'SELECT 1' }}\n"), "two projections"),
            (ok.replace("name = 'a'", "name = 'Robert; DROP TABLE'"), "invalid projection name"),
            (ok.replace(":data", ":dta"), "unknown parameter :dta"),
            (ok.replace("sqlite://x.db", "mysql://x"), "postgres:// or sqlite://"),
            (ok.replace("name = 'a'", "name = 'a'\ntables = ['t', 't']"), "lists table \"t\" twice"),
            (ok.replace("name = 'a'", "name = 'a'\ntables = ['t; DROP']"), "invalid table name"),
            (ok.replace("name = 'a'", "name = 'a__rebuild'"), "are for rebuilds"),
            (format!("lease_seconds = inf\n{ok}"), "lease_seconds must be"),
            (format!("lease_seconds = 1e20\n{ok}"), "lease_seconds must be"),
            (format!("lease_seconds = nan\n{ok}"), "lease_seconds must be"),
            (format!("lease_seconds = -3\n{ok}"), "lease_seconds must be"),
            (format!("lease_seconds = 0\n{ok}"), "lease_seconds must be"),
            (ok.replace("name = 'a'", "name = 'a'\npartitions = 0"), "partitions must be from 1"),
            (ok.replace("name = 'a'", "name = 'a'\npartitions = 100000"), "partitions must be from 1"),
            (ok.replace("name = 'a'", "name = 'a'\nbatch_size = 0"), "batch_size must be from 1"),
            (ok.replace("name = 'a'", "name = 'a'\nretry_attempts = 0"), "retry_attempts must be from 1"),
            (ok.replace("name = 'a'", "name = 'a'\nretry_initial_ms = 99999999999"), "retry_initial_ms must be"),
            (ok.replace("name = 'a'", "name = 'a'\non_failure = 'explode'"), "unknown variant"),
            (ok.replace("name = 'a'", "name = 'a'\nbatch_size = -1"), "batch_size"),
            (ok.replace("E = ", "shop.OrderPlaced = "), "quote the event type, as in \"shop.OrderPlaced\" = \"...\""),
            (ok.replace("E = ", "a.b.C = "), "as in \"a.b.C\" = "),
            (
                ok.replace("handlers = { E = 'SELECT :data' }", "[projection.handlers]\nshop.OrderPlaced = 'SELECT 1'"),
                "handler shop.OrderPlaced is read as nested tables",
            ),
            (ok.replace("'SELECT :data'", "3"), "must be an SQL statement in a string, not 3"),
        ];
        for (text, expected) in cases {
            let err = Config::parse(&text).unwrap_err().report();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn quoted_dotted_event_types_are_handlers() {
        let text = "database = 'sqlite://x.db'\n[[projection]]\nname = 'a'\n[projection.handlers]\n\"shop.OrderPlaced\" = 'SELECT 1'\n";
        let config = Config::parse(text).unwrap();
        assert_eq!(config.projections[0].handlers.keys().collect::<Vec<_>>(), ["shop.OrderPlaced"]);
    }

    #[test]
    fn on_failure_stop_can_be_set() {
        let text = "database = 'sqlite://x.db'\nlease_seconds = 2.5\n[[projection]]\nname = 'a'\non_failure = 'stop'\nhandlers = { E = 'SELECT 1' }\n";
        let config = Config::parse(text).unwrap();
        assert_eq!(config.projections[0].on_failure, OnFailureConfig::Stop);
        assert_eq!(crate::dispatch::options_for(&config, "a").on_failure, annal_projections::OnFailure::Stop);
    }
}

/// Replaces each `${NAME}` in the configuration's text with the environment variable `NAME`
/// (`$${` stands for a literal `${`), so that secrets such as the database password stay out of
/// the file.
///
/// # Errors
/// [`Error::MissingEnv`] for a variable that is not set; [`Error::Config`] for a `${` that is
/// not closed.
pub fn substitute_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
            } else if let Some(after) = tail.strip_prefix("${") {
                let end = after
                    .find('}')
                    .ok_or_else(|| Error::Config(format!("line {}: `${{` without its `}}`", index + 1)))?;
                let name = &after[..end];
                let value = env(name).ok_or_else(|| Error::MissingEnv { name: name.to_owned(), line: index + 1 })?;
                out.push_str(&value);
                rest = &after[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod env_tests {
    use super::substitute_env;
    use crate::Error;

    #[test]
    fn substitutes_escapes_and_refuses_unset_variables() {
        let env = |name: &str| (name == "PASSWORD").then(|| "s3cret".to_owned());
        let text = "database = \"postgres://app:${PASSWORD}@db/app\"\nx = \"$${PASSWORD} $5\"\n";
        assert_eq!(
            substitute_env(text, env).unwrap(),
            "database = \"postgres://app:s3cret@db/app\"\nx = \"${PASSWORD} $5\"\n"
        );
        match substitute_env("a = 1\nb = \"${NOPE}\"", env) {
            Err(Error::MissingEnv { name, line }) => assert_eq!((name.as_str(), line), ("NOPE", 2)),
            other => panic!("{other:?}"),
        }
        assert!(substitute_env("b = \"${NOPE\"", env).is_err());
    }
}
