//! Rules every backend's append shares: idempotent retries and conflicts.

use std::collections::HashMap;

use uuid::Uuid;

use crate::{AppendResult, Error, ExpectedVersion, Position, Result, StreamName};

/// Where an event id of the batch was already written.
#[derive(Clone, Debug)]
pub(crate) struct Written {
    pub(crate) id: Uuid,
    pub(crate) stream: String,
    pub(crate) version: u64,
    pub(crate) position: Position,
}

/// Decides what an append whose batch ids were (some or all) already written means.
///
/// `written` are the stored events that carry any of `batch` ids. Returns:
/// - `Ok(None)` when none was written: the append failed for another reason (a version
///   conflict);
/// - `Ok(Some(result))` when every event of the batch was written before, in batch order at
///   consecutive versions of this stream, at a place `expected` allows: an idempotent retry,
///   answered with the original result (as EventStoreDB does, this includes retrying a
///   contiguous part of an earlier batch);
/// - `Err(DuplicateEvents)` otherwise.
pub(crate) fn resolve_written(
    stream: &StreamName,
    expected: ExpectedVersion,
    batch: &[Uuid],
    written: Vec<Written>,
) -> Result<Option<AppendResult>> {
    if written.is_empty() {
        return Ok(None);
    }
    // One pass to put the rows in batch order: a retry of an n-event batch costs O(n).
    let place: HashMap<Uuid, usize> = batch.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut in_order: Vec<Option<&Written>> = vec![None; batch.len()];
    for w in &written {
        if let Some(&i) = place.get(&w.id) {
            in_order[i] = Some(w);
        }
    }
    let duplicate = || {
        let found: Vec<&Written> = in_order.iter().flatten().copied().collect();
        Error::DuplicateEvents {
            stream: stream.clone(),
            event_ids: found.iter().map(|w| w.id).collect(),
            written_at: found.iter().map(|w| (w.stream.clone(), w.version)).collect(),
        }
    };
    let Some(rows) = in_order.iter().copied().collect::<Option<Vec<&Written>>>() else {
        return Err(duplicate());
    };
    let first = rows[0].version;
    let same_batch = rows
        .iter()
        .enumerate()
        .all(|(i, w)| w.stream == stream.as_str() && Some(w.version) == first.checked_add(i as u64));
    let consistent = match expected {
        ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
        ExpectedVersion::NoStream => first == 0,
        ExpectedVersion::Exact(v) => v.checked_add(1) == Some(first),
    };
    if !(same_batch && consistent) {
        return Err(duplicate());
    }
    let version = rows.last().map_or(first, |w| w.version);
    Ok(Some(AppendResult::already_written(version, rows.iter().map(|w| w.position).collect())))
}

/// The version the first event of a batch gets, or the conflict if `expected` does not hold.
pub(crate) fn first_version(stream: &StreamName, expected: ExpectedVersion, current: Option<u64>) -> Result<u64> {
    if !expected.is_satisfied_by(current) {
        return Err(Error::Conflict { stream: stream.clone(), expected, actual: current });
    }
    Ok(current.map_or(0, |v| v + 1))
}

/// Checks a snapshot to be written with an append of `count` events: it must be at
/// the version the append ends at, so `expected` must name the version the append starts after.
/// Returns the snapshot's state as stored and as JSON text, checked as
/// [`save_snapshot`](crate::EventStore::save_snapshot) checks it.
pub(crate) fn check_snapshot_with_append(
    expected: ExpectedVersion,
    count: usize,
    snapshot: &crate::Snapshot,
) -> Result<(serde_json::Value, String)> {
    let invalid = |reason| Error::InvalidArgument { reason };
    let first = match expected {
        ExpectedVersion::Exact(version) => version.checked_add(1),
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Any | ExpectedVersion::StreamExists => {
            return Err(invalid("a snapshot written with an append needs an exact expected version or NoStream"));
        }
    };
    let last = first.and_then(|first| first.checked_add(count.checked_sub(1)? as u64));
    if last != Some(snapshot.version) {
        return Err(invalid("a snapshot written with an append is at the version the append ends at"));
    }
    crate::event::encode_snapshot(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(ids: &[Uuid], stream: &str, first: u64) -> Vec<Written> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Written {
                id: *id,
                stream: stream.into(),
                version: first + i as u64,
                position: Position::new(0, 10 + i as u64),
            })
            .collect()
    }

    #[test]
    fn a_retry_of_the_same_batch_returns_the_original_result() {
        let s = StreamName::new("a-1").unwrap();
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        for expected in [ExpectedVersion::Exact(2), ExpectedVersion::Any, ExpectedVersion::StreamExists] {
            let r = resolve_written(&s, expected, &ids, written(&ids, "a-1", 3)).unwrap().unwrap();
            assert_eq!(r.version, 4);
            assert_eq!(r.positions, vec![Position::new(0, 10), Position::new(0, 11)]);
        }
        // Order of the rows found does not matter.
        let mut rows = written(&ids, "a-1", 0);
        rows.reverse();
        assert!(resolve_written(&s, ExpectedVersion::NoStream, &ids, rows).unwrap().is_some());
    }

    #[test]
    fn anything_else_is_a_duplicate_error() {
        let s = StreamName::new("a-1").unwrap();
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        assert!(resolve_written(&s, ExpectedVersion::Any, &ids, vec![]).unwrap().is_none());
        let cases = [
            (ExpectedVersion::Any, written(&ids[..1], "a-1", 0)), // partial
            (ExpectedVersion::Exact(5), written(&ids, "a-1", 3)), // other place
            (ExpectedVersion::NoStream, written(&ids, "a-1", 3)),
            (ExpectedVersion::Any, written(&ids, "b-1", 0)), // other stream
        ];
        for (expected, rows) in cases {
            let err = resolve_written(&s, expected, &ids, rows).unwrap_err();
            assert!(matches!(err, Error::DuplicateEvents { .. }), "{expected:?}: {err}");
        }
        let mut swapped = written(&ids, "a-1", 0);
        swapped[0].version = 1;
        swapped[1].version = 0;
        assert!(resolve_written(&s, ExpectedVersion::Any, &ids, swapped).is_err());
    }
}
