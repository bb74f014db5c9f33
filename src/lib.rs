//! # Annal
//!
//! Event sourcing and CQRS for Rust: an append-only event store with optimistic concurrency and
//! idempotent appends, one gap-free global order, and subscriptions that catch up and then
//! follow live, on PostgreSQL (production), SQLite (embedded, the default) or memory (tests).
//!
//! | feature       | default | what it adds                                             |
//! |---------------|---------|----------------------------------------------------------|
//! | `sqlite`      | yes     | [`SqliteEventStore`], the embedded backend              |
//! | `postgres`    |         | [`PgEventStore`], the production backend                 |
//! | `projections` | yes     | the [`projections`] crate                                |
//! | `derive`      | yes     | `#[derive(Event)]`, `#[derive(Aggregate)]`               |
//! | `runner`      |         | the [`runner`] crate: `annal-runner` as a library        |
//! | `opentelemetry` |       | W3C trace context: appends keep their span's `traceparent`, projection spans link to it |
//!
//! With `sqlite` or `postgres`, `sqlx` is re-exported as `annal::sqlx`: write read models and
//! your own queries with it rather than adding `sqlx` yourself, so the versions always match.
//!
//! # Example
//!
//! ```
//! use annal::{EventStore, ExpectedVersion, MemoryEventStore, NewEvent, ReadStream, StreamName};
//! use futures::TryStreamExt;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> annal::Result<()> {
//! let store = MemoryEventStore::new();
//! let cart = StreamName::new("cart-7")?;
//! let written = store
//!     .append(&cart, ExpectedVersion::NoStream, vec![NewEvent::new("ItemAdded", json!({ "sku": "A1" }))])
//!     .await?;
//! store
//!     .append(&cart, ExpectedVersion::Exact(written.version), vec![NewEvent::new("CheckedOut", json!({}))])
//!     .await?;
//! let types: Vec<String> = store.read_stream(&cart, ReadStream::forwards()).map_ok(|e| e.event_type).try_collect().await?;
//! assert_eq!(types, ["ItemAdded", "CheckedOut"]);
//! # Ok(())
//! # }
//! ```
//!
//! Concepts and guarantees: `docs/concepts.md`; the global order on PostgreSQL:
//! `docs/ordering.md`; a projection end to end: `annal::guide::projections` (`docs/projections.md`).
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use annal_eventstore::*;
// Named again, beside the glob, so that their pages here carry the feature badge too.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
#[doc(inline)]
pub use annal_eventstore::SqliteEventStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use annal_eventstore::{GroupCommit, OpenTransaction, PgEventStore, PgTransaction};

#[cfg(feature = "projections")]
#[cfg_attr(docsrs, doc(cfg(feature = "projections")))]
#[doc(inline)]
pub use annal_projections as projections;

#[cfg(feature = "runner")]
#[cfg_attr(docsrs, doc(cfg(feature = "runner")))]
#[doc(inline)]
pub use annal_runner as runner;

#[cfg(feature = "derive")]
#[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
#[doc(inline)]
pub use annal_macros::{Aggregate, Event};

/// The `sqlx` Annal is built with, for read models and your own queries on the store's pool.
///
/// Use it instead of adding `sqlx` to your `Cargo.toml`: a projection handler's transaction
/// ([`projections::Tx`]) and the stores' pools are this version's types, and another version's
/// do not fit them.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # async fn events(store: &annal::SqliteEventStore) -> Result<i64, annal::sqlx::Error> {
/// annal::sqlx::query_scalar("SELECT COUNT(*) FROM annal_events").fetch_one(store.writer()).await
/// # }
/// ```
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[doc(no_inline)]
pub use sqlx;

/// Guides from `docs/`, included here so that their code compiles and runs as doctests.
pub mod guide {
    /// Concepts and guarantees: streams, versions, positions, expected versions, idempotence,
    /// reads and subscriptions.
    #[doc = include_str!("../docs/concepts.md")]
    pub mod concepts {}

    /// How the global order stays gap-free on PostgreSQL, and what open transactions do to
    /// subscribers.
    #[doc = include_str!("../docs/ordering.md")]
    pub mod ordering {}

    /// Aggregates, commands, the repository, snapshots and schema evolution.
    #[cfg(feature = "derive")]
    #[doc = include_str!("../docs/aggregates.md")]
    pub mod aggregates {}

    /// Projections end to end: a read model, read-your-writes, delivery modes, checkpoints,
    /// retries and dead letters, lag, partitions and leases.
    #[cfg(all(feature = "derive", feature = "projections", feature = "sqlite"))]
    #[doc = include_str!("../docs/projections.md")]
    pub mod projections {}
}

/// The README's code, compiled as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
