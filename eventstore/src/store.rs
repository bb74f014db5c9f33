//! The `EventStore` trait every backend implements.

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};

use crate::subscription::{self, SubscriptionOptions, Wakeup};
use crate::{AppendResult, ExpectedVersion, Filter, NewEvent, Position, RecordedEvent, Result, Snapshot, StreamName};

/// Which way a stream is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Oldest first.
    Forwards,
    /// Newest first.
    Backwards,
}

/// How to read one stream: direction, first version, and how many events at most.
///
/// ```
/// use annal_eventstore::ReadStream;
///
/// let last_ten = ReadStream::backwards().limit(10);
/// let from_five = ReadStream::forwards().from_version(5);
/// # let _ = (last_ten, from_five);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReadStream {
    direction: Direction,
    from: Option<u64>,
    limit: Option<usize>,
    page_size: usize,
}

impl ReadStream {
    /// Oldest first, from version 0, everything.
    pub fn forwards() -> Self {
        ReadStream { direction: Direction::Forwards, from: None, limit: None, page_size: DEFAULT_PAGE_SIZE }
    }

    /// Newest first, from the last version, everything.
    pub fn backwards() -> Self {
        ReadStream { direction: Direction::Backwards, ..Self::forwards() }
    }

    /// Starts at `version` (inclusive), going in the read's direction.
    pub fn from_version(mut self, version: u64) -> Self {
        self.from = Some(version);
        self
    }

    /// Returns at most `limit` events. A limit of 0 makes the read fail with
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Fetches this many events per database round trip (default 512, at least 1).
    pub fn page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// The direction.
    pub fn direction(&self) -> Direction {
        self.direction
    }
}

impl Default for ReadStream {
    fn default() -> Self {
        Self::forwards()
    }
}

/// Events fetched per round trip unless a read says otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 512;

/// Refuses a read of at most 0 events, as every backend does.
pub(crate) fn check_limit(limit: usize) -> Result<()> {
    if limit == 0 {
        return Err(crate::Error::InvalidArgument { reason: "a read's limit must be at least 1" });
    }
    Ok(())
}

/// One page of the global log.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Page {
    /// The events, in global order.
    pub events: Vec<RecordedEvent>,
    /// Where the next page starts: the position of the last event, or further when the backend
    /// also passed over events the filter did not select (so a selective reader's checkpoint
    /// keeps moving).
    pub next: Position,
}

impl Page {
    /// A page of `events` continuing after `next`.
    pub fn new(events: Vec<RecordedEvent>, next: Position) -> Self {
        Page { events, next }
    }

    /// The page a backend read after `from` with `limit`, where `head_before` is a head read
    /// before the page's query (or `from` when the read was not filtered). A full page
    /// continues after its last event; a short one has seen every selected event up to
    /// `head_before` too, so the reader may move past events the filter skipped, unless it was
    /// `stopped` before an unreadable event (then the next page starts at that event).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn after(
        from: Position,
        events: Vec<RecordedEvent>,
        limit: usize,
        head_before: Position,
        stopped: bool,
    ) -> Self {
        let last = events.last().map_or(from, |e| e.position);
        let next = if events.len() < limit && !stopped { last.max(head_before) } else { last };
        Page { events, next }
    }
}

