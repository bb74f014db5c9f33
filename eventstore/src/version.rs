//! Stream versions and optimistic concurrency.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Position;

/// What an append expects of the stream's current version: the optimistic-concurrency check.
///
/// Versions count a stream's events from 0: a stream whose last event is at version 4 holds five
/// events. An append whose expectation does not hold fails with
/// [`Error::Conflict`](crate::Error::Conflict) and writes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check: append at the end, whatever the stream's state.
    Any,
    /// The stream must not exist yet (its first event will be version 0).
    NoStream,
    /// The stream must exist, at any version.
    StreamExists,
    /// The stream's last event must be at exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// The expectation that matches a stream whose last version is `current` (`None`: no stream).
    pub fn from_current(current: Option<u64>) -> Self {
        current.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
    }

    /// Whether a stream whose last version is `current` (`None`: no stream) satisfies this.
    pub fn is_satisfied_by(self, current: Option<u64>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current.is_none(),
            ExpectedVersion::StreamExists => current.is_some(),
            ExpectedVersion::Exact(v) => current == Some(v),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// The outcome of a successful append.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendResult {
    /// The version of the batch's last event. After a new append it is the stream's version:
    /// pass `ExpectedVersion::Exact(version)` to append after it. After an idempotent retry
    /// (`already_written` below) it is where the batch was written
    /// the first time, which the stream may have moved past since.
    pub version: u64,
    /// The global position of each event of the batch, in batch order.
    pub positions: Vec<Position>,
    /// `true` when nothing was written because this batch was already in the stream: the
    /// append was an idempotent retry, answered with the first append's result.
    pub already_written: bool,
}

impl AppendResult {
    pub(crate) fn new(version: u64, positions: Vec<Position>) -> Self {
        AppendResult { version, positions, already_written: false }
    }

    pub(crate) fn already_written(version: u64, positions: Vec<Position>) -> Self {
        AppendResult { version, positions, already_written: true }
    }

    /// The position of the batch's last event: wait for a subscriber to pass it to read your
    /// own writes.
    pub fn position(&self) -> Position {
        self.positions.last().copied().unwrap_or(Position::START)
    }
}
