//! Annal projections: asynchronous workers that follow the event store's global log and build
//! read models, with checkpoints, a delivery guarantee per projection, retries with back-off,
//! dead letters, and lag measurement.
//!
//! - A [`Projection`] has a name, a [filter](Projection::filter) (a selective consumer), a
//!   [`Delivery`] mode, a batch size and a handler.
//! - A [`ProjectionStore`] keeps checkpoints and dead letters beside the events:
//!   [`MemoryProjectionStore`], and `SqliteProjectionStore` / `PgProjectionStore` behind the
//!   `sqlite` / `postgres` features, whose transactions give exactly-once effect.
//! - A [`ProjectionRunner`] runs projections, sharing their partitions with other runner
//!   processes through leases; [`RunningProjections`] waits for positions (read-your-writes),
//!   reports [`Lag`] and shuts down gracefully.
//! - The `annal-runner` crate runs them from the command line: declarative SQL projections and
//!   your own Rust ones.
//!
//! The guarantees in plain words are in `docs/projections.md`; running it in production in
//! `docs/runner.md`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dead_letters;
mod dedup;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod projection;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod queries;
mod retry;
mod runner;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql_store;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;
mod worker;

use std::time::Duration;

pub use annal_eventstore::{Filter, Position, RecordedEvent};
use uuid::Uuid;

pub use crate::dead_letters::{retry_dead_letter, skip_dead_letter};
pub use crate::dedup::Dedup;
pub use crate::memory::MemoryProjectionStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::postgres::PgProjectionStore;
pub use crate::projection::{Delivery, Projection, Tx, validate_name};
pub use crate::retry::{OnFailure, RetryPolicy};
pub use crate::runner::{Lag, PartitionLag, ProjectionRunner, RunningProjections, partition_lag};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::sqlite::SqliteProjectionStore;
pub use crate::store::{Applied, Checkpoint, DeadLetter, DedupStore, Fence, Lease, Park, ProjectionStore};
pub use crate::worker::{Latency, Progress, WorkerOptions};
pub use annal_eventstore::partition_of;

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
    /// A projection gave up on an event under [`OnFailure::Stop`].
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
    /// A wait for a position ran out of time.
    #[error("position {position} was not reached within {waited:?}")]
    Timeout {
        /// The position waited for.
        position: Position,
        /// How long.
        waited: Duration,
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
