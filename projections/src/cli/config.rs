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
    /// Event type → statement, with named parameters such as `:stream_id` and `:data`.
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

/// A piece of SQL text, as far as named parameters and table names are concerned.
#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// Copied as it is: string literals, comments, numbers, operators, white space.
    Verbatim(&'a str),
    /// A bare word: a keyword or an identifier.
    Word(&'a str),
    /// A double-quoted identifier, quotes included.
    Quoted(&'a str),
    /// A named parameter, `:name`, without its colon.
    Parameter(&'a str),
}

/// Splits SQL into [`Token`]s, so that nothing inside string literals, quoted identifiers,
/// comments or dollar-quoted bodies is taken for a parameter or a table name.
fn tokens(sql: &str) -> Vec<Token<'_>> {
    let b = sql.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let find = |from: usize, needle: &str| sql[from..].find(needle).map_or(sql.len(), |p| from + p + needle.len());
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let next = b.get(i + 1).copied();
        let token = match b[i] {
            b'\'' => {
                i = find(i + 1, "'");
                Token::Verbatim(&sql[start..i])
            }
            b'"' => {
                i = find(i + 1, "\"");
                Token::Quoted(&sql[start..i])
            }
            b'-' if next == Some(b'-') => {
                i = sql[i..].find('\n').map_or(sql.len(), |p| i + p);
                Token::Verbatim(&sql[start..i])
            }
            b'/' if next == Some(b'*') => {
                i = find(i + 2, "*/");
                Token::Verbatim(&sql[start..i])
            }
            b'$' if next.is_some_and(|c| !c.is_ascii_digit()) && dollar_tag(&sql[i..]).is_some() => {
                let tag = dollar_tag(&sql[i..]).unwrap_or("$$");
                i = find(i + tag.len(), tag);
                Token::Verbatim(&sql[start..i])
            }
            b':' if next == Some(b':') => {
                i += 2;
                Token::Verbatim(&sql[start..i])
            }
            b':' if next.is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                Token::Parameter(&sql[start + 1..i])
            }
            c if word(c) => {
                while i < b.len() && word(b[i]) {
                    i += 1;
                }
                if c.is_ascii_digit() { Token::Verbatim(&sql[start..i]) } else { Token::Word(&sql[start..i]) }
            }
            _ => {
                i += 1;
                Token::Verbatim(&sql[start..i])
            }
        };
        out.push(token);
    }
    out
}

/// The opening tag of a PostgreSQL dollar-quoted string (`$$` or `$name$`) at the start of `sql`.
fn dollar_tag(sql: &str) -> Option<&str> {
    let end = sql[1..].find('$')? + 2;
    let tag = &sql[..end];
    tag[1..end - 1].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_').then_some(tag)
}

/// Turns `:name` parameters into numbered ones (`$1::type` with `placeholder` `$`, for
/// PostgreSQL; `?1` otherwise, for SQLite), leaving string literals, quoted identifiers,
/// comments and `::` casts alone.
///
/// # Errors
/// A message naming an unknown parameter.
pub fn compile(sql: &str, placeholder: char) -> Result<Statement, String> {
    let (mut out, mut parameters) = (String::with_capacity(sql.len()), Vec::<&'static str>::new());
    for token in tokens(sql) {
        let name = match token {
            Token::Parameter(name) => name,
            Token::Verbatim(text) | Token::Word(text) | Token::Quoted(text) => {
                out.push_str(text);
                continue;
            }
        };
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
    }
    Ok(Statement { sql: out, parameters })
}

/// What a rebuild appends to the names of a projection and of its tables and indexes: it
/// builds the read model anew beside the live one, under these names.
pub const SHADOW_SUFFIX: &str = "__rebuild";

/// Rewrites `sql` to work on the shadow copies of `tables`: every identifier naming one of
/// them, and the name of every index the statement creates, gets [`SHADOW_SUFFIX`]. String
/// literals, comments and parameters are left alone.
pub fn shadow_sql(sql: &str, tables: &[String]) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    // The statement so far, upper-cased words and punctuation, to spot `CREATE ... INDEX name`.
    let mut statement: Vec<String> = Vec::new();
    for token in tokens(sql) {
        let (text, bare) = match token {
            Token::Word(word) => (word, word.to_ascii_lowercase()),
            Token::Quoted(quoted) => (quoted, quoted.trim_matches('"').to_owned()),
            Token::Parameter(name) => {
                out.push(':');
                out.push_str(name);
                statement.push(":".into());
                continue;
            }
            Token::Verbatim(text) => {
                out.push_str(text);
                let text = text.trim();
                if text == ";" {
                    statement.clear();
                } else if !text.is_empty() && !text.starts_with("--") && !text.starts_with("/*") {
                    statement.push(text.to_owned());
                }
                continue;
            }
        };
        let names_index = creates_index(&statement) && !["on", "if", "concurrently"].contains(&bare.as_str());
        if tables.contains(&bare) || names_index {
            match token {
                Token::Quoted(_) => out.push_str(&format!("\"{bare}{SHADOW_SUFFIX}\"")),
                _ => out.push_str(&format!("{bare}{SHADOW_SUFFIX}")),
            }
        } else {
            out.push_str(text);
        }
        statement.push(text.to_ascii_uppercase());
    }
    out
}

