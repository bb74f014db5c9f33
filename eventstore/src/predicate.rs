//! Content-based selection: conditions on an event's data, as data (not closures), so that each
//! SQL backend compiles them to SQL and the memory store evaluates the same rules in Rust.

use serde_json::Value;

/// A condition on the JSON data of an event, for [`Filter::with_data`](crate::Filter::with_data):
/// a selective consumer by content ("ride requests whose pickup is inside my area").
///
/// A *path* is a list of object keys from the root of the data (`["pickup", "lat"]`); it never
/// indexes into arrays, and a key may hold any character (dots and quotes included). The rules,
/// the same on every backend:
///
/// - A path that is missing, or runs into something that is not an object, matches nothing.
/// - Numbers are compared as 64-bit floats: `5`, `5.0` and `5e0` are equal, integers beyond
///   2^53 are rounded to the nearest float first. A string `"5"` is not the number `5`; a
///   comparison (`>=`, `<`, ...) matches numbers only, never strings, booleans or null. A NaN
///   operand matches nothing.
/// - [`Scalar::Null`] matches an explicit JSON `null`, not a missing key.
/// - Strings are equal when their characters are (no case folding, no Unicode normalisation).
/// - [`Predicate::Not`] is the exact complement: `not(eq(["a"], 1))` matches a missing `a`.
///   `And` of nothing matches everything, `Or` of nothing matches nothing.
///
/// Where it is evaluated: PostgreSQL in the database (jsonb operators, values bound as
/// parameters), SQLite in the database (`json_type` / `json_extract`, the path and values bound as
/// parameters), the memory store in Rust. A subscription at the head of the log takes its events
/// from the store's shared recent log and evaluates the predicate in Rust there, as it does the
/// categories; the conformance suite checks that every backend selects what the memory store
/// does, with generated events and predicates.
///
/// ```
/// use annal_eventstore::{Filter, Predicate};
///
/// // Ride requests whose pickup is in a box around a driver.
/// let near = Predicate::between(["pickup", "lat"], 52.50, 52.54)
///     .and(Predicate::between(["pickup", "lon"], 13.38, 13.42));
/// let filter = Filter::categories(["ride"]).with_event_types(["RideRequested"]).with_data(near);
/// assert!(!filter.is_all());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Predicate {
    /// The value at `path` equals `value`.
    Eq {
        /// Object keys from the root of the data.
        path: Vec<String>,
        /// The value it must equal.
        value: Scalar,
    },
    /// The value at `path` is a number and `number op value` holds.
    Compare {
        /// Object keys from the root of the data.
        path: Vec<String>,
        /// How it compares.
        op: Comparison,
        /// The number it is compared with.
        value: f64,
    },
    /// Every one of these holds (true when there are none).
    And(Vec<Predicate>),
    /// At least one of these holds (false when there are none).
    Or(Vec<Predicate>),
    /// This does not hold.
    Not(Box<Predicate>),
}

/// A JSON scalar that [`Predicate::Eq`] compares with.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Scalar {
    /// JSON `null` (not a missing key).
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, compared as a 64-bit float.
    Number(f64),
    /// A string, compared character by character.
    String(String),
}

/// How [`Predicate::Compare`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Comparison {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Comparison {
    /// The operator's SQL spelling (the same in every dialect).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Comparison::Lt => "<",
            Comparison::Le => "<=",
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
        }
    }

    fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Comparison::Lt => left < right,
            Comparison::Le => left <= right,
            Comparison::Gt => left > right,
            Comparison::Ge => left >= right,
        }
    }
}

/// Appends `items` joined by `separator` in parentheses, each compiled by the dialect's `push`,
/// or `empty` (the dialect's true or false) for none: an `AND` or `OR` in either dialect.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn push_list<DB: sqlx::Database>(
    q: &mut sqlx::QueryBuilder<DB>,
    items: &[Predicate],
    separator: &str,
    empty: &str,
    push: fn(&mut sqlx::QueryBuilder<DB>, &Predicate),
) {
    if items.is_empty() {
        q.push(empty);
        return;
    }
    q.push("(");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            q.push(separator);
        }
        push(q, item);
    }
    q.push(")");
}

