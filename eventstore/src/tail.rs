//! The recent log shared by the subscriptions of one store: one database read per wake-up, not
//! one per subscription.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::{EventStore, Filter, Page, Position, RecordedEvent, Result, Wakeup};

/// The recent unfiltered log, shared by the subscriptions of one store (it travels with the
/// store's [`Notifier`] and its [`Wakeup`]s). When many subscriptions follow the head, the first
/// to find nothing new reads the next page from the database and the others take their events
/// from memory: one read per wake-up instead of one per subscription.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    state: tokio::sync::Mutex<TailState>,
}

#[derive(Debug, Default)]
struct TailState {
    /// Every event of the log after `start` up to `end`, in order.
    events: VecDeque<RecordedEvent>,
    start: Position,
    end: Position,
    /// Whether `start` and `end` have been set by a first reader.
    primed: bool,
    /// The wake-up count when the last refresh began: a subscriber that has seen no later
    /// wake-up would find nothing the refresh did not.
    version: u64,
    refreshed_at: Option<Instant>,
}

/// Events the tail keeps; older ones are dropped, and subscriptions behind them read the
/// database themselves.
const TAIL_CAPACITY: usize = 8192;
/// Events per refresh.
const TAIL_PAGE: usize = 1000;
/// Subscribers that poll without a wake-up (the safety net for events that become visible late)
/// refresh the tail at most this often between them, or less often when they say so.
const TAIL_MIN_REFRESH: Duration = Duration::from_millis(1);

impl Tail {
    /// A page of the events after `from` that `filter` selects, at most `limit`, taken from the
    /// recent log when `from` is within it (reading the next page from the database if the
    /// subscriber may be missing something); `None` when `from` is older than the recent log, so
    /// that the caller reads the database itself. Without a wake-up since the last refresh, a
    /// refresh less than `max_age` (at least [`TAIL_MIN_REFRESH`]) old is as good as a new read.
    pub(crate) async fn page<S: EventStore + ?Sized>(
        &self,
        store: &S,
        from: Position,
        filter: &Filter,
        limit: usize,
        wakeup: &Wakeup,
        max_age: Duration,
    ) -> Result<Option<Page>> {
        let max_age = max_age.max(TAIL_MIN_REFRESH);
        let mut st = self.state.lock().await;
        if !st.primed || from > st.end {
            // Start (again) where this subscriber is: it is the one furthest ahead.
            *st = TailState { start: from, end: from, primed: true, ..TailState::default() };
        }
        if from < st.start {
            return Ok(None);
        }
        let mut refreshed = false;
        loop {
            let first = st.events.partition_point(|e| e.position <= from);
            let events: Vec<RecordedEvent> =
                st.events.iter().skip(first).filter(|e| filter.matches(e)).take(limit).cloned().collect();
            if events.len() == limit {
                let next = events.last().map_or(from, |e| e.position);
                return Ok(Some(Page::new(events, next)));
            }
            let stale = wakeup.latest() != st.version || st.refreshed_at.is_none_or(|at| at.elapsed() >= max_age);
            if !events.is_empty() || refreshed || !stale {
                return Ok(Some(Page::new(events, st.end)));
            }
            st.version = wakeup.latest();
            st.refreshed_at = Some(Instant::now());
            let page = store.read_all_page(st.end, &Filter::all(), TAIL_PAGE).await?;
            st.end = st.end.max(page.next);
            st.events.extend(page.events);
            while st.events.len() > TAIL_CAPACITY {
                if let Some(dropped) = st.events.pop_front() {
                    st.start = dropped.position;
                }
            }
            refreshed = true;
            if from < st.start {
                return Ok(None);
            }
        }
    }
}
