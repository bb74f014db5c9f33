//! Conversions shared by the SQL backends, which store unsigned numbers in signed columns.

/// A stored non-negative integer; a negative one (never written by the store) reads as 0.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

/// A number to bind; values past `i64::MAX` (never reached by versions or positions) saturate.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
