//! The one loop that follows the log: subscriptions and projection workers both read through it.
//!
//! It reads a page after a position, and when there is nothing new it waits for a wake-up or the
//! poll interval. Three details are easy to get wrong, so they live here once:
//! - **Quick re-poll.** After a wake-up, empty reads re-poll quickly (doubling from 1 ms up to
//!   half the poll interval) in case committed events wait behind an older open transaction on
//!   PostgreSQL, whose end sends no wake-up of its own (`docs/ordering.md`); but only until the
//!   follower has read as far as the wake-ups announced, when they said (a wake-up from an
//!   append names its position). A follower that has read everything announced waits for the
//!   next wake-up: one read per wake-up.
//! - **The shared tail.** Followers at the head take their pages from the store's recent log,
//!   so N of them cost one database read per wake-up, not N; a follower catching up (its last
//!   read of the database was a full page) reads the database itself.
//! - **Back-off.** After a read error the next read waits, from the retry delay doubling up to
//!   the poll interval; the error itself goes to the caller.

use std::time::Duration;

use crate::wakeup::Announced;
use crate::{EventStore, Filter, Page, Position, Result, SubscriptionOptions, Wakeup};

/// The first quick re-poll's wait; each next one doubles it.
const QUICK_POLL: Duration = Duration::from_millis(1);

/// Follows the global log from a position, page by page: catches up, then waits for new events.
///
/// Unlike [`EventStore::subscribe`], it yields whole [`Page`]s with their
/// [`next`](Page::next) position, which moves past events the filter does not select: a
/// consumer that keeps a checkpoint (a projection worker) can move it even when nothing it wants
/// was committed.
///
/// ```
/// use annal_eventstore::{EventStore, ExpectedVersion, Filter, Follower, MemoryEventStore, NewEvent, Position, StreamName};
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> annal_eventstore::Result<()> {
/// let store = MemoryEventStore::new();
/// let cart = StreamName::new("cart-1")?;
/// store.append(&cart, ExpectedVersion::NoStream, vec![NewEvent::new("ItemAdded", json!({}))]).await?;
/// let mut follower = Follower::new(&store, Position::START, Filter::all(), Default::default());
/// let page = follower.next_page().await?;
/// assert_eq!(page.events.len(), 1);
/// assert_eq!(follower.position(), page.next);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Follower<'a, S: ?Sized> {
    store: &'a S,
    from: Position,
    filter: Filter,
    options: SubscriptionOptions,
    wakeup: Wakeup,
    /// What to wait before the next read: set by an empty read.
    wait: Option<Duration>,
    /// The next wait after an empty read, while re-polling quickly after a wake-up.
    quick_poll: Option<Duration>,
    /// Whether a wake-up that did not say what it announced is being re-polled for: the quick
    /// re-polls then run their course.
    unknown: bool,
    /// Whether the last read of the database reached the head of the log: the follower then
    /// reads through the store's shared tail; while catching up it reads the database itself.
    at_head: bool,
    /// The announced position the current quick re-polls are for: one round of them per
    /// wake-up, or per newly announced position, not an endless one while events stay hidden.
    quick_for: Option<Position>,
    error_delay: Option<Duration>,
}

impl<'a, S: EventStore + ?Sized> Follower<'a, S> {
    /// A follower of the events after `from` that `filter` selects, `options.page_size` at
    /// most per page.
    pub fn new(store: &'a S, from: Position, filter: Filter, options: SubscriptionOptions) -> Self {
        Follower {
            wakeup: store.wakeup(),
            store,
            from,
            filter,
            options,
            wait: None,
            quick_poll: None,
            unknown: false,
            quick_for: None,
            at_head: false,
            error_delay: None,
        }
    }

    /// Where the follower is: the next page starts after this position.
    pub fn position(&self) -> Position {
        self.from
    }

    /// Moves the follower to `position` (back or forth), for example to a checkpoint that
    /// another worker moved.
    pub fn seek(&mut self, position: Position) {
        self.from = position;
    }

