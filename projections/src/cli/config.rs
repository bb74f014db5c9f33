//! The runner's configuration file and its declarative SQL projections.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use crate::projection::validate_name;

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
    /// The declarative SQL projections.
    #[serde(default, rename = "projection")]
    pub projections: Vec<SqlProjectionConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

fn default_lease() -> f64 {
    10.0
}

/// One SQL projection: each event type maps to a parameterised statement.
#[derive(Debug, Deserialize)]
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
    /// Statements run once before the projection starts (create its tables).
    #[serde(default)]
    pub setup: Vec<String>,
    /// Statements that empty the read model, run by `rebuild` with the checkpoint reset.
    #[serde(default)]
    pub reset: Vec<String>,
    /// Event type → statement, with named parameters such as `:stream_id` and `:data`.
    pub handlers: BTreeMap<String, String>,
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

/// The named parameters a handler statement may use.
pub const PARAMETERS: &[&str] = &[
    "stream",
    "stream_id",
    "category",
    "version",
    "position",
    "event_id",
    "event_type",
    "schema_version",
    "recorded_at",
    "data",
    "metadata",
];

/// A handler statement with its named parameters turned into positional ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    /// The SQL with `$1`.. (PostgreSQL) or `?1`.. (SQLite) placeholders.
    pub sql: String,
    /// The parameter bound to each placeholder, in order.
    pub parameters: Vec<&'static str>,
}

/// The PostgreSQL type of each parameter: placeholders carry it (`$2::jsonb`) so statements can
/// be prepared, and checked, before any value is bound.
fn postgres_type(parameter: &str) -> &'static str {
    match parameter {
        "data" | "metadata" => "jsonb",
        "recorded_at" => "timestamptz",
        "event_id" => "uuid",
        "version" | "schema_version" => "int8",
        _ => "text",
    }
}

/// Turns `:name` parameters into numbered ones (`$1::type` with `placeholder` `$`, for
/// PostgreSQL; `?1` otherwise, for SQLite), leaving string literals, quoted identifiers,
/// comments and `::` casts alone.
pub fn compile(sql: &str, placeholder: char) -> Result<Statement, String> {
    let chars: Vec<char> = sql.chars().collect();
    let (mut out, mut parameters) = (String::with_capacity(sql.len()), Vec::<&'static str>::new());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' | '"' => {
                let end = chars[i + 1..].iter().position(|&d| d == c).map_or(chars.len(), |p| i + 1 + p + 1);
                out.extend(&chars[i..end]);
                i = end;
            }
            '-' if chars.get(i + 1) == Some(&'-') => {
                let end = chars[i..].iter().position(|&d| d == '\n').map_or(chars.len(), |p| i + p);
                out.extend(&chars[i..end]);
                i = end;
            }
            ':' if chars.get(i + 1) == Some(&':') => {
                out.push_str("::");
                i += 2;
            }
            ':' if chars.get(i + 1).is_some_and(|d| d.is_ascii_alphabetic() || *d == '_') => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|d| !(d.is_ascii_alphanumeric() || *d == '_'))
                    .map_or(chars.len(), |p| i + 1 + p);
                let name: String = chars[i + 1..end].iter().collect();
                let Some(known) = PARAMETERS.iter().find(|p| **p == name) else {
                    return Err(format!("unknown parameter :{name}; the parameters are :{}", PARAMETERS.join(", :")));
                };
                let index = match parameters.iter().position(|p| p == known) {
                    Some(index) => index,
                    None => {
                        parameters.push(known);
                        parameters.len() - 1
                    }
                };
                out.push(placeholder);
                out.push_str(&(index + 1).to_string());
                if placeholder == '$' {
                    out.push_str("::");
                    out.push_str(postgres_type(known));
                }
                i = end;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(Statement { sql: out, parameters })
}

impl Config {
    /// Reads and checks a configuration: names, duplicates, parameters. (The SQL itself is
    /// checked against the database by `annal-runner check` and before `run`.)
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut names = HashSet::new();
        for projection in &config.projections {
            validate_name(&projection.name).map_err(|e| e.to_string())?;
            if !names.insert(projection.name.as_str()) {
                return Err(format!("two projections are named {:?}", projection.name));
            }
            if projection.handlers.is_empty() {
                return Err(format!("projection {:?} has no handlers", projection.name));
            }
            if projection.partitions == 0 {
                return Err(format!("projection {:?}: partitions must be at least 1", projection.name));
            }
            for (event_type, sql) in &projection.handlers {
                compile(sql, '$')
                    .map_err(|e| format!("projection {:?}, handler {event_type:?}: {e}", projection.name))?;
            }
        }
        if !config.database.starts_with("postgres") && !config.database.starts_with("sqlite:") {
            return Err(format!("database {:?}: use a postgres:// or sqlite:// URL", config.database));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_parameters_become_positional() {
        let s = compile("INSERT INTO t VALUES (:stream_id, (:data ->> 'a:b')::int, :stream_id, ':x') -- :nope", '$')
            .unwrap();
        assert_eq!(s.sql, "INSERT INTO t VALUES ($1::text, ($2::jsonb ->> 'a:b')::int, $1::text, ':x') -- :nope");
        assert_eq!(s.parameters, ["stream_id", "data"]);
        assert_eq!(compile("SELECT :version", '?').unwrap().sql, "SELECT ?1");
        let err = compile("SELECT :stream_name", '$').unwrap_err();
        assert!(err.contains("unknown parameter :stream_name"), "{err}");
    }

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
        ];
        for (text, expected) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
