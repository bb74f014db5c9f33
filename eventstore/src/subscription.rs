//! Subscriptions: catch up in pages, then follow live, woken by pushes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;

use crate::{Error, EventStore, Filter, Page, Position, RecordedEvent, Result};

/// Tuning of one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionOptions {
    /// Events fetched per round trip, and the most a subscription buffers (default 512).
    pub page_size: usize,
    /// How long a caught-up subscription waits for a wake-up before polling anyway: the safety
    /// net for lost notifications (default 1 s).
    pub poll_interval: Duration,
    /// The first wait before retrying after an error, doubled on each further error up to the
    /// poll interval (default 50 ms).
    pub retry_delay: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            page_size: crate::store::DEFAULT_PAGE_SIZE,
            poll_interval: Duration::from_secs(1),
            retry_delay: Duration::from_millis(50),
        }
    }
}

impl SubscriptionOptions {
    /// Sets the page size (at least 1).
    pub fn page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// Sets the safety-net poll interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
}

/// The sending side of wake-ups: a backend calls [`Notifier::notify`] after a commit.
///
/// Notifications coalesce: a subscriber that was busy sees one wake-up however many commits
/// happened meanwhile.
///
/// It also carries the store's recent log, shared by all its subscriptions (see
/// [`EventStore::subscribe`]).
#[derive(Clone, Debug)]
pub struct Notifier {
    sender: Arc<watch::Sender<u64>>,
    tail: Arc<Tail>,
}

impl Notifier {
    /// A notifier nobody listens to yet.
    pub fn new() -> Self {
        Notifier { sender: Arc::new(watch::Sender::new(0)), tail: Arc::default() }
    }

    /// Wakes every [`Wakeup`] made from this notifier.
    pub fn notify(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A new receiver of wake-ups.
    pub fn subscribe(&self) -> Wakeup {
        Wakeup { receiver: self.sender.subscribe(), tail: self.tail.clone() }
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

/// The receiving side of wake-ups, one per subscriber.
#[derive(Debug)]
pub struct Wakeup {
    receiver: watch::Receiver<u64>,
    tail: Arc<Tail>,
}

impl Wakeup {
    /// How many wake-ups the notifier has sent.
    fn latest(&self) -> u64 {
        *self.receiver.borrow()
    }

    /// Forgets wake-ups received so far; call it before reading, so that a commit that races
    /// with the read still wakes the next [`Wakeup::wait`].
    pub fn mark_seen(&mut self) {
        self.receiver.borrow_and_update();
    }

    /// Waits for a wake-up newer than the last [`Wakeup::mark_seen`], or `timeout`. Returns
    /// `true` if woken.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, self.receiver.changed()).await {
            Ok(Ok(())) => true,
            Err(_elapsed) => false,
            // The notifier is gone: only polling is left.
            Ok(Err(_closed)) => {
                tokio::time::sleep(timeout).await;
                false
            }
        }
    }
}

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
/// refresh the tail at most this often between them.
const TAIL_MIN_REFRESH: Duration = Duration::from_millis(1);

impl Tail {
    /// A page of the events after `from` that `filter` selects, at most `limit`, taken from the
    /// recent log when `from` is within it (reading the next page from the database if the
    /// subscriber may be missing something); `None` when `from` is older than the recent log, so
    /// that the caller reads the database itself.
    async fn page<S: EventStore + ?Sized>(
        &self,
        store: &S,
        from: Position,
        filter: &Filter,
        limit: usize,
        wakeup: &Wakeup,
    ) -> Result<Option<Page>> {
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
            let stale =
                wakeup.latest() != st.version || st.refreshed_at.is_none_or(|at| at.elapsed() >= TAIL_MIN_REFRESH);
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

struct Follow<'a, S: ?Sized> {
    store: &'a S,
    from: Position,
    filter: Filter,
    options: SubscriptionOptions,
    buffer: VecDeque<RecordedEvent>,
    wakeup: Wakeup,
    /// After a wake-up, the next empty reads re-poll quickly (doubling from 1 ms) in case
    /// committed events are waiting behind an older open transaction, whose end sends no
    /// wake-up of its own.
    quick_poll: Option<Duration>,
    error_delay: Option<Duration>,
    ended: bool,
}

pub(crate) fn follow<'a, S: EventStore + ?Sized>(
    store: &'a S,
    from: Position,
    filter: Filter,
    options: SubscriptionOptions,
) -> BoxStream<'a, Result<RecordedEvent>> {
    let state = Follow {
        store,
        from,
        filter,
        buffer: VecDeque::with_capacity(options.page_size),
        wakeup: store.wakeup(),
        options,
        quick_poll: None,
        error_delay: None,
        ended: false,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if st.ended {
                return None;
            }
            if let Some(event) = st.buffer.pop_front() {
                return Some((Ok(event), st));
            }
            if let Some(delay) = st.error_delay {
                tokio::time::sleep(delay).await;
            }
            st.wakeup.mark_seen();
            let read = match st.wakeup.tail.page(st.store, st.from, &st.filter, st.options.page_size, &st.wakeup).await
            {
                Ok(Some(page)) => Ok(page),
                Ok(None) => st.store.read_all_page(st.from, &st.filter, st.options.page_size).await,
                Err(error) => Err(error),
            };
            match read {
                Ok(page) => {
                    st.error_delay = None;
                    st.from = st.from.max(page.next);
                    if !page.events.is_empty() {
                        st.buffer.extend(page.events);
                        continue;
                    }
                    let wait = st.quick_poll.unwrap_or(st.options.poll_interval);
                    st.quick_poll = (wait < st.options.poll_interval / 2).then_some(wait * 2);
                    if st.wakeup.wait(wait).await {
                        st.quick_poll = Some(Duration::from_millis(1));
                    }
                }
                Err(Error::Unreadable(bad)) => {
                    // Reported in its place; the subscription goes on after it.
                    st.error_delay = None;
                    st.from = st.from.max(bad.position);
                    tracing::warn!(position = %bad.position, stream = %bad.stream, reason = %bad.reason,
                        "subscription passed an unreadable event");
                    return Some((Err(Error::Unreadable(bad)), st));
                }
                Err(Error::Closed) => {
                    st.ended = true;
                    return Some((Err(Error::Closed), st));
                }
                Err(error) => {
                    let delay = st.error_delay.map_or(st.options.retry_delay, |d| d * 2);
                    st.error_delay = Some(delay.min(st.options.poll_interval));
                    tracing::warn!(%error, from = %st.from, "subscription read failed; retrying");
                    return Some((Err(error), st));
                }
            }
        }
    })
    .boxed()
}