impl Predicate {
    /// The value at `path` equals `value` (a string, number, boolean or [`Scalar::Null`]).
    pub fn eq<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P, value: impl Into<Scalar>) -> Self {
        Predicate::Eq { path: keys(path), value: value.into() }
    }

    /// The value at `path` equals one of `values`.
    pub fn one_of<P, S, I, V>(path: P, values: I) -> Self
    where
        P: IntoIterator<Item = S>,
        S: AsRef<str>,
        I: IntoIterator<Item = V>,
        V: Into<Scalar>,
    {
        let path = keys(path);
        Predicate::Or(
            values.into_iter().map(|value| Predicate::Eq { path: path.clone(), value: value.into() }).collect(),
        )
    }

    /// The value at `path` is a number below `value`.
    pub fn lt<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P, value: f64) -> Self {
        Predicate::Compare { path: keys(path), op: Comparison::Lt, value }
    }

    /// The value at `path` is a number at most `value`.
    pub fn le<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P, value: f64) -> Self {
        Predicate::Compare { path: keys(path), op: Comparison::Le, value }
    }

    /// The value at `path` is a number above `value`.
    pub fn gt<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P, value: f64) -> Self {
        Predicate::Compare { path: keys(path), op: Comparison::Gt, value }
    }

    /// The value at `path` is a number at least `value`.
    pub fn ge<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P, value: f64) -> Self {
        Predicate::Compare { path: keys(path), op: Comparison::Ge, value }
    }

    /// The value at `path` is a number in `low..=high`.
    pub fn between<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P, low: f64, high: f64) -> Self {
        let path = keys(path);
        Predicate::ge(&path, low).and(Predicate::le(&path, high))
    }

    /// This and `other` (flattened into one `And`).
    #[must_use]
    pub fn and(self, other: Predicate) -> Self {
        match self {
            Predicate::And(mut all) => {
                all.push(other);
                Predicate::And(all)
            }
            first => Predicate::And(vec![first, other]),
        }
    }

    /// This or `other` (flattened into one `Or`).
    #[must_use]
    pub fn or(self, other: Predicate) -> Self {
        match self {
            Predicate::Or(mut any) => {
                any.push(other);
                Predicate::Or(any)
            }
            first => Predicate::Or(vec![first, other]),
        }
    }

    /// The complement of this.
    #[must_use]
    #[allow(clippy::should_implement_trait)]
    pub fn not(self) -> Self {
        Predicate::Not(Box::new(self))
    }

    /// Whether `data` (an event's data) satisfies the predicate.
    pub fn matches(&self, data: &Value) -> bool {
        match self {
            Predicate::Eq { path, value } => lookup(data, path).is_some_and(|found| value.equals(found)),
            Predicate::Compare { path, op, value } => {
                lookup(data, path).and_then(Value::as_f64).is_some_and(|found| op.holds(found, *value))
            }
            Predicate::And(all) => all.iter().all(|p| p.matches(data)),
            Predicate::Or(any) => any.iter().any(|p| p.matches(data)),
            Predicate::Not(inner) => !inner.matches(data),
        }
    }
}

impl Scalar {
    fn equals(&self, found: &Value) -> bool {
        match (self, found) {
            (Scalar::Null, Value::Null) => true,
            (Scalar::Bool(b), Value::Bool(f)) => b == f,
            (Scalar::Number(n), Value::Number(f)) => f.as_f64() == Some(*n),
            (Scalar::String(s), Value::String(f)) => s == f,
            _ => false,
        }
    }
}

impl From<&str> for Scalar {
    fn from(value: &str) -> Self {
        Scalar::String(value.to_owned())
    }
}

impl From<String> for Scalar {
    fn from(value: String) -> Self {
        Scalar::String(value)
    }
}

impl From<bool> for Scalar {
    fn from(value: bool) -> Self {
        Scalar::Bool(value)
    }
}

impl From<f64> for Scalar {
    fn from(value: f64) -> Self {
        Scalar::Number(value)
    }
}

impl From<i64> for Scalar {
    #[allow(clippy::cast_precision_loss)] // numbers are compared as floats, by definition
    fn from(value: i64) -> Self {
        Scalar::Number(value as f64)
    }
}

impl From<i32> for Scalar {
    fn from(value: i32) -> Self {
        Scalar::Number(f64::from(value))
    }
}

impl From<()> for Scalar {
    fn from((): ()) -> Self {
        Scalar::Null
    }
}

/// The value at `path` in `data`, following object keys only.
fn lookup<'a>(data: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(data, |value, key| value.as_object()?.get(key))
}

fn keys<P: IntoIterator<Item = S>, S: AsRef<str>>(path: P) -> Vec<String> {
    path.into_iter().map(|key| key.as_ref().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_rules_as_a_table() {
        let data = json!({
            "n": 5, "f": 5.0, "s": "5", "t": true, "z": null, "a": [1, 2], "o": { "k.x": { "\"": 7 } },
            "big": 9_007_199_254_740_993u64,
        });
        let cases: &[(Predicate, bool)] = &[
            (Predicate::eq(["n"], 5), true),
            (Predicate::eq(["f"], 5), true),
            (Predicate::eq(["n"], 5.0), true),
            (Predicate::eq(["s"], 5), false),
            (Predicate::eq(["n"], "5"), false),
            (Predicate::eq(["s"], "5"), true),
            (Predicate::ge(["s"], 0.0), false),
            (Predicate::ge(["t"], 0.0), false),
            (Predicate::ge(["z"], f64::NEG_INFINITY), false),
            (Predicate::ge(["n"], f64::NEG_INFINITY), true),
            (Predicate::lt(["n"], f64::INFINITY), true),
            (Predicate::ge(["n"], f64::NAN), false),
            (Predicate::eq(["n"], f64::NAN), false),
            (Predicate::eq(["n"], f64::NAN).not(), true),
            (Predicate::eq(["z"], ()), true),
            (Predicate::eq(["missing"], ()), false),
            (Predicate::eq(["missing"], ()).not(), true),
            (Predicate::eq(["t"], true), true),
            (Predicate::eq(["t"], 1), false),
            (Predicate::eq(["a", "0"], 1), false),
            (Predicate::eq(["n", "x"], 1), false),
            (Predicate::eq(["o", "k.x", "\""], 7), true),
            (Predicate::eq(["big"], 9_007_199_254_740_992.0), true),
            (Predicate::between(["n"], 5.0, 5.0), true),
            (Predicate::between(["n"], 5.5, 9.0), false),
            (Predicate::one_of(["s"], ["4", "5"]), true),
            (Predicate::one_of(["s"], Vec::<&str>::new()), false),
            (Predicate::And(vec![]), true),
            (Predicate::Or(vec![]), false),
            (Predicate::gt(["n"], 4.0).or(Predicate::eq(["s"], "x")), true),
        ];
        for (predicate, expected) in cases {
            assert_eq!(predicate.matches(&data), *expected, "{predicate:?}");
        }
        assert!(Predicate::eq(Vec::<String>::new(), 3).matches(&json!(3)));
    }
}
