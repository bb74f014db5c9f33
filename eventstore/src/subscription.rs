//! Subscriptions: catch up in pages, then follow live, woken by pushes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;

use crate::{Error, EventStore, Filter, Position, RecordedEvent, Result};

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
#[derive(Clone, Debug)]
pub struct Notifier(Arc<watch::Sender<u64>>);

impl Notifier {
    /// A notifier nobody listens to yet.
    pub fn new() -> Self {
        Notifier(Arc::new(watch::Sender::new(0)))
    }

    /// Wakes every [`Wakeup`] made from this notifier.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A new receiver of wake-ups.
    pub fn subscribe(&self) -> Wakeup {
        Wakeup(self.0.subscribe())
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

/// The receiving side of wake-ups, one per subscriber.
#[derive(Debug)]
pub struct Wakeup(watch::Receiver<u64>);

impl Wakeup {
    /// Forgets wake-ups received so far; call it before reading, so that a commit that races
    /// with the read still wakes the next [`Wakeup::wait`].
    pub fn mark_seen(&mut self) {
        self.0.borrow_and_update();
    }

    /// Waits for a wake-up newer than the last [`Wakeup::mark_seen`], or `timeout`. Returns
    /// `true` if woken.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, self.0.changed()).await {
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
            match st.store.read_all_page(st.from, &st.filter, st.options.page_size).await {
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
