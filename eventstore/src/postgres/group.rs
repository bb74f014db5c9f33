//! Group commit: concurrent appends to different streams share one transaction and one commit.
//!
//! A durable commit waits for a WAL flush; with many writers that flush, not the statement, is
//! what an append costs. Appends queued while a commit is in flight are committed together by one
//! multi-stream `INSERT`, so they pay for one flush between them (figures in
//! `docs/benchmarks.md`, the rule in `docs/ordering.md`, "Group commit").
//!
//! Natural batching, no timer: at most `max_in_flight` commits run at once (by default
//! [`DEFAULT_IN_FLIGHT`], or half the pool's connections if fewer). An append that finds a free slot runs alone at once, exactly as without
//! grouping, so a lone writer never waits, and up to `max_in_flight` concurrent writers commit
//! side by side, their WAL flushes merged by the server as before. An append that finds every
//! slot busy (more writers than that, which would otherwise queue for a connection) queues; when a slot frees, what queued (up to `max_members`
//! appends and [`MAX_GROUP_EVENTS`] events) is committed as one group, in a task that holds the
//! slot. The wait is bounded by the commit in flight, never by a clock.
//!
//! Each member keeps its own result. The statement checks each member's expectation with the
//! guards of the single-stream append; a member whose guard fails inserts nothing while the
//! others commit, and is then appended alone, which tells it what happened (a conflict, a race
//! to retry, a stale transaction). When the statement fails (a unique key: a conflict, an
//! idempotent retry or a duplicate id; bad data; a lost connection), nothing of the group was
//! written and every member is appended alone, so each gets exactly the result it would have got
//! without grouping; an idempotent retry gets its original result. Only one member per stream
//! joins the statement (two would race each other for the same versions); the others are
//! appended alone after it.
//!
//! Tasks: a group's task ends when its members are answered; there are at most `max_in_flight`,
//! each owned by the members waiting on its answer. If the store is closed they fail at once
//! with [`Error::Closed`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;

use super::{append_on, position};
use crate::convert::{to_i64, to_u64};
use crate::event::EncodedEvent;
use crate::filter::stream_hash;
use crate::{AppendResult, Error, ExpectedVersion, Position, Result, StreamName};

/// A group stops taking members once it holds this many events (its first member may hold
/// more), so a small append never waits behind a huge statement of others' events.
const MAX_GROUP_EVENTS: usize = 1000;

/// Commits in flight by default (fewer if half the pool is fewer): on the 2-core machine of the
/// benchmarks four concurrent commits already keep it busy, so writers beyond four
/// share commits instead of queueing for a connection (`docs/benchmarks.md`, "One-event appends
/// without arrays, a cheaper wake-up, group commit on by default").
const DEFAULT_IN_FLIGHT: usize = 4;

/// How [`PgEventStore`](super::PgEventStore) groups concurrent appends into shared commits; see
/// [`PgEventStore::with_group_commit`](super::PgEventStore::with_group_commit).
///
/// ```
/// use annal_eventstore::GroupCommit;
///
/// let grouping = GroupCommit::new(32, 2)?;
/// assert_eq!((grouping.max_members(), grouping.max_in_flight()), (32, Some(2)));
/// assert!(GroupCommit::new(0, 2).is_err());
/// assert_eq!(GroupCommit::default().max_in_flight(), None); // half the pool
/// # Ok::<(), annal_eventstore::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCommit {
    max_members: usize,
    max_in_flight: Option<usize>,
}

impl GroupCommit {
    /// Groups of at most `max_members` appends, and at most `max_in_flight` commits (groups or
    /// appends alone) running at once.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if either is 0.
    pub fn new(max_members: usize, max_in_flight: usize) -> Result<Self> {
        if max_members == 0 || max_in_flight == 0 {
            return Err(Error::InvalidArgument { reason: "group commit needs at least one member and one commit" });
        }
        Ok(GroupCommit { max_members, max_in_flight: Some(max_in_flight) })
    }

    /// The most appends one group commits.
    pub fn max_members(&self) -> usize {
        self.max_members
    }

    /// The most commits running at once before appends queue for a group; `None`: 4, or half
    /// the store's pool connections if that is fewer (at least 1).
    pub fn max_in_flight(&self) -> Option<usize> {
        self.max_in_flight
    }
}

