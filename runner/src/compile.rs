//! Handler statements: named parameters (`:stream_id`) compiled to the positional ones of each
//! database.

use crate::lexer::{Token, tokens};
use crate::{Error, Result};

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
pub(crate) fn postgres_type(parameter: &str) -> &'static str {
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
///
/// # Errors
/// [`Error::UnknownParameter`].
pub fn compile(sql: &str, placeholder: char) -> Result<Statement> {
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
            return Err(Error::UnknownParameter { name: name.to_owned() });
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
        let err = compile("SELECT :stream_name", '$').unwrap_err().to_string();
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
}
