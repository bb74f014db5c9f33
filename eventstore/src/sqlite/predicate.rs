//! [`Predicate`] compiled to SQLite: `json_type` guards the type, `json_extract` reads the value,
//! and the path and every value are bound as parameters, never written into the SQL.

use sqlx::{QueryBuilder, Sqlite};

use crate::predicate::push_list;
use crate::{Predicate, Scalar};

/// Appends ` AND <predicate>` for the filter's condition on the data, if it has one.
pub(super) fn push_data(q: &mut QueryBuilder<Sqlite>, predicate: Option<&Predicate>) {
    if let Some(predicate) = predicate {
        q.push(" AND ");
        push(q, predicate);
    }
}

/// Every leaf is `COALESCE(..., 0)`: never NULL, so `NOT` is the exact complement.
fn push(q: &mut QueryBuilder<Sqlite>, predicate: &Predicate) {
    match predicate {
        Predicate::Eq { path, value } => match value {
            Scalar::Null => type_is(q, path, "'null'"),
            Scalar::Bool(true) => type_is(q, path, "'true'"),
            Scalar::Bool(false) => type_is(q, path, "'false'"),
            Scalar::String(s) => {
                q.push("COALESCE(json_type(data, ")
                    .push_bind(json_path(path))
                    .push(") = 'text' AND json_extract(data, ");
                q.push_bind(json_path(path)).push(") = ").push_bind(s.clone()).push(", 0)");
            }
            Scalar::Number(n) => number(q, path, "=", *n),
        },
        Predicate::Compare { path, op, value } => number(q, path, op.sql(), *value),
        Predicate::And(all) => push_list(q, all, " AND ", "1", push),
        Predicate::Or(any) => push_list(q, any, " OR ", "0", push),
        Predicate::Not(inner) => {
            q.push("NOT ");
            push(q, inner);
        }
    }
}

fn type_is(q: &mut QueryBuilder<Sqlite>, path: &[String], json_type: &str) {
    q.push("COALESCE(json_type(data, ").push_bind(json_path(path)).push(format_args!(") = {json_type}, 0)"));
}

fn number(q: &mut QueryBuilder<Sqlite>, path: &[String], op: &str, value: f64) {
    if value.is_nan() {
        q.push("0");
        return;
    }
    q.push("COALESCE(json_type(data, ").push_bind(json_path(path));
    q.push(") IN ('integer', 'real') AND CAST(json_extract(data, ").push_bind(json_path(path));
    q.push(format_args!(") AS REAL) {op} ")).push_bind(value).push(", 0)");
}

/// SQLite's JSON path for a list of keys: each one a quoted label, escaped as a JSON string is
/// (SQLite reads the escapes), so a key may hold dots, quotes and brackets.
fn json_path(path: &[String]) -> String {
    let mut text = String::from("$");
    for key in path {
        text.push('.');
        text.push_str(&serde_json::Value::from(key.as_str()).to_string());
    }
    text
}
