//! What a projection is: a name, a filter, a delivery mode and a handler.

use annal_eventstore::{BoxError, Filter, RecordedEvent};
use async_trait::async_trait;

use crate::{Error, Result};

/// How a projection's effects and its checkpoint relate: the delivery guarantee.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// The handler writes through the same database transaction that advances the checkpoint:
    /// after a crash anywhere, read model and checkpoint agree, and no event takes effect twice.
    /// The default, for read models in the event store's database.
    #[default]
    ExactlyOnce,
    /// The checkpoint moves after the handler succeeds. After a crash the last batch is handled
    /// again, so handlers must be idempotent: use the event id as the idempotency key
    /// ([`crate::Dedup`] helps).
    AtLeastOnce,
    /// The checkpoint moves before the handler runs. After a crash, or a handler error, the
    /// batch is not handled again: effects happen at most once.
    AtMostOnce,
}

/// The transaction a handler writes through, for [`Delivery::ExactlyOnce`].
///
/// Handlers of the other modes get [`Tx::None`] and do their own I/O.
#[non_exhaustive]
pub enum Tx<'a> {
    /// A PostgreSQL transaction on the event store's database.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    Postgres(&'a mut sqlx::PgConnection),
    /// A SQLite transaction on the event store's file.
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    Sqlite(&'a mut sqlx::SqliteConnection),
    /// No transaction: the in-memory store, or a mode other than exactly-once.
    None(std::marker::PhantomData<&'a mut ()>),
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            #[cfg(feature = "postgres")]
            Tx::Postgres(_) => "Tx::Postgres",
            #[cfg(feature = "sqlite")]
            Tx::Sqlite(_) => "Tx::Sqlite",
            Tx::None(_) => "Tx::None",
        })
    }
}

impl Tx<'_> {
    /// No transaction.
    pub fn none() -> Self {
        Tx::None(std::marker::PhantomData)
    }

    /// The PostgreSQL connection in its transaction, if this is one.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn postgres(&mut self) -> Option<&mut sqlx::PgConnection> {
        match self {
            Tx::Postgres(conn) => Some(conn),
            _ => None,
        }
    }

    /// The SQLite connection in its transaction, if this is one.
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub fn sqlite(&mut self) -> Option<&mut sqlx::SqliteConnection> {
        match self {
            Tx::Sqlite(conn) => Some(conn),
            _ => None,
        }
    }
}

/// A projection: consumes the global log (the events its [filter](Projection::filter)
/// selects) in batches and builds a read model.
///
/// The runner holds projections as trait objects, so this trait uses `async-trait`.
#[async_trait]
pub trait Projection: Send + Sync {
    /// A unique name: 1 to 63 characters, lower-case ASCII letters, digits and `_`, starting with
    /// a letter (it is safe in SQL identifiers and metric labels).
    fn name(&self) -> &str;

    /// The events it wants (default: all). Its checkpoint still moves past the others.
    fn filter(&self) -> Filter {
        Filter::all()
    }

    /// Its delivery guarantee (default: exactly-once).
    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    /// How many partitions the projection is split into (default 1). Each stream belongs to one
    /// partition ([`crate::partition_of`]), so its events stay in order; each partition has its
    /// own checkpoint and can run in another runner process.
    fn partitions(&self) -> u32 {
        1
    }

    /// The most events handed to one [`Projection::handle`] call (default 100).
    fn batch_size(&self) -> usize {
        100
    }

    /// Applies a batch of events, in global order. For [`Delivery::ExactlyOnce`], write through
    /// `tx`: its transaction also advances the checkpoint. An error rolls the batch back; the
    /// worker then retries event by event, and parks an event that keeps failing.
    ///
    /// # Errors
    /// Whatever stops the batch from being applied.
    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx<'_>) -> std::result::Result<(), BoxError>;
}

/// Checks a projection name against the rules of [`Projection::name`] (the runner checks the
/// names of its tables with them too).
///
/// # Errors
/// [`Error::InvalidName`], with the rule broken.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() || name.len() > 63 {
        Some("a projection name is 1 to 63 characters")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("a projection name starts with a lower-case letter")
    } else if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        Some("a projection name has only lower-case ASCII letters, digits and `_`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName { name: name.chars().take(80).collect(), reason }),
        None => Ok(()),
    }
}

/// Runs `projection.handle`, turning a panic into an error like any other failure: it is retried,
/// then parked (or stops the projection, by policy) with the panic message as its error, and the
/// process keeps running.
pub(crate) async fn run_handler(
    projection: &dyn Projection,
    events: &[RecordedEvent],
    tx: &mut Tx<'_>,
) -> std::result::Result<(), BoxError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(projection.handle(events, tx)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(format!("the handler panicked: {message}").into())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_safe_identifiers() {
        for good in ["balances", "chat_timeline_2", "a"] {
            assert!(super::validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Balances", "2fast", "drop table", "a-b", "ü", &"x".repeat(64)] {
            assert!(super::validate_name(bad).is_err(), "{bad}");
        }
    }
}
