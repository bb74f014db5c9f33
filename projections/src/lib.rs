//! Annal projections: asynchronous workers that consume event store subscriptions and build
//! read models, with checkpoints, delivery guarantees, retries, dead letters, partitions and
//! lag measurement.
//!
//! This crate is being built; today it re-exports the event store types a projection consumes.

pub use annal_eventstore::{Filter, Position, RecordedEvent};
