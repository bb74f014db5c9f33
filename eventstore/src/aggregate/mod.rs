//! Aggregates: plain state with a pure decision function and a pure evolution function, loaded
//! and saved by a [`Repository`].

mod event;
mod repository;
mod snapshot;

use std::fmt;

pub use event::Event;
pub use repository::{CommandError, Committed, Executed, Loaded, Repository};
pub use snapshot::{Snapshot, SnapshotPolicy};

use crate::{Result, StreamName};

/// The wiring of an aggregate: its stream category, id, event type and snapshot policy.
///
/// `#[derive(Aggregate)]` writes this from `#[aggregate(...)]`; the behaviour lives in
/// [`Decide`], which you write by hand.
///
/// ```
/// use annal_eventstore::{Aggregate, Decide, SnapshotPolicy};
/// # use annal_eventstore::Event;
/// # #[derive(Debug, Clone, PartialEq)] enum CounterEvent { Added(u64) }
/// # impl Event for CounterEvent {
/// #     const EVENT_TYPES: &'static [&'static str] = &["Added"];
/// #     fn event_type(&self) -> &'static str { "Added" }
/// #     fn schema_version(&self) -> u32 { 1 }
/// #     fn to_data(&self) -> annal_eventstore::Result<serde_json::Value> { let CounterEvent::Added(n) = self; Ok((*n).into()) }
/// #     fn from_stored(_: &str, _: u32, data: serde_json::Value) -> annal_eventstore::Result<Self> {
/// #         Ok(CounterEvent::Added(data.as_u64().unwrap_or_default()))
/// #     }
/// # }
///
/// #[derive(Default)]
/// struct Counter { total: u64 }
///
/// impl Aggregate for Counter {
///     const CATEGORY: &'static str = "counter";
///     type Id = u32;
///     type Event = CounterEvent;
/// }
/// ```
pub trait Aggregate: Default + Send + Sync + Sized + 'static {
    /// The category of the aggregate's streams: an aggregate with id `42` lives in the stream
    /// `CATEGORY-42`.
    const CATEGORY: &'static str;

    /// The aggregate's id.
    type Id: fmt::Display + Send + Sync + ?Sized;

    /// The events the aggregate records.
    type Event: Event;

    /// When to write snapshots (default: never).
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::Never
    }

    /// The state as a snapshot payload (only called when the policy writes snapshots).
    ///
    /// # Errors
    /// [`crate::Error::Encode`] if the state cannot be encoded.
    fn to_snapshot(&self) -> Result<serde_json::Value> {
        Err(crate::Error::Encode("this aggregate does not take snapshots".into()))
    }

    /// The state back from a snapshot payload written by [`Aggregate::to_snapshot`] with the
    /// current snapshot schema version.
    ///
    /// # Errors
    /// [`crate::Error::Decode`] if the payload does not fit.
    fn from_snapshot(_snapshot: serde_json::Value) -> Result<Self> {
        Err(crate::Error::Decode {
            what: format!("snapshot of {}", Self::CATEGORY),
            event_type: Self::CATEGORY.to_owned(),
            schema_version: 0,
            reason: "this aggregate does not take snapshots".into(),
        })
    }

    /// The stream of the aggregate with this id.
    ///
    /// # Errors
    /// [`crate::Error::InvalidStreamName`] if the id does not make a valid stream name.
    fn stream_name(id: &Self::Id) -> Result<StreamName> {
        StreamName::from_parts(Self::CATEGORY, id)
    }
}

/// The behaviour of an aggregate: decide which events a command causes, and evolve the state by
/// an event. Both are pure: no I/O; what a decision needs is in the state or in the command.
pub trait Decide: Aggregate {
    /// What the aggregate is asked to do.
    type Command: Send;
    /// Why it refuses.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides the events a command causes, or refuses it. Returning no events is allowed
    /// (nothing is written).
    ///
    /// # Errors
    /// The domain's reason to refuse the command.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves the state by one event. Must not fail: the event already happened.
    fn apply(&mut self, event: &Self::Event);
}

/// Replays events onto a fresh state.
pub fn replay<'a, A: Decide>(events: impl IntoIterator<Item = &'a A::Event>) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(event);
    }
    state
}
