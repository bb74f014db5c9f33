//! The projections' one error type.

use std::time::Duration;

use annal_eventstore::Position;
use uuid::Uuid;

/// `Result` with the projections' [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong running projections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A projection name broke the naming rules.
    #[error("invalid projection name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// Two projections with one name.
    #[error("two projections are named {0:?}")]
    DuplicateName(String),
    /// No running projection has this name.
    #[error("no projection named {0:?} is running here")]
    UnknownProjection(String),
    /// A projection gave up on an event under [`crate::OnFailure::Stop`].
    #[error("projection {projection} stopped at event {event_id} ({position}) after {attempts} attempts: {reason}")]
    Stopped {
        /// The projection.
        projection: String,
        /// The event that kept failing.
        event_id: Uuid,
        /// Its position.
        position: Position,
        /// How many times it was tried.
        attempts: u32,
        /// The last error.
        reason: String,
    },
    /// No dead letter with this id.
    #[error("projection {projection} has no dead letter {id}")]
    NoDeadLetter {
        /// The projection.
        projection: String,
        /// The id asked for.
        id: i64,
    },
    /// A dead letter cannot be retried before an older one of its stream.
    #[error("dead letter {id} waits behind dead letter {older} of stream {stream}; retry or skip that one first")]
    OutOfOrder {
        /// The id asked for.
        id: i64,
        /// The older dead letter of the same stream.
        older: i64,
        /// The stream.
        stream: String,
    },
    /// A projection is configured with another partition count than its checkpoints were made
    /// with. Changing the count of a running projection would apply events twice or skip them,
    /// so it is refused.
    #[error(
        "projection {projection} has checkpoints for {stored} partition(s) but is configured with {configured}: \
         changing the count would apply events twice or skip them. Set partitions back to {stored}, or rebuild \
         the projection with the new count (`annal-runner rebuild {projection}` replays into shadow tables and \
         swaps them in; see docs/projections.md, \"Partitions\")"
    )]
    PartitionsChanged {
        /// The projection.
        projection: String,
        /// The count its checkpoints were made with.
        stored: u32,
        /// The count it is configured with now.
        configured: u32,
    },
    /// A wait for a position ran out of time.
    #[error("projection {projection} did not reach position {position} within {waited:?}")]
    Timeout {
        /// The projection waited for.
        projection: String,
        /// The position waited for.
        position: Position,
        /// How long.
        waited: Duration,
    },
    /// A wait for a position cannot end: the projection stopped, here or (no runner holds its
    /// partitions) everywhere.
    #[error("projection {projection} is not running, so it will not reach position {position}: {reason}")]
    NotRunning {
        /// The projection waited for.
        projection: String,
        /// The position waited for.
        position: Position,
        /// Why it is not running.
        reason: String,
    },
    /// A wait for a position cannot end while the projection is paused (`annal-runner pause`,
    /// or a rebuild or reset that took it over).
    #[error(
        "projection {projection} is paused by {by} ({reason}), so it will not reach position {position} until it is resumed"
    )]
    Paused {
        /// The projection waited for.
        projection: String,
        /// The position waited for.
        position: Position,
        /// Who paused it.
        by: String,
        /// Why.
        reason: String,
    },
    /// The projection passed the position waited for, but parked events on the way: its read
    /// model lacks them (see the dead letters).
    #[error("projection {projection} reached position {position} but parked {} event(s) on the way, the first at {}: its read model lacks them",
        parked.len(), parked.first().map_or_else(String::new, |p| p.to_string()))]
    Parked {
        /// The projection waited for.
        projection: String,
        /// The position waited for.
        position: Position,
        /// The positions of the events parked in the range waited for.
        parked: Vec<Position>,
    },
    /// The store cannot do what was asked (the in-memory store runs no SQL).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A worker task panicked.
    #[error("a projection worker panicked: {0}")]
    Panicked(String),
    /// The event store or the projection store failed.
    #[error(transparent)]
    Store(#[from] annal_eventstore::Error),
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Error::Store(error.into())
    }
}