    /// The next page: returned at once when the log has events the filter selects after the
    /// follower's position, or has moved past ones it does not select (a page without events
    /// whose `next` is further on); otherwise after a wake-up or the poll interval, whichever
    /// comes first. The follower's position moves to the page's `next`.
    ///
    /// Cancel-safe: the position moves only as a page is returned, so dropping the future (in a
    /// `select!` with a shutdown signal) loses nothing.
    ///
    /// # Errors
    /// [`crate::Error::Unreadable`] for an event that cannot be decoded, in its place (the
    /// follower's position moves past it, so the next call goes on after it); another failed
    /// read (the next call backs off first and reads again); [`crate::Error::Closed`] once the
    /// store is closed.
    pub async fn next_page(&mut self) -> Result<Page> {
        loop {
            let waited = self.wait.take();
            if let Some(wait) = waited
                && self.wakeup.wait(wait).await
            {
                // What to re-poll for is decided after the read, from what was announced.
                self.quick_for = None;
            }
            if let Some(delay) = self.error_delay {
                tokio::time::sleep(delay).await;
            }
            self.wakeup.mark_seen();
            let limit = self.options.page_size;
            // A poll after waiting `w` without a wake-up may take the shared tail as another
            // follower refreshed it in the last `w / 2`: that read came after this follower's
            // previous one, and followers polling on one schedule then share one read.
            let max_age = waited.map_or(Duration::ZERO, |wait| wait / 2);
            let shared = if self.at_head {
                self.wakeup.tail.page(self.store, self.from, &self.filter, limit, &self.wakeup, max_age).await
            } else {
                Ok(None)
            };
            let read = match shared {
                Ok(Some(page)) => Ok(page),
                Ok(None) => {
                    let page = self.store.read_all_page(self.from, &self.filter, limit).await;
                    // A full page of its own: catching up, so the next one comes from the database
                    // too (the tail would hold and copy every event on the way). A short one: at
                    // the head, where the tail is shared.
                    if let Ok(page) = &page {
                        self.at_head = page.events.len() < limit;
                    }
                    page
                }
                Err(error) => Err(error),
            };
            match read {
                Ok(page) => {
                    self.error_delay = None;
                    let moved = page.next > self.from;
                    self.from = self.from.max(page.next);
                    match self.wakeup.announced() {
                        Announced::Unknown => {
                            self.unknown = true;
                            self.quick_poll = Some(QUICK_POLL);
                        }
                        // Announced events not read yet: committed, but maybe not visible.
                        Announced::UpTo(position) if self.from < position => {
                            if self.quick_for != Some(position) {
                                self.quick_for = Some(position);
                                self.quick_poll = Some(QUICK_POLL);
                            }
                        }
                        Announced::UpTo(_) if !self.unknown => {
                            // Every announced event has been read: nothing to re-poll for, and
                            // after a short page nothing to read until the next wake-up.
                            self.quick_poll = None;
                            if !page.events.is_empty() && page.events.len() < limit {
                                self.wait = Some(self.options.poll_interval);
                            }
                        }
                        Announced::UpTo(_) => {}
                    }
                    if page.events.is_empty() {
                        let wait = self.quick_poll.unwrap_or(self.options.poll_interval);
                        self.quick_poll = (wait < self.options.poll_interval / 2).then_some(wait * 2);
                        self.unknown &= self.quick_poll.is_some();
                        self.wait = Some(wait);
                        if !moved {
                            continue;
                        }
                    }
                    return Ok(page);
                }
                Err(crate::Error::Unreadable(bad)) => {
                    // Reported in its place; the next page starts after it.
                    self.error_delay = None;
                    self.from = self.from.max(bad.position);
                    tracing::warn!(position = %bad.position, stream = %bad.stream, reason = %bad.reason,
                        "follower passed an unreadable event");
                    return Err(crate::Error::Unreadable(bad));
                }
                Err(error) => {
                    if !matches!(error, crate::Error::Closed) {
                        let delay = self.error_delay.map_or(self.options.retry_delay, |d| d * 2);
                        self.error_delay = Some(delay.min(self.options.poll_interval));
                        tracing::warn!(%error, from = %self.from, "reading the log failed; retrying");
                    }
                    return Err(error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;
    use serde_json::json;

    use super::*;
    use crate::{AppendResult, Direction, ExpectedVersion, MemoryEventStore, NewEvent, RecordedEvent, StreamName};

    /// The memory store, counting reads of the log.
    #[derive(Clone, Default)]
    struct Counting {
        inner: MemoryEventStore,
        reads: Arc<AtomicU64>,
    }

    #[async_trait]
    impl EventStore for Counting {
        async fn append(
            &self,
            stream: &StreamName,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> Result<AppendResult> {
            self.inner.append(stream, expected, events).await
        }
        async fn read_stream_page(
            &self,
            stream: &StreamName,
            direction: Direction,
            from: u64,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>> {
            self.inner.read_stream_page(stream, direction, from, limit).await
        }
        async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> Result<Page> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read_all_page(from, filter, limit).await
        }
        async fn read_event(&self, id: uuid::Uuid) -> Result<Option<RecordedEvent>> {
            self.inner.read_event(id).await
        }
        async fn head(&self) -> Result<Position> {
            self.inner.head().await
        }
        fn wakeup(&self) -> Wakeup {
            self.inner.wakeup()
        }
    }

    /// Time is paused, so every wait the follower starts runs to its end while the test idles:
    /// quick re-polls after a wake-up would all happen.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_follower_that_read_what_a_wake_up_announced_reads_once_per_wake_up() {
        let store = Counting::default();
        let stream = StreamName::new("chat-1").unwrap();
        let delivered = AtomicU64::new(0);
        // No safety-net polls within the test: every read is for a wake-up.
        let options =
            SubscriptionOptions { poll_interval: Duration::from_secs(3600), ..SubscriptionOptions::default() };
        let mut follower = Follower::new(&store, Position::START, Filter::all(), options);
        let following = async {
            loop {
                let page = follower.next_page().await.unwrap();
                delivered.fetch_add(page.events.len() as u64, Ordering::Relaxed);
            }
        };
        let appended = 20;
        let script = async {
            for version in 0..appended {
                let expected =
                    if version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(version - 1) };
                store.append(&stream, expected, vec![NewEvent::new("Said", json!({ "n": version }))]).await.unwrap();
                while delivered.load(Ordering::Relaxed) <= version {
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
                // A quiet log for a while: every wait the follower starts runs out.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        };
        tokio::select! {
            () = following => unreachable!(),
            () = script => {}
        }
        // One read per wake-up, and one at the start.
        let reads = store.reads.load(Ordering::Relaxed);
        assert!(reads <= 1 + appended, "{reads} reads for {appended} wake-ups");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_wake_up_that_does_not_say_what_it_announced_is_re_polled_for() {
        let store = Counting::default();
        let notifier = crate::Notifier::new();
        let mut follower = Follower::new(&store, Position::START, Filter::all(), SubscriptionOptions::default());
        follower.wakeup = notifier.subscribe();
        let script = async {
            // The follower reads, finds nothing and waits; an unknown wake-up ...
            tokio::time::sleep(Duration::from_millis(10)).await;
            let before = store.reads.load(Ordering::Relaxed);
            notifier.notify();
            // ... starts a round of quick re-polls: 1, 2, 4, ... ms up to half the poll interval.
            tokio::time::sleep(Duration::from_millis(600)).await;
            store.reads.load(Ordering::Relaxed) - before
        };
        let polls = tokio::select! {
            page = follower.next_page() => panic!("nothing was appended, yet {page:?}"),
            polls = script => polls,
        };
        assert!(polls >= 8, "only {polls} reads after an unknown wake-up");
    }
}
