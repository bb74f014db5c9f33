//! Events: what is appended and what is read back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Error, Result, truncated};
use crate::{Position, StreamName};

/// The longest event type name accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 255;

/// The default limit on one event's encoded size (type, data and metadata): 1 MiB.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1 << 20;

/// An event's metadata: correlation and causation ids first-class, anything else free-form.
///
/// It is stored as one JSON object: `correlation_id` and `causation_id` (when set) beside the
/// `extra` fields.
///
/// ```
/// use annal_eventstore::Metadata;
/// use uuid::Uuid;
///
/// let command_id = Uuid::now_v7();
/// let metadata = Metadata::default()
///     .with_correlation_id(command_id)
///     .with_causation_id(command_id)
///     .with("user", "alice");
/// assert_eq!(metadata.extra["user"], "alice");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id shared by everything caused by one original request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id of the message (command or event) that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Any other fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Metadata {
    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Adds a free-form field.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

/// An event to append.
///
/// Its id is chosen by the caller (a fresh UUIDv7 by default): appending the same ids again is
/// an idempotent retry. See [`EventStore::append`](crate::EventStore::append).
///
/// ```
/// use annal_eventstore::NewEvent;
/// use serde_json::json;
///
/// let event = NewEvent::new("Deposited", json!({ "amount": 10 })).with_schema_version(2);
/// assert_eq!(event.event_type, "Deposited");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct NewEvent {
    /// The event's unique id.
    pub id: Uuid,
    /// The event type name, non-empty, at most [`MAX_EVENT_TYPE_LEN`] bytes, no control
    /// characters.
    pub event_type: String,
    /// The version of the payload's schema, for upcasting old events (starts at 1).
    pub schema_version: u32,
    /// The payload.
    pub data: Value,
    /// The metadata.
    pub metadata: Metadata,
}

impl NewEvent {
    /// An event of `event_type` with `data`, a fresh UUIDv7 id, schema version 1 and no metadata.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data,
            metadata: Metadata::default(),
        }
    }

    /// An event whose data is `payload` serialised to JSON.
    ///
    /// # Errors
    /// [`Error::Encode`] if `payload` cannot be represented as JSON (a map with non-string
    /// keys, for example).
    pub fn from_serialize(event_type: impl Into<String>, payload: &impl Serialize) -> Result<Self> {
        let data = serde_json::to_value(payload).map_err(|e| Error::Encode(Box::new(e)))?;
        Ok(NewEvent::new(event_type, data))
    }

    /// Sets the event id (for idempotent retries, use the same id again).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Replaces the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A stored event, as reads and subscriptions return it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// The event's unique id.
    pub id: Uuid,
    /// The stream it belongs to.
    pub stream: StreamName,
    /// Its version in the stream (the stream's first event is version 0).
    pub version: u64,
    /// Its place in the global order.
    pub position: Position,
    /// The event type name.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The payload.
    pub data: Value,
    /// The metadata.
    pub metadata: Metadata,
    /// When the store recorded it (the database clock on PostgreSQL).
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// Deserialises the payload into `T`.
    ///
    /// # Errors
    /// [`Error::Decode`] if the payload does not have `T`'s shape.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.data).map_err(|e| Error::Decode {
            what: format!("event {}@{}", self.stream, self.version),
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            reason: e.to_string(),
        })
    }
}

/// An event checked against the store's rules, with its JSON encoded once for the backend.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) struct EncodedEvent {
    pub(crate) event: NewEvent,
    pub(crate) data: String,
    pub(crate) metadata: String,
}

/// Checks a batch against every rule and encodes it, before anything is written.
pub(crate) fn encode_batch(events: Vec<NewEvent>, max_event_size: usize) -> Result<Vec<EncodedEvent>> {
    if events.is_empty() {
        return Err(Error::EmptyBatch);
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    events
        .into_iter()
        .map(|event| {
            validate_event_type(&event.event_type)?;
            if !seen.insert(event.id) {
                return Err(Error::DuplicateEventInBatch { event_id: event.id });
            }
            if has_nul(&event.data) || event.metadata.extra.iter().any(|(k, v)| k.contains('\0') || has_nul(v)) {
                return Err(Error::UnsupportedData {
                    event_id: event.id,
                    reason: "JSON strings cannot contain NUL (\\u0000) characters",
                });
            }
            let data = encode_json(&event.data)?;
            let metadata = encode_json(&event.metadata)?;
            let size = event.event_type.len() + data.len() + metadata.len();
            if size > max_event_size {
                return Err(Error::EventTooLarge { event_id: event.id, size, max: max_event_size });
            }
            Ok(EncodedEvent { event, data, metadata })
        })
        .collect()
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn encode_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Encode(Box::new(e)))
}

/// Validates an event type name.
pub(crate) fn validate_event_type(event_type: &str) -> Result<()> {
    let reason = if event_type.is_empty() {
        "an event type cannot be empty"
    } else if event_type.len() > MAX_EVENT_TYPE_LEN {
        "an event type is at most 255 bytes"
    } else if event_type.chars().any(char::is_control) {
        "an event type cannot contain control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidEventType { event_type: truncated(event_type), reason })
}

/// Decodes stored JSON text, naming the row if it is broken (SQLite stores JSON as text).
#[cfg(feature = "sqlite")]
pub(crate) fn decode_json<T: DeserializeOwned>(text: &str, location: impl FnOnce() -> String) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt { location: location(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_is_one_flat_object() {
        let id = Uuid::nil();
        let m = Metadata::default().with_correlation_id(id).with("tenant", 7);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v, json!({ "correlation_id": id, "tenant": 7 }));
        assert_eq!(serde_json::from_value::<Metadata>(v).unwrap(), m);
    }

    #[test]
    fn batches_are_checked_before_encoding() {
        assert!(matches!(encode_batch(vec![], 100), Err(Error::EmptyBatch)));
        let e = NewEvent::new("", json!(1));
        assert!(matches!(encode_batch(vec![e], 100), Err(Error::InvalidEventType { .. })));
        let e = NewEvent::new("t".repeat(256), json!(1));
        assert!(matches!(encode_batch(vec![e], 1000), Err(Error::InvalidEventType { .. })));
        let e = NewEvent::new("T", json!("x".repeat(200)));
        assert!(matches!(encode_batch(vec![e], 100), Err(Error::EventTooLarge { max: 100, .. })));
        let e = NewEvent::new("T", json!(1));
        let dup = e.clone();
        assert!(matches!(encode_batch(vec![e, dup], 100), Err(Error::DuplicateEventInBatch { .. })));
        let e = NewEvent::new("T", json!({ "deep": [{ "k": "a\u{0}b" }] }));
        assert!(matches!(encode_batch(vec![e], 100), Err(Error::UnsupportedData { .. })));
        let e = NewEvent::new("T", json!({})).with_metadata(Metadata::default().with("k\u{0}", 1));
        assert!(matches!(encode_batch(vec![e], 100), Err(Error::UnsupportedData { .. })));
        let ok = encode_batch(vec![NewEvent::new("T", json!({"a": 1}))], 100).unwrap();
        assert_eq!(ok[0].data, r#"{"a":1}"#);
        assert_eq!(ok[0].metadata, "{}");
    }
}
