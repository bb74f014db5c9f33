//! Idempotent consumers: remembering which events were already handled.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use uuid::Uuid;

/// Remembers the last `capacity` event ids seen, so an at-least-once handler can skip an event
/// it already handled (after a crash, the last batch comes again).
///
/// Bounded: past `capacity` ids the oldest are forgotten, so size it above the largest batch a
/// redelivery can repeat. For effects that must never repeat across restarts, record the event
/// id in the effect's own store instead (a unique key), or use exactly-once delivery.
///
/// ```
/// use annal_projections::Dedup;
/// use uuid::Uuid;
///
/// let seen = Dedup::new(1000);
/// let id = Uuid::now_v7();
/// assert!(seen.first_time(id));
/// assert!(!seen.first_time(id));
/// ```
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    inner: Mutex<(HashSet<Uuid>, VecDeque<Uuid>)>,
}

impl Dedup {
    /// Remembers up to `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Dedup { capacity, inner: Mutex::new((HashSet::with_capacity(capacity), VecDeque::with_capacity(capacity))) }
    }

    /// `true` the first time `id` is seen (within the window), `false` after.
    pub fn first_time(&self, id: Uuid) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (seen, order) = &mut *inner;
        if !seen.insert(id) {
            return false;
        }
        order.push_back(id);
        if order.len() > self.capacity
            && let Some(oldest) = order.pop_front()
        {
            seen.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_past_capacity() {
        let dedup = Dedup::new(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        assert!(ids.iter().all(|id| dedup.first_time(*id)));
        assert!(!dedup.first_time(ids[2]));
        assert!(!dedup.first_time(ids[1]));
        assert!(dedup.first_time(ids[0]), "the oldest was forgotten");
    }
}
