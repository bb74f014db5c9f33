//! `streams`, `read` and `tail`: the event store as an operator browses it.

use annal_eventstore::{Filter, Position, ReadStream, RecordedEvent, StreamName, UnreadableEvent};
use futures::StreamExt;

use crate::database::Database;
use crate::{Error, Result};

/// One event as a JSON object (the form `read`, `tail` and the console's stream browser use).
pub(crate) fn event_json(event: &RecordedEvent) -> serde_json::Value {
    serde_json::json!({
        "position": event.position.to_string(),
        "stream": event.stream.as_str(),
        "version": event.version,
        "id": event.id,
        "type": event.event_type,
        "schema_version": event.schema_version,
        "recorded_at": event.recorded_at.to_rfc3339(),
        "data": event.data,
        "metadata": event.metadata,
    })
}

/// An event the store could not decode, as a JSON object in its place: what is known of it, the
/// stored text and why it cannot be read (`"unreadable"`).
pub(crate) fn unreadable_json(bad: &UnreadableEvent) -> serde_json::Value {
    serde_json::json!({
        "position": bad.position.to_string(),
        "stream": bad.stream,
        "version": bad.version,
        "id": bad.id,
        "type": bad.event_type,
        "unreadable": bad.reason,
        "stored_data": bad.data,
        "stored_metadata": bad.metadata,
    })
}

/// One read item as JSON: an event, or an unreadable one in its place; other errors end the
/// read.
pub(crate) fn item_json(item: annal_eventstore::Result<RecordedEvent>) -> Result<serde_json::Value> {
    match item {
        Ok(event) => Ok(event_json(&event)),
        Err(annal_eventstore::Error::Unreadable(bad)) => Ok(unreadable_json(&bad)),
        Err(error) => Err(error.into()),
    }
}

/// Prints the streams by category with their event counts.
pub(crate) async fn streams(database: &Database, category: Option<&str>) -> Result<()> {
    out!("{:<20} {:<40} {:>10}", "category", "stream", "events");
    for (category, stream, count) in database.streams(category).await? {
        out!("{category:<20} {stream:<40} {count:>10}");
    }
    Ok(())
}

/// Reads up to `limit` events of `stream` from version `from`, as JSON objects; an event the
/// store cannot decode is reported in its place ([`unreadable_json`]).
pub(crate) async fn read_stream(
    database: &Database,
    stream: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<serde_json::Value>> {
    let stream = StreamName::new(stream)?;
    let events = database.events();
    let read = ReadStream::forwards().from_version(from).limit(limit.max(1));
    let mut out = Vec::new();
    let mut reader = events.read_stream(&stream, read);
    while let Some(item) = reader.next().await {
        out.push(item_json(item)?);
    }
    Ok(out)
}

/// Prints a stream's events, one JSON object per line.
pub(crate) async fn read(database: &Database, stream: &str, from: u64, limit: usize) -> Result<()> {
    let events = read_stream(database, stream, from, limit).await?;
    if events.is_empty() && database.events().stream_version(&StreamName::new(stream)?).await?.is_none() {
        return Err(Error::UnknownStream(stream.to_owned()));
    }
    for event in &events {
        out!("{event}");
    }
    Ok(())
}

/// Follows the log, one JSON object per line, until SIGINT or SIGTERM.
pub(crate) async fn tail(database: &Database, categories: &[String], from_start: bool) -> Result<()> {
    let events = database.events();
    let filter = if categories.is_empty() { Filter::all() } else { Filter::categories(categories) };
    let from = if from_start { Position::START } else { events.head().await? };
    tracing::info!(%from, ?categories, "following the log");
    let mut subscription = events.subscribe(from, filter);
    let stop = crate::serve::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            event = subscription.next() => match event {
                Some(item) => out!("{}", item_json(item)?),
                None => return Ok(()),
            },
        }
    }
}