/// An append-only event store: streams with optimistic concurrency, one gap-free global order,
/// and subscriptions.
///
/// Backends implement the required methods; reads as streams and subscriptions are provided on
/// top of them. Every backend passes the same conformance suite (`tests/conformance`).
///
/// # Examples
///
/// ```
/// use annal_eventstore::{EventStore, ExpectedVersion, MemoryEventStore, NewEvent, ReadStream, StreamName};
/// use futures::TryStreamExt;
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// async fn main() -> annal_eventstore::Result<()> {
///     let store = MemoryEventStore::new();
///     let stream = StreamName::new("account-1")?;
///     let opened = NewEvent::new("Opened", json!({ "owner": "ada" }));
///     let written = store.append(&stream, ExpectedVersion::NoStream, vec![opened]).await?;
///     assert_eq!(written.version, 0);
///
///     let deposit = NewEvent::new("Deposited", json!({ "amount": 10 }));
///     store.append(&stream, ExpectedVersion::Exact(0), vec![deposit]).await?;
///
///     let events: Vec<_> = store.read_stream(&stream, ReadStream::forwards()).try_collect().await?;
///     assert_eq!(events.len(), 2);
///     Ok(())
/// }
/// ```
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Appends `events` to `stream` atomically (all or none), if the stream is at `expected`.
    ///
    /// Every event gets the next version of the stream and a place in the global order.
    /// Appending a batch whose ids were all already written, as that same batch at a place
    /// consistent with `expected`, is an idempotent retry: it returns the original result and
    /// writes nothing.
    ///
    /// # Errors
    /// - [`Error::Conflict`](crate::Error::Conflict) when the stream is not at `expected`;
    /// - [`Error::DuplicateEvents`](crate::Error::DuplicateEvents) when some ids were already
    ///   written but this is not a retry of the same batch;
    /// - [`Error::EmptyBatch`](crate::Error::EmptyBatch),
    ///   [`Error::InvalidEventType`](crate::Error::InvalidEventType),
    ///   [`Error::EventTooLarge`](crate::Error::EventTooLarge),
    ///   [`Error::DuplicateEventInBatch`](crate::Error::DuplicateEventInBatch) for bad input;
    /// - [`Error::Closed`](crate::Error::Closed), [`Error::Backend`](crate::Error::Backend).
    ///
    /// In every error case nothing was written.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult>;

    /// Reads at most `limit` events of `stream` from version `from` (inclusive) in `direction`.
    /// A stream that does not exist reads as empty.
    ///
    /// Most callers want [`EventStore::read_stream`], which pages through this.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a `limit` of 0;
    /// [`Error::Unreadable`](crate::Error::Unreadable) for the first event of the page that
    /// cannot be decoded (the whole page fails: [`EventStore::read_stream`] then reads up to it
    /// one event at a time); [`Error::Closed`](crate::Error::Closed),
    /// [`Error::Backend`](crate::Error::Backend).
    async fn read_stream_page(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>>;

    /// Reads at most `limit` events of the global log that come after `from` and match
    /// `filter`, in global order.
    ///
    /// The page never has a hole: no event will later appear between `from` and the page's
    /// `next` position (on PostgreSQL, events of transactions still open are not returned until
    /// every earlier transaction has finished; see `docs/ordering.md`). A `from` past the head
    /// reads an empty page whose `next` is `from`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a `limit` of 0;
    /// [`Error::Unreadable`](crate::Error::Unreadable) when the first event to return cannot be
    /// decoded (a page stops before such an event, so the next read starts at it);
    /// [`Error::Closed`](crate::Error::Closed), [`Error::Backend`](crate::Error::Backend).
    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> Result<Page>;

    /// The event with id `id`, wherever it is (`None` if no event has it).
    ///
    /// # Errors
    /// [`Error::Unreadable`](crate::Error::Unreadable) if it cannot be decoded;
    /// [`Error::Closed`](crate::Error::Closed), [`Error::Backend`](crate::Error::Backend).
    async fn read_event(&self, id: uuid::Uuid) -> Result<Option<RecordedEvent>>;

    /// The position of the last event visible in the global order ([`Position::START`] if the
    /// store is empty).
    async fn head(&self) -> Result<Position>;

    /// How many events after `after`, up to and including `up_to`, match `filter`: how far a
    /// reader at `after` is behind.
    ///
    /// The provided implementation pages through the events; backends count in the database.
    async fn count(&self, after: Position, up_to: Position, filter: &Filter) -> Result<u64> {
        let mut count = 0;
        let mut from = after;
        while from < up_to {
            let page = self.read_all_page(from, filter, DEFAULT_PAGE_SIZE).await?;
            count += page.events.iter().filter(|e| e.position <= up_to).count() as u64;
            if page.events.is_empty() || page.next <= from {
                break;
            }
            from = page.next;
        }
        Ok(count)
    }

    /// The stream's current version (`None` if it does not exist).
    async fn stream_version(&self, stream: &StreamName) -> Result<Option<u64>> {
        let last = self.read_stream_page(stream, Direction::Backwards, u64::MAX, 1).await?;
        Ok(last.first().map(|e| e.version))
    }

    /// The latest snapshot stored for `stream` (`None` if there is none, or the store does not
    /// keep snapshots).
    async fn load_snapshot(&self, _stream: &StreamName) -> Result<Option<Snapshot>> {
        Ok(None)
    }

    /// What loading an aggregate reads: the latest snapshot of `stream` if it has
    /// `schema_version` (`None` otherwise), and the first `limit` events after it (from version
    /// 0 without one), in one round trip on PostgreSQL and SQLite.
    ///
    /// The provided implementation calls [`load_snapshot`](Self::load_snapshot), then
    /// [`read_stream_page`](Self::read_stream_page) from the version after the snapshot's.
    /// Either way the events are exactly the ones that follow the snapshot: a snapshot is only
    /// ever replaced by one at a later version, and events never change.
    ///
    /// # Errors
    /// As [`load_snapshot`](Self::load_snapshot) for a stored snapshot that cannot be read
    /// ([`Error::Corrupt`](crate::Error::Corrupt)) and as
    /// [`read_stream_page`](Self::read_stream_page) for the events: then read them apart to
    /// learn which one is damaged.
    ///
    /// ```
    /// # use annal_eventstore::{EventStore, ExpectedVersion, MemoryEventStore, NewEvent, Snapshot, StreamName};
    /// # use serde_json::json;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> annal_eventstore::Result<()> {
    /// let store = MemoryEventStore::new();
    /// let stream = StreamName::new("counter-1")?;
    /// let events = (0..5).map(|n| NewEvent::new("Added", json!(n))).collect();
    /// store.append_with_snapshot(&stream, ExpectedVersion::NoStream, events, &Snapshot::new(4, 1, json!(10))).await?;
    /// store.append(&stream, ExpectedVersion::Exact(4), vec![NewEvent::new("Added", json!(5))]).await?;
    ///
    /// let (snapshot, after) = store.load_snapshot_and_events(&stream, 1, 100).await?;
    /// assert_eq!(snapshot.map(|s| s.version), Some(4));
    /// assert_eq!(after.iter().map(|e| e.version).collect::<Vec<_>>(), [5]);
    ///
    /// // A snapshot of another schema version is not used: every event follows.
    /// let (snapshot, after) = store.load_snapshot_and_events(&stream, 2, 100).await?;
    /// assert_eq!((snapshot, after.len()), (None, 6));
    /// # Ok(())
    /// # }
    /// ```
    async fn load_snapshot_and_events(
        &self,
        stream: &StreamName,
        schema_version: u32,
        limit: usize,
    ) -> Result<(Option<Snapshot>, Vec<RecordedEvent>)> {
        check_limit(limit)?;
        let snapshot = self.load_snapshot(stream).await?.filter(|s| s.schema_version == schema_version);
        let Some(from) = snapshot.as_ref().map_or(Some(0), |s| s.version.checked_add(1)) else {
            return Ok((snapshot, Vec::new()));
        };
        let events = self.read_stream_page(stream, Direction::Forwards, from, limit).await?;
        Ok((snapshot, events))
    }

    /// Stores a snapshot of `stream`, replacing an older one (one at a lower version, or of
    /// another schema version). A store that does not keep snapshots ignores it.
    async fn save_snapshot(&self, _stream: &StreamName, _snapshot: &Snapshot) -> Result<()> {
        Ok(())
    }

    /// Appends `events` as [`append`](Self::append) does and stores `snapshot` as
    /// [`save_snapshot`](Self::save_snapshot) does, in the same commit on the SQL backends and
    /// the memory store: the snapshot is written exactly when the events are, so it never
    /// describes a version the stream does not have. An idempotent retry returns the original
    /// result and writes nothing. This is how [`Repository`](crate::Repository) writes its
    /// snapshots: a command that takes one costs no second round trip or commit.
    ///
    /// `snapshot.version` must be the version the append ends at, so `expected` must be
    /// [`Exact`](ExpectedVersion::Exact) or [`NoStream`](ExpectedVersion::NoStream).
    ///
    /// The default (for stores that do not override it) appends, then saves the snapshot: a
    /// failure to save it is logged, not returned, since the events are committed.
    ///
    /// # Errors
    /// As [`append`](Self::append), and [`Error::InvalidArgument`](crate::Error::InvalidArgument)
    /// for a snapshot that is not at the version the append ends at, an expectation without a
    /// version, or a state that [`save_snapshot`](Self::save_snapshot) refuses: then nothing is
    /// written.
    ///
    /// ```
    /// use annal_eventstore::{EventStore, ExpectedVersion, MemoryEventStore, NewEvent, Snapshot, StreamName};
    /// use serde_json::json;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> annal_eventstore::Result<()> {
    /// let store = MemoryEventStore::new();
    /// let stream = StreamName::new("counter-1")?;
    /// let events = vec![NewEvent::new("Added", json!(2)), NewEvent::new("Added", json!(3))];
    /// // Two events after version 4 end at version 6; the state after them is 5.
    /// store.append(&stream, ExpectedVersion::Any, (0..5).map(|_| NewEvent::new("Added", json!(0))).collect()).await?;
    /// let snapshot = Snapshot::new(6, 1, json!({ "total": 5 }));
    /// store.append_with_snapshot(&stream, ExpectedVersion::Exact(4), events, &snapshot).await?;
    /// assert_eq!(store.load_snapshot(&stream).await?, Some(snapshot));
    /// # Ok(())
    /// # }
    /// ```
    async fn append_with_snapshot(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: &Snapshot,
    ) -> Result<AppendResult> {
        crate::append::check_snapshot_with_append(expected, events.len(), snapshot)?;
        let result = self.append(stream, expected, events).await?;
        if !result.already_written
            && let Err(error) = self.save_snapshot(stream, snapshot).await
        {
            tracing::warn!(%stream, version = snapshot.version, %error, "appended, but could not write a snapshot");
        }
        Ok(result)
    }

    /// A wake-up that fires (coalesced) after events may have been committed, so subscribers
    /// poll at once instead of waiting for their poll interval.
    fn wakeup(&self) -> Wakeup;

    /// Reads one stream as a stream of events, fetching a page at a time.
    ///
    /// An event that cannot be decoded is yielded as [`Error::Unreadable`](crate::Error::Unreadable)
    /// in its place, and the read goes on after it; any other error ends the read.
    fn read_stream<'a>(&'a self, stream: &'a StreamName, read: ReadStream) -> BoxStream<'a, Result<RecordedEvent>> {
        let from = read.from.unwrap_or(match read.direction {
            Direction::Forwards => 0,
            Direction::Backwards => u64::MAX,
        });
        let after = move |version: u64| match read.direction {
            Direction::Forwards => version.checked_add(1),
            Direction::Backwards => version.checked_sub(1),
        };
        let start = match read.limit.map_or(Ok(()), check_limit) {
            Ok(()) => Some((from, read.limit.unwrap_or(usize::MAX))),
            Err(error) => return stream::once(async { Err(error) }).boxed(),
        };
        // The state: where to read next, how many events may still be returned, and whether
        // the last page held an unreadable event (then pages of one event pass it).
        stream::unfold(start.map(|(from, remaining)| (from, remaining, false)), move |state| async move {
            let (from, remaining, careful) = state.filter(|(_, remaining, _)| *remaining > 0)?;
            let want = if careful { 1 } else { remaining.min(read.page_size) };
            let (items, next) = match self.read_stream_page(stream, read.direction, from, want).await {
                Ok(page) => {
                    let next = if page.len() < want { None } else { page.last().and_then(|e| after(e.version)) };
                    let remaining = remaining - page.len();
                    (page.into_iter().map(Ok).collect(), next.map(|next| (next, remaining, careful)))
                }
                // Not at `from`: the page had good events before it. Read them one by one.
                Err(crate::Error::Unreadable(bad)) if bad.version != from && !careful => {
                    (vec![], Some((from, remaining, true)))
                }
                // At `from`: reported in its place, and the read goes on after it. (Read alone
                // but stored with a version that cannot be read: reported, and the read ends.)
                Err(crate::Error::Unreadable(bad)) => {
                    let next = after(from).filter(|_| bad.version == from).map(|next| (next, remaining - 1, false));
                    (vec![Err(crate::Error::Unreadable(bad))], next)
                }
                Err(error) => (vec![Err(error)], None),
            };
            Some((stream::iter(items), next))
        })
        .flatten()
        .boxed()
    }

    /// Reads the global log after `from`, filtered, up to the head as it was when the read began.
    ///
    /// An event that cannot be decoded is yielded as [`Error::Unreadable`](crate::Error::Unreadable)
    /// in its place, and the read goes on after it; any other error ends the read.
    fn read_all<'a>(&'a self, from: Position, filter: Filter) -> BoxStream<'a, Result<RecordedEvent>> {
        stream::unfold(Some((from, None::<Position>)), move |state| {
            let filter = filter.clone();
            async move {
                let (from, head) = state?;
                let head = match head {
                    Some(head) => head,
                    None => match self.head().await {
                        Ok(head) => head,
                        Err(error) => return Some((stream::iter(vec![Err(error)]), None)),
                    },
                };
                if from >= head {
                    return None;
                }
                let (items, next) = match self.read_all_page(from, &filter, DEFAULT_PAGE_SIZE).await {
                    Ok(page) => {
                        let done = page.events.is_empty() || page.next >= head;
                        let items = page.events.into_iter().filter(|e| e.position <= head).map(Ok).collect();
                        (items, (!done).then_some((page.next, Some(head))))
                    }
                    Err(crate::Error::Unreadable(bad)) => {
                        let next = (bad.position, Some(head));
                        let items =
                            if bad.position <= head { vec![Err(crate::Error::Unreadable(bad))] } else { vec![] };
                        (items, Some(next))
                    }
                    Err(error) => (vec![Err(error)], None),
                };
                Some((stream::iter(items), next))
            }
        })
        .flatten()
        .boxed()
    }

    /// Follows the global log: every event after `from` that matches `filter`, in global order,
    /// first catching up in pages and then live, forever.
    ///
    /// Pull-based: a page is fetched only when the consumer has taken the previous one, so a
    /// slow consumer slows its own subscription and nothing else. Between pages it waits for a
    /// [wake-up](EventStore::wakeup) or its poll interval. Errors are yielded as items and the
    /// subscription carries on after a back-off; [`Error::Closed`](crate::Error::Closed) ends it.
    /// An event that cannot be decoded is yielded as [`Error::Unreadable`](crate::Error::Unreadable)
    /// in its place, and the subscription goes on with the next event at once.
    fn subscribe<'a>(&'a self, from: Position, filter: Filter) -> BoxStream<'a, Result<RecordedEvent>> {
        self.subscribe_with(from, filter, SubscriptionOptions::default())
    }

    /// [`EventStore::subscribe`] with explicit page size and intervals.
    fn subscribe_with<'a>(
        &'a self,
        from: Position,
        filter: Filter,
        options: SubscriptionOptions,
    ) -> BoxStream<'a, Result<RecordedEvent>> {
        subscription::follow(self, from, filter, options)
    }
}
