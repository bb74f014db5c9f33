//! Stream names.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, truncated};

/// The longest stream name accepted, in bytes.
pub const MAX_STREAM_NAME_LEN: usize = 255;

/// The validated name of a stream, such as `account-42`.
///
/// A stream name is non-empty, at most [`MAX_STREAM_NAME_LEN`] bytes, and has no control
/// characters. By convention it reads `category-id`: the part before the first `-` is the
/// [category](StreamName::category) that filters and partitions use; a name without `-` is its
/// own category.
///
/// Cloning is cheap (the name is shared).
///
/// ```
/// use annal_eventstore::StreamName;
///
/// let stream = StreamName::new("account-42")?;
/// assert_eq!(stream.category(), "account");
/// assert_eq!(stream.id(), Some("42"));
/// assert!(StreamName::new("").is_err());
/// # Ok::<(), annal_eventstore::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Validates `name` and makes it a stream name.
    ///
    /// # Errors
    /// [`Error::InvalidStreamName`] if the name is empty, longer than [`MAX_STREAM_NAME_LEN`]
    /// bytes, or contains a control character.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        let reason = if name.is_empty() {
            Some("a stream name cannot be empty")
        } else if name.len() > MAX_STREAM_NAME_LEN {
            Some("a stream name is at most 255 bytes")
        } else if name.chars().any(char::is_control) {
            Some("a stream name cannot contain control characters")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidStreamName { name: truncated(name), reason }),
            None => Ok(StreamName(name.into())),
        }
    }

    /// Builds `category-id`, validating the result.
    ///
    /// # Errors
    /// [`Error::InvalidStreamName`] as for [`StreamName::new`], and when `category` is empty or
    /// contains `-` (the category would not read back as given).
    pub fn from_parts(category: &str, id: impl fmt::Display) -> Result<Self> {
        if category.is_empty() || category.contains('-') {
            return Err(Error::InvalidStreamName {
                name: truncated(&format!("{category}-{id}")),
                reason: "a category must be non-empty and cannot contain '-'",
            });
        }
        Self::new(format!("{category}-{id}"))
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `-`, or the whole name if it has none.
    pub fn category(&self) -> &str {
        category_of(&self.0)
    }

    /// The part after the first `-`, if there is one.
    pub fn id(&self) -> Option<&str> {
        self.0.split_once('-').map(|(_, id)| id)
    }
}

pub(crate) fn category_of(name: &str) -> &str {
    name.split_once('-').map_or(name, |(category, _)| category)
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for StreamName {
    type Error = Error;
    fn try_from(name: &str) -> Result<Self> {
        Self::new(name)
    }
}

impl TryFrom<String> for StreamName {
    type Error = Error;
    fn try_from(name: String) -> Result<Self> {
        Self::new(name)
    }
}

impl std::str::FromStr for StreamName {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        Self::new(name)
    }
}

impl Serialize for StreamName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        StreamName::new(name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_expose_category_and_id() {
        let s = StreamName::new("order-2024-17").unwrap();
        assert_eq!(s.category(), "order");
        assert_eq!(s.id(), Some("2024-17"));
        let s = StreamName::new("settings").unwrap();
        assert_eq!(s.category(), "settings");
        assert_eq!(s.id(), None);
        assert!(StreamName::new("é".repeat(127)).is_ok());
    }

    #[test]
    fn invalid_names_are_rejected_with_a_reason() {
        for bad in ["", "a\nb", "tab\there", "nul\0"] {
            assert!(matches!(StreamName::new(bad), Err(Error::InvalidStreamName { .. })), "{bad:?}");
        }
        let long = "x".repeat(MAX_STREAM_NAME_LEN + 1);
        let err = StreamName::new(&long).unwrap_err();
        assert!(err.to_string().contains("at most 255 bytes"), "{err}");
        assert!(StreamName::new("x".repeat(MAX_STREAM_NAME_LEN)).is_ok());
        assert!(StreamName::from_parts("a-b", 1).is_err());
        assert!(StreamName::from_parts("", 1).is_err());
        assert_eq!(StreamName::from_parts("account", 7).unwrap().as_str(), "account-7");
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<StreamName>("\"a-1\"").is_ok());
        assert!(serde_json::from_str::<StreamName>("\"\"").is_err());
    }
}
