//! Subscriptions: the log as a stream of events, catching up in pages and then following live,
//! through the [`Follower`].

use std::collections::VecDeque;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};

use crate::{Error, EventStore, Filter, Follower, Position, RecordedEvent, Result};
// The backends name the wake-ups by their old home.
pub(crate) use crate::wakeup::{Notifier, Wakeup};

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

/// A subscription's state: the follower, and the page it is handing out event by event.
struct Follow<'a, S: ?Sized> {
    follower: Follower<'a, S>,
    buffer: VecDeque<RecordedEvent>,
    ended: bool,
}

pub(crate) fn follow<'a, S: EventStore + ?Sized>(
    store: &'a S,
    from: Position,
    filter: Filter,
    options: SubscriptionOptions,
) -> BoxStream<'a, Result<RecordedEvent>> {
    let state = Follow {
        buffer: VecDeque::with_capacity(options.page_size),
        follower: Follower::new(store, from, filter, options),
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
            match st.follower.next_page().await {
                Ok(page) => st.buffer.extend(page.events),
                Err(Error::Closed) => {
                    st.ended = true;
                    return Some((Err(Error::Closed), st));
                }
                Err(error) => return Some((Err(error), st)),
            }
        }
    })
    .boxed()
}
