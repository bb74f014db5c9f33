//! `dead-letters`: list, retry or skip parked events.

use std::sync::Arc;

use annal_projections::{Projection, ProjectionStore, retry_dead_letter, skip_dead_letter};

use crate::args::DeadLetterAction;
use crate::database::{Database, find};
use crate::{Error, Result};

/// Lists, retries or skips dead letters.
pub(crate) async fn dead_letters(
    database: &Database,
    store: &dyn ProjectionStore,
    projections: Vec<Arc<dyn Projection>>,
    action: DeadLetterAction,
) -> Result<()> {
    match action {
        DeadLetterAction::List { projection } => {
            println!("{:>6} {:<36} {:<28} {:>8} {:>4}  error", "id", "event", "stream@version", "attempts", "part");
            for dead in store.dead_letters(&projection).await? {
                println!(
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
        DeadLetterAction::Retry { projection, id } => {
            let projection = find(&projections, &projection)?;
            match retry_dead_letter(&*database.events(), store, &*projection, id).await? {
                annal_projections::Applied::Committed => println!("dead letter {id} applied and removed"),
                annal_projections::Applied::Moved => println!("dead letter {id} was already gone"),
                annal_projections::Applied::Failed(source) => return Err(Error::DeadLetterFailed { id, source }),
            }
        }
        DeadLetterAction::Skip { projection, id } => {
            skip_dead_letter(store, &projection, id).await?;
            println!("dead letter {id} removed without applying it");
        }
    }
    Ok(())
}
