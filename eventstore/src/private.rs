//! Runtime support for the code `annal-macros` generates. Not a public API: it changes with the
//! macros.

use std::fmt::Display;

use serde::Serialize;
use serde::de::DeserializeOwned;
pub use serde_json::Value;

use crate::{Error, Result};

fn decode_error(event_type: &str, schema_version: u32, reason: String) -> Error {
    Error::Decode { what: "event".into(), event_type: event_type.to_owned(), schema_version, reason }
}

/// The data of one variant of an externally tagged enum: the value under its tag (`null` for a
/// unit variant), so the stored data does not depend on the Rust variant's name.
pub fn encode_variant<T: Serialize>(event: &T) -> Result<Value> {
    match serde_json::to_value(event).map_err(|e| Error::Encode(Box::new(e)))? {
        Value::Object(map) if map.len() == 1 => Ok(map.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Null)),
        Value::String(_) => Ok(Value::Null),
        other => Err(Error::Encode(
            format!("#[derive(Event)] expects an externally tagged enum, but the event serialised as {other}").into(),
        )),
    }
}

/// Decodes stored data as the given variant of an externally tagged enum.
pub fn decode_variant<T: DeserializeOwned>(
    event_type: &str,
    schema_version: u32,
    variant: &str,
    unit: bool,
    data: Value,
) -> Result<T> {
    let tagged = if unit {
        Value::String(variant.to_owned())
    } else {
        Value::Object(std::iter::once((variant.to_owned(), data)).collect())
    };
    serde_json::from_value(tagged).map_err(|e| decode_error(event_type, schema_version, e.to_string()))
}

/// What an upcaster may return: the new payload, or a reason it could not convert.
pub trait Upcasted {
    /// The new payload or the failure.
    fn into_payload(self) -> std::result::Result<Value, String>;
}

impl Upcasted for Value {
    fn into_payload(self) -> std::result::Result<Value, String> {
        Ok(self)
    }
}

impl<E: Display> Upcasted for std::result::Result<Value, E> {
    fn into_payload(self) -> std::result::Result<Value, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Unwraps an upcaster's result.
pub fn upcasted(event_type: &str, schema_version: u32, result: impl Upcasted) -> Result<Value> {
    result
        .into_payload()
        .map_err(|reason| decode_error(event_type, schema_version, format!("upcaster failed: {reason}")))
}

/// No upcaster reads `at`.
pub fn no_upcaster(event_type: &str, schema_version: u32, at: u32, current: u32) -> Error {
    decode_error(
        event_type,
        schema_version,
        format!(
            "no upcaster from version {at} (the current version is {current}); add #[event(upcast(from = {at}, with = ...))]"
        ),
    )
}

/// The stored version is newer than this code.
pub fn too_new(event_type: &str, schema_version: u32, current: u32) -> Error {
    decode_error(
        event_type,
        schema_version,
        format!("written by newer code: this build knows schema versions up to {current}"),
    )
}

/// An event type this enum does not know.
pub fn unknown_event_type(event_type: &str, schema_version: u32, known: &[&str]) -> Error {
    decode_error(event_type, schema_version, format!("unknown event type; this enum reads {known:?}"))
}

/// What an aggregate that takes snapshots must be.
#[diagnostic::on_unimplemented(
    message = "`{Self}` takes snapshots, so it must derive `serde::Serialize` and `serde::Deserialize`",
    label = "this aggregate has `snapshot(...)` in #[aggregate(...)]",
    note = "add #[derive(serde::Serialize, serde::Deserialize)] to `{Self}`, or remove `snapshot(...)`"
)]
pub trait SnapshotState: Serialize + DeserializeOwned {}

impl<T: Serialize + DeserializeOwned> SnapshotState for T {}

/// A snapshot payload of an aggregate's state.
pub fn to_snapshot<T: SnapshotState>(state: &T) -> Result<Value> {
    serde_json::to_value(state).map_err(|e| Error::Encode(Box::new(e)))
}

/// An aggregate's state from a snapshot payload.
pub fn from_snapshot<T: SnapshotState>(category: &str, schema_version: u32, snapshot: Value) -> Result<T> {
    serde_json::from_value(snapshot).map_err(|e| Error::Decode {
        what: format!("snapshot of {category}"),
        event_type: category.to_owned(),
        schema_version,
        reason: e.to_string(),
    })
}