impl Default for GroupCommit {
    /// 64 members; 4 commits in flight, or half the pool's connections if fewer, leaving the
    /// rest to reads. What [`PgEventStore`](super::PgEventStore) uses unless told otherwise
    /// ([`PgEventStore::with_group_commit`](super::PgEventStore::with_group_commit)).
    fn default() -> Self {
        GroupCommit { max_members: 64, max_in_flight: None }
    }
}

/// The appends of one store (and its clones) that are waiting for, or holding, a commit slot.
pub(super) struct Groups {
    pool: PgPool,
    config: Option<GroupCommit>,
    /// `config`'s `max_in_flight`, resolved against the pool.
    max_in_flight: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Member>,
    in_flight: usize,
}

struct Member {
    stream: StreamName,
    expected: ExpectedVersion,
    batch: Vec<EncodedEvent>,
    reply: oneshot::Sender<Result<AppendResult>>,
}

/// Whether an append runs now, alone, or waits for its group's answer.
enum Turn {
    Now(Vec<EncodedEvent>),
    Queued(oneshot::Receiver<Result<AppendResult>>),
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").field("config", &self.config).field("queued", &self.queued()).finish()
    }
}

/// A held commit slot; dropping it hands the slot to the queued appends, if any.
struct Slot(Arc<Groups>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Groups {
    /// Appends go through `config`'s groups, or each alone with `None`.
    pub(super) fn new(pool: PgPool, config: Option<GroupCommit>) -> Arc<Self> {
        let half_the_pool = (pool.options().get_max_connections() / 2).max(1) as usize;
        let max_in_flight = config.and_then(|c| c.max_in_flight).unwrap_or(DEFAULT_IN_FLIGHT.min(half_the_pool));
        Arc::new(Groups { pool, config, max_in_flight, state: Mutex::default() })
    }

    pub(super) fn config(&self) -> Option<GroupCommit> {
        self.config
    }

    /// Appends outside any caller's transaction: alone when a slot is free, else in a group.
    pub(super) async fn append(
        self: &Arc<Self>,
        stream: &StreamName,
        expected: ExpectedVersion,
        batch: Vec<EncodedEvent>,
    ) -> Result<AppendResult> {
        if self.config.is_none() {
            return alone(&self.pool, stream, expected, &batch).await;
        }
        let turn = {
            let mut state = self.lock();
            if state.in_flight < self.max_in_flight {
                state.in_flight += 1;
                Turn::Now(batch)
            } else {
                let (reply, answer) = oneshot::channel();
                state.queue.push_back(Member { stream: stream.clone(), expected, batch, reply });
                Turn::Queued(answer)
            }
        };
        let answer = match turn {
            Turn::Now(batch) => {
                let _slot = Slot(self.clone());
                return alone(&self.pool, stream, expected, &batch).await;
            }
            Turn::Queued(answer) => answer,
        };
        // The group's task ended without an answer: only when the runtime shuts down.
        answer.await.unwrap_or(Err(Error::Closed))
    }

    pub(super) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A commit ended: the queued appends, if any, take its slot as one group.
    fn release(self: &Arc<Self>) {
        let max_members = self.config.map_or(1, |c| c.max_members);
        let mut state = self.lock();
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !state.queue.is_empty() => runtime,
            other => {
                if other.is_err() {
                    // No runtime to commit on (it is shutting down): the waiters fail with `Closed`.
                    state.queue.clear();
                }
                state.in_flight -= 1;
                return;
            }
        };
        let mut members = Vec::new();
        let mut events = 0;
        while let Some(next) = state.queue.front() {
            if members.len() == max_members || (!members.is_empty() && events + next.batch.len() > MAX_GROUP_EVENTS) {
                break;
            }
            events += next.batch.len();
            members.extend(state.queue.pop_front());
        }
        drop(state);
        let slot = Slot(self.clone());
        runtime.spawn(async move {
            slot.0.commit(members).await;
            drop(slot);
        });
    }

    /// Commits `members` as one group, then appends alone those the group did not write.
    async fn commit(&self, mut members: Vec<Member>) {
        // A caller that gave up waiting gets nothing written, as if it had never called.
        members.retain(|m| !m.reply.is_closed());
        let mut streams = HashSet::new();
        let (mut group, later): (Vec<Member>, Vec<Member>) =
            members.into_iter().partition(|m| streams.insert(m.stream.clone()));
        // One order of streams for every group, so two groups never wait on each other's keys.
        group.sort_by(|a, b| a.stream.as_str().cmp(b.stream.as_str()));
        if group.len() > 1 {
            match insert_group(&self.pool, &group).await {
                Ok(mut written) => {
                    let mut rejected = Vec::new();
                    for (i, member) in group.into_iter().enumerate() {
                        match written.remove(&i) {
                            Some(rows) if rows.len() == member.batch.len() => {
                                let version = rows.last().map_or(0, |(v, _)| to_u64(*v));
                                let positions = rows.into_iter().map(|(_, p)| p).collect();
                                let _ = member.reply.send(Ok(AppendResult::new(version, positions)));
                            }
                            _ => rejected.push(member),
                        }
                    }
                    group = rejected;
                }
                Err(error) => {
                    tracing::debug!(%error, members = group.len(), "group append failed; appending its members alone");
                }
            }
        }
        for member in group.into_iter().chain(later) {
            let result = alone(&self.pool, &member.stream, member.expected, &member.batch).await;
            let _ = member.reply.send(result);
        }
    }
}

