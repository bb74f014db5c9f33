//! `dead-letters`: list, show, retry or skip parked events.

use std::sync::Arc;

use annal_projections::{Applied, DeadLetter, Projection, ProjectionStore, retry_dead_letter, skip_dead_letter};

use crate::args::DeadLetterAction;
use crate::database::{Database, find};
use crate::{Error, Result};

/// Lists, shows, retries or skips dead letters. Every action names a projection, which must
/// exist: a typo is an error, not an empty list.
pub(crate) async fn dead_letters(
    database: &Database,
    store: &dyn ProjectionStore,
    projections: Vec<Arc<dyn Projection>>,
    action: DeadLetterAction,
) -> Result<()> {
    match action {
        DeadLetterAction::List { projection } => {
            find(&projections, &projection)?;
            out!("{:>6} {:<36} {:<28} {:>8} {:>4}  error", "id", "event", "stream@version", "attempts", "part");
            for dead in store.dead_letters(&projection).await? {
                out!(
                    "{:>6} {:<36} {:<28} {:>8} {:>4}  {}",
                    dead.id,
                    dead.event_id,
                    format!("{}@{}", dead.stream, dead.version),
                    dead.attempts,
                    dead.partition,
                    dead.error
                );
            }
        }
        DeadLetterAction::Show { projection, id } => {
            find(&projections, &projection)?;
            let dead = one(store, &projection, id).await?;
            out!("{}", serde_json::to_string_pretty(&show(database, &dead).await?).unwrap_or_default());
        }
        DeadLetterAction::Retry { projection, id, all, stream } => {
            let projection = find(&projections, &projection)?;
            let ids: Vec<i64> = match id {
                Some(id) => vec![id],
                None => {
                    // Oldest first, so each stream's events are retried in order.
                    let mut dead = store.dead_letters(projection.name()).await?;
                    dead.retain(|d| all || stream.as_deref() == Some(d.stream.as_str()));
                    dead.sort_by_key(|d| (d.position, d.id));
                    dead.into_iter().map(|d| d.id).collect()
                }
            };
            let mut failed = 0;
            for id in &ids {
                match retry_dead_letter(&*database.events(), store, &*projection, *id).await {
                    Ok(Applied::Committed) => out!("dead letter {id} applied and removed"),
                    Ok(Applied::Moved) => out!("dead letter {id} was already gone"),
                    Ok(Applied::Blocked) => out!("dead letter {id} waits behind an older one of its stream"),
                    Ok(Applied::Failed(source)) if ids.len() == 1 => {
                        return Err(Error::DeadLetterFailed { id: *id, source });
                    }
                    Ok(Applied::Failed(source)) => {
                        failed += 1;
                        out!("dead letter {id} failed again: {source}");
                    }
                    Err(error) if ids.len() == 1 => return Err(error.into()),
                    Err(error) => {
                        failed += 1;
                        out!("dead letter {id} not retried: {error}");
                    }
                }
            }
            if failed > 0 {
                return Err(Error::StillParked { failed, total: ids.len() });
            }
        }
        DeadLetterAction::Skip { projection, id } => {
            find(&projections, &projection)?;
            skip_dead_letter(store, &projection, id).await?;
            out!("dead letter {id} removed without applying it");
        }
    }
    Ok(())
}

async fn one(store: &dyn ProjectionStore, projection: &str, id: i64) -> Result<DeadLetter> {
    store
        .dead_letters(projection)
        .await?
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| annal_projections::Error::NoDeadLetter { projection: projection.to_owned(), id }.into())
}

/// A dead letter with its event, as `show` prints it and the console serves it.
pub(crate) async fn show(database: &Database, dead: &DeadLetter) -> Result<serde_json::Value> {
    let event = database.events().read_event(dead.event_id).await?;
    Ok(serde_json::json!({
        "id": dead.id,
        "projection": dead.projection,
        "partition": dead.partition,
        "stream": dead.stream.as_str(),
        "version": dead.version,
        "position": dead.position.to_string(),
        "error": dead.error,
        "attempts": dead.attempts,
        "parked_at": dead.parked_at.to_rfc3339(),
        "event": event.map(|e| serde_json::json!({
            "id": e.id,
            "type": e.event_type,
            "schema_version": e.schema_version,
            "recorded_at": e.recorded_at.to_rfc3339(),
            "data": e.data,
            "metadata": e.metadata,
        })),
    }))
}
