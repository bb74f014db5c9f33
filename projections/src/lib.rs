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
mod error;
mod memory;
pub mod metrics;
#[cfg(feature = "postgres")]
mod postgres;
mod projection;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod queries;
mod rebuilds;
mod retry;
mod runner;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql_store;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;
mod trace;
mod worker;

pub use crate::dead_letters::{retry_dead_letter, skip_dead_letter};
pub use crate::dedup::Dedup;
#[doc(inline)]
pub use crate::error::{Error, Result};
pub use crate::memory::MemoryProjectionStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::postgres::PgProjectionStore;
pub use crate::projection::{Delivery, Projection, Tx, validate_name};
pub use crate::rebuilds::{RebuildMode, RebuildOutcome, RebuildProgress, RebuildUpdate, rebuild_stale_after};
pub use crate::retry::{OnFailure, RetryPolicy};
pub use crate::runner::{Lag, PartitionLag, ProjectionRunner, RunningProjections, partition_lag};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::sqlite::SqliteProjectionStore;
pub use crate::store::{
    Applied, Checkpoint, Control, DeadLetter, DedupStore, Fence, Lease, Park, Pause, ProjectionStore, batch_timeouts,
};
pub use crate::worker::{Latency, Progress, WorkerOptions};
pub use annal_eventstore::partition_of;
pub use annal_eventstore::{Filter, Position, RecordedEvent};