async fn alone(
    pool: &PgPool,
    stream: &StreamName,
    expected: ExpectedVersion,
    batch: &[EncodedEvent],
) -> Result<AppendResult> {
    let mut conn = pool.acquire().await?;
    append_on(&mut conn, false, stream, expected, batch, None).await
}

/// One statement appending every member's batch to its own stream, each behind its own guard:
/// the single-stream append's guards (`APPEND_EXACT`, `APPEND_AT_END` in `mod.rs`) per member.
/// A member whose guard fails inserts nothing; the others are written. Streams are distinct.
const APPEND_GROUP: &str = "\
    WITH m AS ( \
        SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[], $5::int8[]) \
            WITH ORDINALITY AS m(stream, category, base, must_exist, hash, i) \
    ), last AS ( \
        SELECT m.i, l.version, l.tx_id FROM m CROSS JOIN LATERAL \
            (SELECT version, tx_id FROM annal_events WHERE stream = m.stream ORDER BY version DESC LIMIT 1) l \
    ), ok AS ( \
        SELECT m.i, m.stream, m.category, m.hash, coalesce(m.base, last.version, -1) AS base \
        FROM m LEFT JOIN last ON last.i = m.i \
        WHERE CASE WHEN m.base IS NOT NULL THEN \
            m.base < 0 OR EXISTS (SELECT 1 FROM annal_events WHERE stream = m.stream AND version = m.base \
                AND tx_id <= pg_current_xact_id()::text::bigint) \
        ELSE \
            (NOT m.must_exist OR last.version IS NOT NULL) \
            AND (last.tx_id IS NULL OR last.tx_id <= pg_current_xact_id()::text::bigint) \
        END \
    ) \
    INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) \
    SELECT e.id, ok.stream, ok.category, ok.base + e.n, e.ty, e.sv, e.data::jsonb, e.meta::jsonb, ok.hash \
    FROM unnest($6::int8[], $7::int8[], $8::uuid[], $9::text[], $10::int4[], $11::text[], $12::text[]) \
        AS e(i, n, id, ty, sv, data, meta) \
    JOIN ok ON ok.i = e.i \
    ORDER BY e.i, e.n \
    RETURNING stream, version, tx_id, seq";

/// [`APPEND_GROUP`] for the common group, each member one event with an exact expectation (a
/// version, or no stream): one row per member, its guard the single-event append's
/// (`exact_guard!` in `mod.rs`), no stream's last event to look up and nothing to join.
const APPEND_GROUP_OF_ONES: &str = "\
    INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) \
    SELECT e.id, e.stream, e.category, e.base + 1, e.ty, e.sv, e.data::jsonb, e.meta::jsonb, e.hash \
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::uuid[], $6::text[], $7::int4[], $8::text[], $9::text[]) \
        WITH ORDINALITY AS e(stream, category, base, hash, id, ty, sv, data, meta, i) \
    WHERE e.base < 0 OR EXISTS (SELECT 1 FROM annal_events WHERE stream = e.stream AND version = e.base \
        AND tx_id <= pg_current_xact_id()::text::bigint) \
    ORDER BY e.i \
    RETURNING stream, version, tx_id, seq";

