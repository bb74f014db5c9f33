//! Unsigned numbers (versions, position parts, lease tokens) in signed SQL integer columns, as
//! the SQL backends and the projection stores keep them; for your own SQL read models too.
//!
//! ```
//! use annal_eventstore::convert::{to_i64, to_u64};
//!
//! assert_eq!(to_u64(to_i64(42)), 42);
//! assert_eq!(to_i64(u64::MAX), i64::MAX);
//! assert_eq!(to_u64(-1), 0);
//! ```

/// A stored non-negative integer; a negative one (never written by the stores) reads as 0.
pub fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

/// A number to bind; values past `i64::MAX` (never reached by versions, positions or tokens)
/// saturate.
pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
