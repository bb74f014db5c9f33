//! The one loop that follows the log: subscriptions and projection workers both read through it.
//!
//! It reads a page after a position, and when there is nothing new it waits for a wake-up or the
//! poll interval. Three details are easy to get wrong, so they live here once:
//! - **Quick re-poll.** After a wake-up, empty reads re-poll quickly (doubling from 1 ms up to
//!   half the poll interval) in case committed events wait behind an older open transaction on
//!   PostgreSQL, whose end sends no wake-up of its own (`docs/ordering.md`).
//! - **The shared tail.** Followers near the head take their pages from the store's recent log,
//!   so N of them cost one database read per wake-up, not N.
//! - **Back-off.** After a read error the next read waits, from the retry delay doubling up to
//!   the poll interval; the error itself goes to the caller.

use std::time::Duration;

use crate::{EventStore, Filter, Page, Position, Result, SubscriptionOptions, Wakeup};

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
                self.quick_poll = Some(Duration::from_millis(1));
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
            let read =
                match self.wakeup.tail.page(self.store, self.from, &self.filter, limit, &self.wakeup, max_age).await {
                    Ok(Some(page)) => Ok(page),
                    Ok(None) => self.store.read_all_page(self.from, &self.filter, limit).await,
                    Err(error) => Err(error),
                };
            match read {
                Ok(page) => {
                    self.error_delay = None;
                    let moved = page.next > self.from;
                    self.from = self.from.max(page.next);
                    if page.events.is_empty() {
                        let wait = self.quick_poll.unwrap_or(self.options.poll_interval);
                        self.quick_poll = (wait < self.options.poll_interval / 2).then_some(wait * 2);
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
