//! [`Predicate`] compiled to PostgreSQL's jsonb operators: keys follow `->` (which gives NULL on
//! an array or a scalar, as the memory store's lookup does), the number cast is guarded by
//! `jsonb_typeof` so a non-number never errors, and every key and value is bound as a parameter.

use sqlx::{Postgres, QueryBuilder};

use crate::predicate::push_list;
use crate::{Predicate, Scalar};

/// Appends ` AND <predicate>` for the filter's condition on the data, if it has one.
pub(super) fn push_data(q: &mut QueryBuilder<Postgres>, predicate: Option<&Predicate>) {
    if let Some(predicate) = predicate {
        q.push(" AND ");
        push(q, predicate);
    }
}

/// Every leaf is `COALESCE(..., false)`: never NULL, so `NOT` is the exact complement.
fn push(q: &mut QueryBuilder<Postgres>, predicate: &Predicate) {
    match predicate {
        Predicate::Eq { path, value } => match value {
            Scalar::Null => {
                q.push("COALESCE(jsonb_typeof(");
                value_at(q, path);
                q.push(") = 'null', false)");
            }
            Scalar::Bool(b) => {
                q.push("COALESCE(");
                value_at(q, path);
                q.push(" = to_jsonb(").push_bind(*b).push("::boolean), false)");
            }
            Scalar::String(s) => {
                q.push("COALESCE(");
                value_at(q, path);
                q.push(" = to_jsonb(").push_bind(s.clone()).push("::text), false)");
            }
            Scalar::Number(n) => number(q, path, "=", *n),
        },
        Predicate::Compare { path, op, value } => number(q, path, op.sql(), *value),
        Predicate::And(all) => push_list(q, all, " AND ", "true", push),
        Predicate::Or(any) => push_list(q, any, " OR ", "false", push),
        Predicate::Not(inner) => {
            q.push("NOT ");
            push(q, inner);
        }
    }
}

fn value_at(q: &mut QueryBuilder<Postgres>, path: &[String]) {
    q.push("(data");
    for key in path {
        q.push(" -> ").push_bind(key.clone()).push("::text");
    }
    q.push(")");
}

fn number(q: &mut QueryBuilder<Postgres>, path: &[String], op: &str, value: f64) {
    if value.is_nan() {
        q.push("false");
        return;
    }
    q.push("COALESCE(CASE WHEN jsonb_typeof(");
    value_at(q, path);
    q.push(") = 'number' THEN ");
    value_at(q, path);
    q.push(format_args!("::float8 {op} ")).push_bind(value).push("::float8 END, false)");
}