/// Whether the next identifier of `statement` names the index it creates:
/// `CREATE [UNIQUE] INDEX [CONCURRENTLY] [IF NOT EXISTS]` so far.
fn creates_index(statement: &[String]) -> bool {
    let mut words: Vec<&str> = statement.iter().map(String::as_str).collect();
    if words.ends_with(&["IF", "NOT", "EXISTS"]) {
        words.truncate(words.len() - 3);
    }
    if words.last() == Some(&"CONCURRENTLY") {
        words.pop();
    }
    matches!(words.as_slice(), ["CREATE", "INDEX"] | ["CREATE", "UNIQUE", "INDEX"])
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
            if projection.name.ends_with(SHADOW_SUFFIX) {
                return Err(format!(
                    "projection {:?}: names ending in {SHADOW_SUFFIX} are for rebuilds",
                    projection.name
                ));
            }
            if !projection.tables.is_empty() && projection.name.len() + SHADOW_SUFFIX.len() > 63 {
                return Err(format!(
                    "projection {:?}: with tables, a name has at most {} characters (a rebuild adds {SHADOW_SUFFIX})",
                    projection.name,
                    63 - SHADOW_SUFFIX.len()
                ));
            }
            let mut tables = HashSet::new();
            for table in &projection.tables {
                validate_table(table).map_err(|e| format!("projection {:?}: {e}", projection.name))?;
                if !tables.insert(table) {
                    return Err(format!("projection {:?} lists table {table:?} twice", projection.name));
                }
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
    fn the_lexer_leaves_literals_comments_and_casts_alone() {
        let s = compile("SELECT ':a', \":b\", $$ :c $$, $f$ :d $f$, /* :e */ :data::text, $1", '?').unwrap();
        assert_eq!(s.sql, "SELECT ':a', \":b\", $$ :c $$, $f$ :d $f$, /* :e */ ?1::text, $1");
        // Unterminated pieces run to the end rather than failing.
        assert_eq!(compile("SELECT 'open", '?').unwrap().sql, "SELECT 'open");
        assert_eq!(compile("SELECT :data /* open", '?').unwrap().sql, "SELECT ?1 /* open");
    }

    #[test]
    fn shadow_statements_name_the_shadow_tables_and_indexes() {
        let tables = ["balances".to_owned(), "owners".to_owned()];
        let cases = [
            (
                "CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, owners int) -- balances",
                "CREATE TABLE IF NOT EXISTS balances__rebuild (id text PRIMARY KEY, owners__rebuild int) -- balances",
            ),
            (
                "CREATE UNIQUE INDEX IF NOT EXISTS by_owner ON Balances (owner); CREATE INDEX ON balances (id)",
                "CREATE UNIQUE INDEX IF NOT EXISTS by_owner__rebuild ON balances__rebuild (owner); \
                 CREATE INDEX ON balances__rebuild (id)",
            ),
            (
                "INSERT INTO \"balances\" VALUES (:stream_id, 'balances') ON CONFLICT (id) DO UPDATE \
                 SET n = balances.n + 1 FROM public.owners",
                "INSERT INTO \"balances__rebuild\" VALUES (:stream_id, 'balances') ON CONFLICT (id) DO UPDATE \
                 SET n = balances__rebuild.n + 1 FROM public.owners__rebuild",
            ),
            ("SELECT balances_total FROM totals", "SELECT balances_total FROM totals"),
        ];
        for (sql, expected) in cases {
            assert_eq!(shadow_sql(sql, &tables), expected);
        }
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
            (ok.replace("name = 'a'", "name = 'a'\ntables = ['t', 't']"), "lists table \"t\" twice"),
            (ok.replace("name = 'a'", "name = 'a'\ntables = ['t; DROP']"), "invalid table name"),
            (ok.replace("name = 'a'", "name = 'a__rebuild'"), "are for rebuilds"),
        ];
        for (text, expected) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
