//! Domain events: typed events with stable stored names and schema versions.

use serde_json::Value;

use crate::{Error, NewEvent, RecordedEvent, Result};

/// A domain event type: usually an enum with one variant per event type, made by
/// `#[derive(Event)]`.
///
/// What is stored is the triple (event type name, schema version, JSON data). The name, not the
/// Rust variant, identifies an event, so renaming a variant keeps old events readable; the
/// schema version says which shape the data has, and [`Event::from_stored`] upcasts old shapes
/// to the current one.
pub trait Event: Sized + Send + Sync + 'static {
    /// Every event type name this type reads and writes, for filters.
    const EVENT_TYPES: &'static [&'static str];

    /// The stored name of this event's type.
    fn event_type(&self) -> &'static str;

    /// The current schema version of this event's type.
    fn schema_version(&self) -> u32;

    /// The event's data as JSON.
    ///
    /// # Errors
    /// [`Error::Encode`] if the event cannot be represented as JSON.
    fn to_data(&self) -> Result<Value>;

    /// The event back from what was stored, upcasting `data` from `schema_version` to the
    /// current shape first.
    ///
    /// # Errors
    /// [`Error::Decode`] for an unknown type, a version with no upcaster, or data of the wrong
    /// shape.
    fn from_stored(event_type: &str, schema_version: u32, data: Value) -> Result<Self>;

    /// The event as a [`NewEvent`] to append (a fresh id, no metadata).
    ///
    /// # Errors
    /// As [`Event::to_data`].
    fn to_new_event(&self) -> Result<NewEvent> {
        Ok(NewEvent::new(self.event_type(), self.to_data()?).with_schema_version(self.schema_version()))
    }

    /// The event back from a recorded one.
    ///
    /// # Errors
    /// As [`Event::from_stored`], with the stream and version in the error.
    fn from_recorded(event: &RecordedEvent) -> Result<Self> {
        Self::from_stored(&event.event_type, event.schema_version, event.data.clone()).map_err(|e| match e {
            Error::Decode { event_type, schema_version, reason, .. } => Error::Decode {
                what: format!("event {}@{}", event.stream, event.version),
                event_type,
                schema_version,
                reason,
            },
            other => other,
        })
    }
}