/// The exact version a member expects (-1: no stream), `None` for an append at the end.
fn base(m: &Member) -> Option<i64> {
    match m.expected {
        ExpectedVersion::Exact(v) => Some(to_i64(v)),
        ExpectedVersion::NoStream => Some(-1),
        ExpectedVersion::Any | ExpectedVersion::StreamExists => None,
    }
}

/// Writes the group; returns, by member index, the (version, position) of each event written,
/// in version order. Members missing from it wrote nothing.
async fn insert_group(pool: &PgPool, group: &[Member]) -> Result<HashMap<usize, Vec<(i64, Position)>>, sqlx::Error> {
    let streams = group.iter().map(|m| m.stream.as_str()).collect::<Vec<_>>();
    let categories = group.iter().map(|m| m.stream.category()).collect::<Vec<_>>();
    let hashes = group.iter().map(|m| i64::from(stream_hash(&m.stream))).collect::<Vec<_>>();
    let ones = group.iter().map(|m| match (base(m), m.batch.as_slice()) {
        (Some(base), [event]) => Some((base, event)),
        _ => None,
    });
    let query = match ones.collect::<Option<Vec<_>>>() {
        Some(ones) => sqlx::query(APPEND_GROUP_OF_ONES)
            .bind(streams)
            .bind(categories)
            .bind(ones.iter().map(|(base, _)| *base).collect::<Vec<_>>())
            .bind(hashes)
            .bind(ones.iter().map(|(_, e)| e.event.id).collect::<Vec<_>>())
            .bind(ones.iter().map(|(_, e)| e.event.event_type.as_str()).collect::<Vec<_>>())
            .bind(ones.iter().map(|(_, e)| e.event.schema_version as i32).collect::<Vec<_>>())
            .bind(ones.iter().map(|(_, e)| e.data.as_str()).collect::<Vec<_>>())
            .bind(ones.iter().map(|(_, e)| e.metadata.as_str()).collect::<Vec<_>>()),
        None => {
            let events =
                group.iter().enumerate().flat_map(|(i, m)| m.batch.iter().enumerate().map(move |(n, e)| (i, n, e)));
            let (mut member, mut number, mut ids, mut types, mut schemas, mut data, mut metadata) =
                (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
            for (i, n, e) in events {
                member.push(i as i64 + 1);
                number.push(n as i64 + 1);
                ids.push(e.event.id);
                types.push(e.event.event_type.as_str());
                schemas.push(e.event.schema_version as i32);
                data.push(e.data.as_str());
                metadata.push(e.metadata.as_str());
            }
            sqlx::query(APPEND_GROUP)
                .bind(streams)
                .bind(categories)
                .bind(group.iter().map(base).collect::<Vec<_>>())
                .bind(group.iter().map(|m| m.expected == ExpectedVersion::StreamExists).collect::<Vec<_>>())
                .bind(hashes)
                .bind(member)
                .bind(number)
                .bind(ids)
                .bind(types)
                .bind(schemas)
                .bind(data)
                .bind(metadata)
        }
    };
    let rows = query.fetch_all(pool).await?;
    let index: HashMap<&str, usize> = group.iter().enumerate().map(|(i, m)| (m.stream.as_str(), i)).collect();
    let mut written: HashMap<usize, Vec<(i64, Position)>> = HashMap::new();
    for row in &rows {
        let stream: &str = row.try_get(0)?;
        let i = *index.get(stream).ok_or_else(|| sqlx::Error::Protocol("a row of a stream not in the group".into()))?;
        written.entry(i).or_default().push((row.try_get(1)?, position(row.try_get(2)?, row.try_get(3)?)));
    }
    for rows in written.values_mut() {
        rows.sort_unstable_by_key(|(version, _)| *version);
    }
    Ok(written)
}
