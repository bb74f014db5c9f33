//! The Annal event store: append-only streams with optimistic concurrency, one gap-free global
//! order, and subscriptions that catch up and then follow live.
//!
//! Most users depend on the `annal` facade crate, which re-exports this one.
//!
//! | feature    | backend                                   |
//! |------------|-------------------------------------------|
//! | (always)   | [`MemoryEventStore`], for tests           |
//! | `sqlite`   | [`SqliteEventStore`], embedded            |
//! | `postgres` | [`PgEventStore`], for production          |
//!
//! # Example
//!
//! Append from a domain service and follow the global log, as a projection would:
//!
//! ```
//! use annal_eventstore::{EventStore, ExpectedVersion, Filter, MemoryEventStore, NewEvent, Position, StreamName};
//! use futures::StreamExt;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> annal_eventstore::Result<()> {
//! let store = MemoryEventStore::new();
//! let account = StreamName::new("account-42")?;
//! store.append(&account, ExpectedVersion::NoStream, vec![NewEvent::new("Opened", json!({}))]).await?;
//!
//! // A stale writer loses: the stream is at version 0, not "no stream".
//! let stale = store.append(&account, ExpectedVersion::NoStream, vec![NewEvent::new("Opened", json!({}))]).await;
//! assert!(stale.unwrap_err().is_conflict());
//!
//! let mut accounts = store.subscribe(Position::START, Filter::categories(["account"]));
//! let first = accounts.next().await.expect("a subscription never ends by itself")?;
//! assert_eq!((first.stream.as_str(), first.version), ("account-42", 0));
//! # Ok(())
//! # }
//! ```
//!
//! The guarantees in plain words are in `docs/concepts.md` and `docs/ordering.md`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod aggregate;
mod append;
mod error;
mod event;
mod filter;
mod follower;
mod memory;
pub mod metrics;
mod position;
mod predicate;
#[doc(hidden)]
pub mod __private {
    pub use crate::private::*;
}
mod private;
mod store;
mod stream;
mod subscription;
mod tail;
mod trace;
mod version;
mod wakeup;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub mod convert;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod schema;
#[cfg(feature = "sqlite")]
mod sqlite;
pub mod testing;

#[doc(inline)]
pub use crate::aggregate::{
    Aggregate, CommandError, Committed, Decide, Event, Executed, Loaded, Repository, Snapshot, SnapshotPolicy, replay,
};
#[doc(inline)]
pub use crate::error::{BoxError, Error, Result};
#[doc(inline)]
pub use crate::event::{
    DEFAULT_MAX_EVENT_SIZE, MAX_EVENT_TYPE_LEN, MAX_JSON_DEPTH, MAX_SCHEMA_VERSION, Metadata, NewEvent,
    RESERVED_METADATA_KEYS, RecordedEvent, UnreadableEvent,
};
#[doc(inline)]
pub use crate::filter::{Filter, partition_of};
#[doc(inline)]
pub use crate::follower::Follower;
#[doc(inline)]
pub use crate::memory::MemoryEventStore;
#[doc(inline)]
pub use crate::position::{ParsePositionError, Position};
#[doc(inline)]
pub use crate::predicate::{Comparison, Predicate, Scalar};
#[doc(inline)]
pub use crate::store::{DEFAULT_PAGE_SIZE, Direction, EventStore, Page, ReadStream};
#[doc(inline)]
pub use crate::stream::{MAX_STREAM_NAME_LEN, StreamName};
#[doc(inline)]
pub use crate::subscription::SubscriptionOptions;
#[doc(inline)]
pub use crate::trace::{ParseTraceParentError, TraceParent};
#[doc(inline)]
pub use crate::version::{AppendResult, ExpectedVersion};
#[doc(inline)]
pub use crate::wakeup::{Notifier, Wakeup};
/// The attribute [`EventStore`] implementations use (the trait is object-safe through it).
pub use async_trait::async_trait;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use crate::postgres::{GroupCommit, OpenTransaction, PgEventStore, PgTransaction};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
#[doc(inline)]
pub use crate::sqlite::SqliteEventStore;
