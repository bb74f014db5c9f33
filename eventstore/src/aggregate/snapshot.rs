//! Snapshots: an aggregate's state at a version, so loading need not replay every event.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// When a [`Repository`](crate::Repository) writes snapshots of an aggregate.
///
/// Snapshots never change what `load` returns: a snapshot whose schema version is not the
/// current one is ignored, and the state is rebuilt from the events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SnapshotPolicy {
    /// Never: always replay the whole stream.
    #[default]
    Never,
    /// Whenever the stream's event count crosses a multiple of `events`.
    Every {
        /// How many events between snapshots (at least 1).
        events: u64,
        /// The snapshot payload's schema version: bump it when the state's shape changes, and
        /// older snapshots are ignored.
        schema_version: u32,
    },
}

impl SnapshotPolicy {
    /// Every `events` events, schema version 1.
    pub const fn every(events: u64) -> Self {
        SnapshotPolicy::Every { events: if events == 0 { 1 } else { events }, schema_version: 1 }
    }

    /// The same policy with another snapshot schema version.
    pub const fn with_schema_version(self, version: u32) -> Self {
        match self {
            SnapshotPolicy::Never => SnapshotPolicy::Never,
            SnapshotPolicy::Every { events, .. } => SnapshotPolicy::Every { events, schema_version: version },
        }
    }

    /// The snapshot schema version in use (`None`: no snapshots).
    pub const fn schema_version(self) -> Option<u32> {
        match self {
            SnapshotPolicy::Never => None,
            SnapshotPolicy::Every { schema_version, .. } => Some(schema_version),
        }
    }

    /// Whether a stream going from `before` (its last version, `None` if new) to `after` has
    /// crossed a snapshot point.
    pub(crate) fn due(self, before: Option<u64>, after: u64) -> bool {
        match self {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::Every { events, .. } => {
                let count_before = before.map_or(0, |v| v + 1);
                (after + 1) / events > count_before / events
            }
        }
    }
}

/// A stored snapshot: the state after the event at `version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The stream version the state reflects (the last event applied).
    pub version: u64,
    /// The schema version of `state`.
    pub schema_version: u32,
    /// The state.
    pub state: Value,
}

impl Snapshot {
    /// A snapshot of `state` after the event at `version`.
    pub fn new(version: u64, schema_version: u32, state: Value) -> Self {
        Snapshot { version, schema_version, state }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_when_the_count_crosses_a_multiple() {
        let p = SnapshotPolicy::every(3);
        // Versions count from 0, so version 2 is the third event.
        assert!(!p.due(None, 1));
        assert!(p.due(None, 2));
        assert!(p.due(Some(1), 2));
        assert!(!p.due(Some(2), 4));
        assert!(p.due(Some(4), 5));
        assert!(p.due(Some(0), 10));
        assert!(!SnapshotPolicy::Never.due(None, 100));
        assert_eq!(SnapshotPolicy::every(0), SnapshotPolicy::every(1));
    }
}
