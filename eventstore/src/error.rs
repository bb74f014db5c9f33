//! The one error type of the event store.

use uuid::Uuid;

use crate::{ExpectedVersion, StreamName};

/// A boxed error from a lower layer (the database driver, the JSON encoder).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the event store's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when talking to an event store.
///
/// Errors about the caller's input ([`InvalidStreamName`](Error::InvalidStreamName),
/// [`InvalidEventType`](Error::InvalidEventType), [`EventTooLarge`](Error::EventTooLarge),
/// [`EmptyBatch`](Error::EmptyBatch), [`DuplicateEventInBatch`](Error::DuplicateEventInBatch)) are
/// detected before anything is written. Rejected appends never write part of a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stream name broke the naming rules.
    #[error("invalid stream name {name:?}: {reason}")]
    InvalidStreamName {
        /// The rejected name (shortened to 300 bytes if it was longer).
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// An event type name broke the naming rules.
    #[error("invalid event type {event_type:?}: {reason}")]
    InvalidEventType {
        /// The rejected event type (shortened to 300 bytes if it was longer).
        event_type: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// An event's encoded size (type, data and metadata) is above the store's limit.
    #[error("event {event_id} is {size} bytes, above the limit of {max} bytes")]
    EventTooLarge {
        /// The event's id.
        event_id: Uuid,
        /// Its encoded size in bytes.
        size: usize,
        /// The store's limit in bytes.
        max: usize,
    },

    /// An event's data or metadata holds something the store cannot keep faithfully: a NUL
    /// character (`\u0000`) in a string or key, which PostgreSQL's `jsonb` rejects. Every
    /// backend refuses it, so events can move between backends.
    #[error("event {event_id}: {reason}")]
    UnsupportedData {
        /// The event's id.
        event_id: Uuid,
        /// What is unsupported.
        reason: &'static str,
    },

    /// An append carried no events.
    #[error("an append needs at least one event")]
    EmptyBatch,

    /// The same event id appears twice in one batch.
    #[error("event id {event_id} appears more than once in the batch")]
    DuplicateEventInBatch {
        /// The repeated id.
        event_id: Uuid,
    },

    /// The stream was not at the version the append expected (optimistic concurrency).
    ///
    /// Reload the stream, decide again and retry; see [`Error::is_conflict`].
    #[error("conflict on stream {stream}: expected {expected}, but {}", match actual {
        Some(v) => format!("the stream is at version {v}"),
        None => "the stream does not exist".to_owned(),
    })]
    Conflict {
        /// The stream appended to.
        stream: StreamName,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was tried (`None`: no such stream).
        actual: Option<u64>,
    },

    /// Some of the batch's event ids were already written, but not as this same batch at this
    /// place, so the append is neither new nor an idempotent retry.
    #[error("stream {stream}: event ids {event_ids:?} were already written (at {}), elsewhere or as part of another batch",
        written_at.iter().map(|(stream, version)| format!("{stream}@{version}")).collect::<Vec<_>>().join(", "))]
    DuplicateEvents {
        /// The stream appended to.
        stream: StreamName,
        /// The ids of the batch that were already written, in batch order.
        event_ids: Vec<Uuid>,
        /// Where each of those ids is, in the same order: its stream and version.
        written_at: Vec<(String, u64)>,
    },

    /// A transaction appended to a stream whose last event was written by a younger
    /// transaction (PostgreSQL, [`PgTransaction`](crate::PgTransaction) only). The global order
    /// sorts events by their transaction's id, so this append's events would come before that
    /// event, out of the stream's version order: refused, nothing written. It happens only to a
    /// transaction that took its id (wrote anything) before another writer appended to the
    /// stream and committed. Roll the transaction back and run it again; see
    /// `docs/ordering.md`, "Per-stream order".
    #[error(
        "stream {stream} was appended to by a younger transaction since this transaction began writing; \
         roll it back and retry in a new transaction"
    )]
    StaleTransaction {
        /// The stream appended to.
        stream: StreamName,
    },

    /// An argument is outside what the call accepts (a read with a limit of 0, for example).
    /// Nothing was done.
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// Which rule it broke.
        reason: &'static str,
    },

    /// A stored event cannot be decoded (see [`UnreadableEvent`](crate::UnreadableEvent)). Reads
    /// report it in the event's place; a read stream or a subscription that yields it goes on
    /// with the next event when polled again, and a projection parks it as a dead letter.
    #[error("stored event at position {} ({}@{}) cannot be read: {}", .0.position, .0.stream, .0.version, .0.reason)]
    Unreadable(Box<crate::UnreadableEvent>),

    /// A stored event could not be decoded (corrupt or foreign data in the store's tables).
    #[error("stored event at {location} is invalid: {reason}")]
    Corrupt {
        /// Where the bad row is.
        location: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Event data or metadata could not be encoded as JSON (a map with non-string keys, for
    /// example). Nothing was written.
    #[error("event data cannot be encoded as JSON")]
    Encode(#[source] BoxError),

    /// A stored event (or snapshot) could not be turned into the application's type: an
    /// unknown event type, a schema version with no upcaster, or a payload of the wrong shape.
    #[error("cannot decode {what} {event_type:?} at schema version {schema_version}: {reason}")]
    Decode {
        /// What was being decoded and where (`event account-7@3`, `snapshot account-7`).
        what: String,
        /// The stored event type (or snapshot type).
        event_type: String,
        /// The stored schema version.
        schema_version: u32,
        /// What went wrong.
        reason: String,
    },

    /// The database lacks tables, or has older ones, than this code needs: migrations that are
    /// not applied. Returned by the constructors that never migrate (for read-only use), so that
    /// nothing is read from (or created in) a schema this code does not know. Run the migrations
    /// (the constructors that migrate, or `annal-runner migrate`) first.
    #[error("the database's schema is not up to date: migrations {missing:?} of {history} are not applied")]
    NotMigrated {
        /// The migration history table (`annal_migrations`, `annal_projection_migrations`).
        history: String,
        /// The versions not applied, oldest first.
        missing: Vec<i64>,
    },

    /// The store was closed; nothing more can be done with it.
    #[error("the event store is closed")]
    Closed,

    /// The database failed (connection lost, timeout, disk full, ...).
    #[error("database error")]
    Backend(#[source] BoxError),
}

impl Error {
    /// `true` for an optimistic-concurrency [`Conflict`](Error::Conflict): reload and retry.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// `true` when the transaction the error came from must be run again from its start, in a
    /// new transaction: a [`StaleTransaction`](Error::StaleTransaction), or a deadlock or
    /// serialization failure the database reported (SQLSTATE 40P01, 40001), which happen to
    /// transactions that append to several busy streams.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::StaleTransaction { .. } => true,
            #[cfg(feature = "postgres")]
            Error::Backend(source) => {
                let code = source.downcast_ref::<sqlx::Error>().and_then(|e| match e {
                    sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                    _ => None,
                });
                matches!(code.as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }

    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn backend(source: impl Into<BoxError>) -> Self {
        Error::Backend(source.into())
    }
}

/// Shortens user input kept in an error so a huge bad value does not make a huge error.
pub(crate) fn truncated(value: &str) -> String {
    const MAX: usize = 300;
    if value.len() <= MAX {
        return value.to_owned();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolClosed => Error::Closed,
            other => Error::Backend(Box::new(other)),
        }
    }
}
