//! Positions in the global order.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The place of an event in the store's one global order (the `$all` log).
///
/// Positions are totally ordered and every reader sees the same order; a subscription resumes
/// from the last position it handled. Treat a position as opaque: it is a pair, compared
/// lexicographically, whose meaning depends on the backend. PostgreSQL uses (transaction id,
/// sequence number), which is what makes its order gap-free without a global write lock (see
/// `docs/ordering.md`); SQLite and the in-memory store use (0, sequence number). Positions of
/// different stores are not comparable. Keep the two parts when you store a position
/// ([`Position::transaction`], [`Position::sequence`], [`Position::new`]) or use its `Display`
/// / `FromStr` form `transaction/sequence`.
///
/// [`Position::START`] comes before every event.
///
/// ```
/// use annal_eventstore::Position;
///
/// let p: Position = "17/4031".parse().unwrap();
/// assert_eq!(p, Position::new(17, 4031));
/// assert!(Position::START < p);
/// assert_eq!(p.to_string(), "17/4031");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    transaction: u64,
    sequence: u64,
}

impl Position {
    /// Before the first event: reading or subscribing from here sees everything.
    pub const START: Position = Position { transaction: 0, sequence: 0 };

    /// Rebuilds a position from its two parts, as stored by a checkpoint.
    pub const fn new(transaction: u64, sequence: u64) -> Self {
        Position { transaction, sequence }
    }

    /// The first, most significant part (0 on SQLite and in memory).
    pub const fn transaction(self) -> u64 {
        self.transaction
    }

    /// The second part.
    pub const fn sequence(self) -> u64 {
        self.sequence
    }

    /// For a backend whose events are all at `(0, n)`: the sequence number this position stands
    /// for. A position with a transaction part comes after every such event: the end.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) const fn flat_sequence(self) -> u64 {
        if self.transaction == 0 { self.sequence } else { u64::MAX }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.transaction, self.sequence)
    }
}

/// The error of parsing a [`Position`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {0:?}: expected `transaction/sequence`, two unsigned integers")]
pub struct ParsePositionError(String);

impl FromStr for Position {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError(crate::error::truncated(s));
        let (t, q) = s.split_once('/').ok_or_else(err)?;
        Ok(Position::new(t.parse().map_err(|_| err())?, q.parse().map_err(|_| err())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_lexicographic_and_text_round_trips() {
        assert!(Position::new(1, 900) < Position::new(2, 1));
        assert!(Position::new(2, 1) < Position::new(2, 2));
        for p in [Position::START, Position::new(0, 7), Position::new(u64::MAX, u64::MAX)] {
            assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
        }
        for bad in ["", "1", "1/", "/2", "a/b", "-1/2", "1/2/3"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }
}
