//! Events: what is appended and what is read back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Error, Result, truncated};
use crate::{Position, StreamName, TraceParent};

/// The longest event type name accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 255;

/// The default limit on one event's encoded size (type, data and metadata): 1 MiB.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1 << 20;

/// The deepest nesting of arrays and objects accepted in an event's data, and in its metadata
/// (counting the metadata object itself): 100 levels. Deeper JSON is refused with
/// [`Error::UnsupportedData`], on every backend (JSON decoders limit recursion; see
/// `docs/concepts.md`, "What can be stored").
pub const MAX_JSON_DEPTH: usize = 100;

/// The highest schema version accepted: 2^31 - 1 (PostgreSQL stores it in a 4-byte integer).
pub const MAX_SCHEMA_VERSION: u32 = i32::MAX as u32;

/// Metadata keys kept for the first-class fields; [`Metadata::with`] must not use them.
pub const RESERVED_METADATA_KEYS: &[&str] = &["correlation_id", "causation_id", "traceparent"];

/// An event's metadata: correlation and causation ids and the trace context first-class,
/// anything else free-form.
///
/// It is stored as one JSON object: `correlation_id`, `causation_id` and `traceparent` (when
/// set) beside the `extra` fields.
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
    /// The W3C trace context of the span that appended the event: set by the caller, or by the
    /// store from its `annal.append` span with the `opentelemetry` feature (see [`TraceParent`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<TraceParent>,
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

    /// Sets the trace context, such as one received with a request (a caller-supplied one is
    /// stored as it is, also with the `opentelemetry` feature).
    pub fn with_traceparent(mut self, traceparent: TraceParent) -> Self {
        self.traceparent = Some(traceparent);
        self
    }

    /// Adds a free-form field. The keys in [`RESERVED_METADATA_KEYS`] belong to the first-class
    /// fields: an append whose metadata uses them is refused with [`Error::UnsupportedData`].
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
///
/// The events come back in canonical form (see [`canonical_number`]), which is what every
/// backend stores and reads back.
pub(crate) fn encode_batch(events: Vec<NewEvent>, max_event_size: usize) -> Result<Vec<EncodedEvent>> {
    if events.is_empty() {
        return Err(Error::EmptyBatch);
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    let traceparent = crate::trace::ambient();
    events
        .into_iter()
        .map(|mut event| {
            event.metadata.traceparent = event.metadata.traceparent.or(traceparent);
            validate_event_type(&event.event_type)?;
            if !seen.insert(event.id) {
                return Err(Error::DuplicateEventInBatch { event_id: event.id });
            }
            let unsupported = |reason| Error::UnsupportedData { event_id: event.id, reason };
            if event.schema_version > MAX_SCHEMA_VERSION {
                return Err(unsupported("a schema version is at most 2147483647 (2^31 - 1)"));
            }
            if event.metadata.extra.keys().any(|k| RESERVED_METADATA_KEYS.contains(&k.as_str())) {
                return Err(unsupported(
                    "metadata keys correlation_id, causation_id and traceparent are reserved: set them \
                     with Metadata::with_correlation_id, with_causation_id and with_traceparent",
                ));
            }
            let checked = check_json(&mut event.data, 0).and_then(|()| {
                event.metadata.extra.iter_mut().try_for_each(|(key, value)| {
                    if key.contains('\0') {
                        return Err(NUL);
                    }
                    // The metadata object itself is the first level.
                    check_json(value, 1)
                })
            });
            if let Err(reason) = checked {
                let error = unsupported(reason);
                // Refused JSON may be nested far deeper than a recursive drop can go.
                drop_flat(std::mem::take(&mut event.data));
                std::mem::take(&mut event.metadata.extra).into_iter().for_each(|(_, v)| drop_flat(v));
                return Err(error);
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

const NUL: &str = "JSON strings cannot contain NUL (\\u0000) characters";

/// Checks a JSON value against the store's rules (no NUL, at most [`MAX_JSON_DEPTH`] levels below
/// `depth`) and puts its numbers in canonical form. Iterative, so a value nested far too deep is
/// refused without a deep recursion.
fn check_json(value: &mut Value, depth: usize) -> std::result::Result<(), &'static str> {
    let mut pending: Vec<(&mut Value, usize)> = vec![(value, depth)];
    while let Some((value, depth)) = pending.pop() {
        let too_deep = "JSON data and metadata are nested at most 100 levels deep";
        match value {
            Value::String(s) if s.contains('\0') => return Err(NUL),
            Value::Number(n) => canonical_number(n),
            Value::Array(items) => {
                if depth >= MAX_JSON_DEPTH {
                    return Err(too_deep);
                }
                pending.extend(items.iter_mut().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                if depth >= MAX_JSON_DEPTH {
                    return Err(too_deep);
                }
                for (key, item) in map.iter_mut() {
                    if key.contains('\0') {
                        return Err(NUL);
                    }
                    pending.push((item, depth + 1));
                }
            }
            Value::Null | Value::Bool(_) | Value::String(_) => {}
        }
    }
    Ok(())
}

/// Checks a snapshot against the rules events follow (nesting, NUL, schema version) and encodes
/// its state, so that no backend stores a snapshot it cannot read back.
pub(crate) fn encode_snapshot(snapshot: &crate::Snapshot) -> Result<(Value, String)> {
    let invalid = |reason| Error::InvalidArgument { reason };
    if snapshot.schema_version > MAX_SCHEMA_VERSION {
        return Err(invalid("a snapshot's schema version is at most 2147483647 (2^31 - 1)"));
    }
    let mut state = snapshot.state.clone();
    check_json(&mut state, 0).map_err(invalid)?;
    let text = encode_json(&state)?;
    Ok((state, text))
}

/// Drops a JSON value without recursion.
fn drop_flat(value: Value) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// Puts a number in the form every backend reads back. JSON text cannot tell `1e17` the float
/// from `100000000000000000` the integer, and PostgreSQL keeps numbers as decimals: a float
/// whose shortest text has a positive exponent (all are whole numbers, 1e16 and above) reads
/// back from there as an integer when it fits one. So it is stored as that integer everywhere.
fn canonical_number(n: &mut serde_json::Number) {
    if !n.is_f64() {
        return;
    }
    let text = n.to_string();
    let Some((mantissa, exponent)) = text.split_once('e') else { return };
    let Ok(exponent) = exponent.parse::<usize>() else { return }; // negative: a fraction
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let Some(zeros) = exponent.checked_sub(fraction.len()) else { return };
    if whole.len() + fraction.len() + zeros > 20 {
        return; // beyond u64 and i64 either way
    }
    let digits = format!("{sign}{whole}{fraction}{}", "0".repeat(zeros));
    if let Ok(v) = digits.parse::<u64>() {
        *n = v.into();
    } else if let Ok(v) = digits.parse::<i64>() {
        *n = v.into();
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

/// Decodes stored JSON text, naming the row if it is broken.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn decode_json<T: DeserializeOwned>(text: &str, location: impl FnOnce() -> String) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt { location: location(), reason: e.to_string() })
}

/// A stored event that cannot be decoded: written by hand, by another program or an older
/// version, or damaged. Reads, subscriptions and projections report it as
/// [`Error::Unreadable`] in its place and go on past it; it carries the raw columns, so a
/// projection can park it as a dead letter and an operator can see what is there.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct UnreadableEvent {
    /// Its place in the global order.
    pub position: Position,
    /// Its stream, as stored.
    pub stream: String,
    /// Its version in the stream, as stored.
    pub version: u64,
    /// Its id, if that much could be read.
    pub id: Option<Uuid>,
    /// Its event type, as stored.
    pub event_type: String,
    /// Its data, as stored (JSON text, unless that is what is broken).
    pub data: String,
    /// Its metadata, as stored.
    pub metadata: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Decodes rows in order as they arrive, up to the first one that cannot be decoded: a page
/// stops before an unreadable event, so that the next read starts at it and reports it alone.
/// Returns the events and whether one stopped them; the unreadable event's error when it is the
/// very first row.
///
/// Each row is decoded while the database is still producing and sending the next ones, not
/// after the whole page has arrived: the client's decoding overlaps the server's work.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) async fn decode_rows<R>(
    rows: impl futures::Stream<Item = std::result::Result<R, sqlx::Error>>,
    limit: usize,
    decode: impl Fn(&R) -> Result<RecordedEvent>,
) -> Result<(Vec<RecordedEvent>, bool)> {
    use futures::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    // The limit is the caller's, possibly huge; room for a default page at first.
    let mut events = Vec::with_capacity(limit.min(crate::DEFAULT_PAGE_SIZE));
    while let Some(row) = rows.try_next().await? {
        match decode(&row) {
            Ok(event) => events.push(event),
            Err(Error::Unreadable(_)) if !events.is_empty() => return Ok((events, true)),
            Err(error) => return Err(error),
        }
    }
    Ok((events, false))
}

impl UnreadableEvent {
    /// A stand-in [`RecordedEvent`] for it, with its id, stream, version, position and type,
    /// `null` data and empty metadata: what a dead-letter table keeps of an event, so that a
    /// projection can park one it cannot read (the raw columns stay in the store, where
    /// [`EventStore::read_event`](crate::EventStore::read_event) reports them). `None` when even
    /// its id or its stream name cannot be read.
    pub fn stand_in(&self) -> Option<RecordedEvent> {
        Some(RecordedEvent {
            id: self.id?,
            stream: StreamName::new(&self.stream).ok()?,
            version: self.version,
            position: self.position,
            event_type: self.event_type.clone(),
            schema_version: 0,
            data: Value::Null,
            metadata: Metadata::default(),
            recorded_at: Utc::now(),
        })
    }
}

/// A stored event's columns as the SQL backends fetch them, before the store's rules are
/// applied: the one place both decode, so they accept and refuse the same rows.
///
/// The text columns borrow from the row: a readable event copies only what it keeps (the stream
/// name and event type), never the JSON text it parses.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) struct StoredEvent<'r> {
    pub(crate) position: Position,
    /// The first column that could not even be fetched as its type, and why.
    pub(crate) problem: Option<String>,
    pub(crate) id: Option<Uuid>,
    pub(crate) stream: &'r str,
    pub(crate) version: i64,
    pub(crate) event_type: &'r str,
    pub(crate) schema_version: i64,
    pub(crate) data: &'r str,
    pub(crate) metadata: &'r str,
    pub(crate) recorded_at: Option<DateTime<Utc>>,
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl StoredEvent<'_> {
    /// Fetches column `name` of a row, noting the first column that cannot be fetched in
    /// `problem` (and returning the type's default for it).
    pub(crate) fn column<T: Default>(
        problem: &mut Option<String>,
        name: &str,
        fetched: std::result::Result<T, sqlx::Error>,
    ) -> T {
        fetched.unwrap_or_else(|e| {
            problem.get_or_insert_with(|| format!("column {name}: {e}"));
            T::default()
        })
    }

    /// The event, or [`Error::Unreadable`] with the raw columns and the reason.
    pub(crate) fn decode(self) -> Result<RecordedEvent> {
        match self.try_decode() {
            Ok(event) => Ok(event),
            Err(reason) => Err(Error::Unreadable(Box::new(UnreadableEvent {
                position: self.position,
                version: u64::try_from(self.version).unwrap_or_default(),
                id: self.id,
                stream: self.stream.to_owned(),
                event_type: self.event_type.to_owned(),
                data: self.data.to_owned(),
                metadata: self.metadata.to_owned(),
                reason,
            }))),
        }
    }

    fn try_decode(&self) -> std::result::Result<RecordedEvent, String> {
        if let Some(problem) = &self.problem {
            return Err(problem.clone());
        }
        let id = self.id.ok_or("no event id")?;
        let stream = StreamName::new(self.stream).map_err(|e| e.to_string())?;
        let version = u64::try_from(self.version).map_err(|_| format!("negative version {}", self.version))?;
        validate_event_type(self.event_type).map_err(|e| e.to_string())?;
        let schema_version = u32::try_from(self.schema_version)
            .ok()
            .filter(|v| *v <= MAX_SCHEMA_VERSION)
            .ok_or_else(|| format!("schema version {} is outside 0..=2147483647", self.schema_version))?;
        let data = serde_json::from_str(self.data).map_err(|e| format!("data: {e}"))?;
        let metadata = serde_json::from_str(self.metadata).map_err(|e| format!("metadata: {e}"))?;
        let recorded_at = self.recorded_at.ok_or("recorded_at is out of range")?;
        Ok(RecordedEvent {
            id,
            stream,
            version,
            position: self.position,
            event_type: self.event_type.to_owned(),
            schema_version,
            data,
            metadata,
            recorded_at,
        })
    }
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

    #[test]
    fn json_far_too_deep_is_refused_without_recursing() {
        let mut value = Value::from(1);
        for level in 0..100_000 {
            value = if level % 2 == 0 {
                Value::Array(vec![value])
            } else {
                Value::Object(std::iter::once(("k".to_owned(), value)).collect())
            };
        }
        let deep = NewEvent::new("T", value);
        assert!(matches!(encode_batch(vec![deep], 100), Err(Error::UnsupportedData { .. })));
    }

    #[test]
    fn large_floats_become_the_integers_they_are() {
        let canonical = |f: f64| {
            let mut n = serde_json::Number::from_f64(f).unwrap();
            canonical_number(&mut n);
            Value::Number(n)
        };
        assert_eq!(canonical(1e16), json!(10_000_000_000_000_000u64));
        assert_eq!(canonical(-1e16), json!(-10_000_000_000_000_000i64));
        assert_eq!(canonical(1.2345678901234566e17), json!(123_456_789_012_345_660u64));
        assert_eq!(canonical(1e15), json!(1e15));
        assert_eq!(canonical(1e-7), json!(1e-7));
        assert_eq!(canonical(1e20), json!(1e20));
        assert!(canonical(1e20).is_f64());
    }
}
