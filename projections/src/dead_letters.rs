//! Operating on dead letters: retry (apply again, exactly once) and skip.

use annal_eventstore::{Direction, EventStore, RecordedEvent};

use crate::store::{Applied, DeadLetter, ProjectionStore};
use crate::{Error, Projection, Result};

async fn find(store: &dyn ProjectionStore, projection: &str, id: i64) -> Result<(DeadLetter, Vec<DeadLetter>)> {
    let all = store.dead_letters(projection).await?;
    let found =
        all.iter().find(|d| d.id == id).cloned().ok_or(Error::NoDeadLetter { projection: projection.into(), id })?;
    Ok((found, all))
}

async fn event_of(events: &dyn EventStore, dead: &DeadLetter) -> Result<RecordedEvent> {
    let page = events.read_stream_page(&dead.stream, Direction::Forwards, dead.version, 1).await?;
    page.into_iter().find(|e| e.id == dead.event_id).ok_or_else(|| {
        Error::Store(annal_eventstore::Error::Corrupt {
            location: format!("{}@{}", dead.stream, dead.version),
            reason: format!("dead letter {} names event {}, which is not there", dead.id, dead.event_id),
        })
    })
}

/// Applies a parked event again with `projection` (after its bug was fixed) and removes the
/// dead letter, in one transaction where the store has them: it takes effect exactly once,
/// however often this is called, and never moves the checkpoint.
///
/// A stream's dead letters are retried oldest first, so its events are never applied out of
/// order.
///
/// # Errors
/// [`Error::NoDeadLetter`] if there is no such dead letter, [`Error::OutOfOrder`] if an older
/// dead letter of the same stream is still parked, store errors. A handler that fails again
/// returns `Ok(Applied::Failed(..))` and leaves the dead letter in place.
pub async fn retry_dead_letter(
    events: &dyn EventStore,
    store: &dyn ProjectionStore,
    projection: &dyn Projection,
    id: i64,
) -> Result<Applied> {
    let (dead, all) = find(store, projection.name(), id).await?;
    if let Some(older) = all.iter().find(|d| d.stream == dead.stream && d.version < dead.version) {
        return Err(Error::OutOfOrder { id, older: older.id, stream: dead.stream.to_string() });
    }
    let event = event_of(events, &dead).await?;
    store.apply_dead_letter(projection, id, &event).await
}

/// Removes a dead letter without applying its event.
///
/// # Errors
/// [`Error::NoDeadLetter`] if there is no such dead letter; store errors.
pub async fn skip_dead_letter(store: &dyn ProjectionStore, projection: &str, id: i64) -> Result<()> {
    if store.remove_dead_letter(projection, id).await? {
        Ok(())
    } else {
        Err(Error::NoDeadLetter { projection: projection.into(), id })
    }
}
