//! The PostgreSQL backend, for production.

mod group;
mod notify;
mod predicate;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::append::{Written, resolve_written};
use crate::convert::{to_i64, to_u64};
use crate::event::{
    DEFAULT_MAX_EVENT_SIZE, EncodedEvent, StoredEvent, decode_json, decode_rows, encode_batch, encode_snapshot,
};
use crate::filter::stream_hash;
use crate::store::check_limit;
use crate::subscription::{Notifier, Wakeup};
use crate::{
    AppendResult, Direction, Error, EventStore, ExpectedVersion, Filter, NewEvent, Page, Position, RecordedEvent,
    Result, Snapshot, StreamName,
};

pub use group::GroupCommit;
use group::Groups;
use notify::Announcer;

/// How often an append retries when a concurrent writer takes the version it computed while
/// its expectation still holds (`Any`, `StreamExists`).
const APPEND_RETRIES: usize = 50;

/// An event store in PostgreSQL (13 or later), for production.
///
/// Appends are one statement each, with the optimistic-concurrency check and idempotency done
/// by unique keys, so writers never wait on each other (no table lock, no advisory lock, no
/// `$all` row). The global order is made gap-free by transaction ids: see `docs/ordering.md`,
/// including what a long-running transaction does to subscribers.
///
/// Subscribers in this process are woken directly after an append; other processes are woken
/// by one coalesced `NOTIFY` per process, sent after commit outside the append's transaction.
///
/// Concurrent appends to different streams share commits when more than a few are in flight
/// ([`GroupCommit`], on by default; see [`with_group_commit`](PgEventStore::with_group_commit)).
///
/// Cloning is cheap; clones share the pool and the background tasks, which stop when the last
/// clone is dropped.
///
/// ```no_run
/// use annal_eventstore::PgEventStore;
///
/// # async fn example() -> annal_eventstore::Result<()> {
/// let store = PgEventStore::connect("postgres://localhost/app").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgEventStore {
    pool: PgPool,
    notifier: Notifier,
    announcer: Arc<Announcer>,
    groups: Arc<Groups>,
    max_event_size: usize,
}

impl PgEventStore {
    /// Connects to the database at `url` (a pool of 10 connections) and brings the schema up to
    /// date.
    ///
    /// The pool does not test a connection before handing it out (sqlx's default does, one
    /// round trip per acquire): sqlx already tests each connection when it is released, closing
    /// a broken one, and a connection that breaks in between fails that one call with
    /// [`Error::Backend`], as it would after the test anyway.
    ///
    /// # Errors
    /// [`Error::Backend`] if the database cannot be reached or migrated.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::from_pool(PgPoolOptions::new().max_connections(10).test_before_acquire(false).connect(url).await?).await
    }

    /// Uses an existing pool, bringing the schema up to date first. The tables are created in
    /// the first schema of the connections' `search_path`.
    ///
    /// # Errors
    /// [`Error::Backend`] if the database cannot be migrated; [`Error::Corrupt`] if the stored
    /// transaction ids are ahead of the server's (a restore into a new cluster, see
    /// `docs/ordering.md`).
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        Self::migrate(&pool).await?;
        check_transaction_ids(&pool).await?;
        Ok(PgEventStore::without_migrating(pool))
    }

    /// Uses an existing pool on a database whose schema is already up to date, without
    /// migrating or writing anything: for tools that only read (a role with `SELECT` rights
    /// alone can use it). Appends work only if the role may write.
    ///
    /// # Errors
    /// [`Error::NotMigrated`] if the store's migrations are not all applied (run
    /// [`PgEventStore::from_pool`] or `annal-runner migrate` first); [`Error::Corrupt`] as
    /// [`PgEventStore::from_pool`]; [`Error::Backend`] if the database cannot be read.
    pub async fn from_migrated_pool(pool: PgPool) -> Result<Self> {
        let store = PgEventStore::without_migrating(pool);
        store.check_migrated(&migrator()).await?;
        check_transaction_ids(&store.pool).await?;
        Ok(store)
    }

    fn without_migrating(pool: PgPool) -> Self {
        let notifier = Notifier::new();
        let announcer = Arc::new(Announcer::start(pool.clone(), notifier.clone()));
        let groups = Groups::new(pool.clone(), Some(GroupCommit::default()));
        PgEventStore { pool, notifier, announcer, groups, max_event_size: DEFAULT_MAX_EVENT_SIZE }
    }

    /// Checks, without writing, that every migration of `migrator` (the store's, a projection
    /// store's) is applied to this database.
    ///
    /// # Errors
    /// [`Error::NotMigrated`] naming the versions that are not; [`Error::Backend`] if the
    /// database cannot be read.
    pub async fn check_migrated(&self, migrator: &sqlx::migrate::Migrator) -> Result<()> {
        let history: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(migrator.table_name.as_ref())
            .fetch_one(&self.pool)
            .await?;
        let applied: Vec<i64> = if history {
            sqlx::query_scalar(sqlx::AssertSqlSafe(crate::schema::applied_sql(migrator))).fetch_all(&self.pool).await?
        } else {
            Vec::new()
        };
        crate::schema::require(migrator, &applied)
    }

    /// Creates or upgrades the store's tables. Safe to run concurrently and repeatedly.
    ///
    /// # Errors
    /// [`Error::Backend`] if a migration fails.
    pub async fn migrate(pool: &PgPool) -> Result<()> {
        migrator().run(pool).await.map_err(Error::backend)?;
        hash_old_streams(pool).await
    }

    /// Sets the limit on one event's encoded size (default 1 MiB).
    pub fn with_max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes;
        self
    }

    /// How concurrent appends share commits: `Some` (the default, [`GroupCommit::default`])
    /// groups them once more than `max_in_flight` are running, `None` commits each append alone.
    ///
    /// On by default since the group statement for single-event appends became one `INSERT`
    /// over one `unnest` and the default in-flight limit 4: on a 2-core machine that shares
    /// client and server, 16 single-event writers then did 1.07 and 1.27 of the same store
    /// without grouping (1.09 and 1.25 of raw single-row `INSERT`s), and 16 command tasks 1.09
    /// and 1.14 of the single-row ceiling, while 1 and 4 writers never queue and run as without
    /// it (`docs/benchmarks.md`, "One-event appends without arrays, a cheaper wake-up, group
    /// commit on by default"). Turn it off (`None`) to give every append its own commit at any
    /// concurrency.
    ///
    /// With grouping, an append that finds `max_in_flight` commits running waits for one of them
    /// to end and is then committed with every append that queued meanwhile, in one transaction:
    /// one commit for many appends. Each keeps its own expected-version check and its own result,
    /// exactly as alone (a conflict or a duplicate fails only its own append); see
    /// `docs/ordering.md`, "Group commit", for what bounds it. Appends in a [`PgTransaction`] are
    /// never grouped. Applies to this store and the clones made from it afterwards.
    ///
    /// ```no_run
    /// use annal_eventstore::{GroupCommit, PgEventStore};
    ///
    /// # async fn example() -> annal_eventstore::Result<()> {
    /// let store = PgEventStore::connect("postgres://localhost/app").await?;
    /// let alone = store.clone().with_group_commit(None);
    /// let wide = store.with_group_commit(Some(GroupCommit::new(128, 4)?));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_group_commit(mut self, grouping: Option<GroupCommit>) -> Self {
        self.groups = Groups::new(self.pool.clone(), grouping);
        self
    }

    /// The group-commit setting appends use now.
    pub fn group_commit(&self) -> Option<GroupCommit> {
        self.groups.config()
    }

    /// How many appends are waiting for a commit slot right now (always 0 without group commit):
    /// a gauge for monitoring.
    pub fn queued_appends(&self) -> usize {
        self.groups.queued()
    }

    /// Whether appends wake subscribers in other processes with a `NOTIFY` (default on).
    ///
    /// Turn it off in a process whose appends nobody elsewhere follows live, or who is content
    /// with their poll interval; subscribers in this process are woken either way, and this
    /// process still hears other processes' notifications. Applies to every clone.
    pub fn notify_other_processes(self, on: bool) -> Self {
        self.announcer.set_enabled(on);
        self
    }

    /// The connection pool, for the application's own queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Starts a transaction in which appends and the caller's own statements commit or roll
    /// back together (an outbox, a read model updated with the events that caused it).
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::Backend`].
    pub async fn begin(&self) -> Result<PgTransaction<'_>> {
        Ok(PgTransaction { store: self, tx: self.pool.begin().await?, appended_up_to: Position::START })
    }

    /// Closes the pool; every later call fails with [`Error::Closed`].
    pub async fn close(&self) {
        self.announcer.stop();
        self.pool.close().await;
    }

    /// The oldest transaction in the cluster that holds a transaction id, if any: the one that
    /// decides how far subscribers can read (see `docs/ordering.md`). An operator whose
    /// subscribers stall looks here first; alert when its age grows.
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::Backend`].
    pub async fn oldest_open_transaction(&self) -> Result<Option<OpenTransaction>> {
        let row: Option<(i32, i64, Option<f64>, Option<String>)> = sqlx::query_as(
            "SELECT pid, backend_xid::text::bigint, extract(epoch FROM clock_timestamp() - xact_start)::float8, state \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
             ORDER BY age(backend_xid) DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(pid, transaction_id, age, state)| OpenTransaction {
            pid,
            transaction_id: to_u64(transaction_id),
            age: std::time::Duration::from_secs_f64(age.unwrap_or_default().max(0.0)),
            state: state.unwrap_or_default(),
        }))
    }

    /// Wakes subscribers here and, through the announcer, in other processes, for events
    /// committed up to `up_to` (`Position::START` when a transaction appended nothing: its end
    /// may still make others' events visible).
    fn committed(&self, up_to: Position) {
        self.notifier.notify_up_to(up_to);
        self.announcer.announce(up_to);
    }
}

/// A transaction holding a transaction id, as [`PgEventStore::oldest_open_transaction`] reports
/// it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct OpenTransaction {
    /// The server process running it (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// Its transaction id; events of later transactions wait for it to end.
    pub transaction_id: u64,
    /// How long it has been open.
    pub age: std::time::Duration,
    /// Its session state, such as `active` or `idle in transaction`.
    pub state: String,
}

/// A PostgreSQL transaction that can append events; see [`PgEventStore::begin`].
///
/// Dropping it without [`commit`](PgTransaction::commit) rolls it back. While it is open, the
/// events it appended are invisible to readers, and so are events of transactions that started
/// after it (the global order never skips one); keep it short.
#[derive(Debug)]
pub struct PgTransaction<'s> {
    store: &'s PgEventStore,
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The furthest position appended, announced to subscribers on commit.
    appended_up_to: Position,
}

impl PgTransaction<'_> {
    /// Appends as [`EventStore::append`] does, inside this transaction. A failed append (a
    /// conflict, for example) is rolled back to before it and leaves the transaction usable.
    ///
    /// # Errors
    /// As [`EventStore::append`].
    pub async fn append(
        &mut self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        crate::metrics::append("postgres", stream, events.len(), async {
            let encoded = encode_batch(events, self.store.max_event_size)?;
            let result = append_on(&mut self.tx, true, stream, expected, &encoded, None).await?;
            self.appended_up_to = self.appended_up_to.max(result.position());
            Ok(result)
        })
        .await
    }

    /// The connection, for the caller's own statements in this transaction.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits, then wakes subscribers.
    ///
    /// # Errors
    /// [`Error::Backend`] if the commit fails (nothing was written).
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        self.store.committed(self.appended_up_to);
        Ok(())
    }

    /// Rolls back everything done in the transaction.
    ///
    /// # Errors
    /// [`Error::Backend`] if the connection failed (the server rolls back anyway).
    pub async fn rollback(self) -> Result<()> {
        Ok(self.tx.rollback().await?)
    }
}

/// The embedded migrations, in a history table of our own, so the store's migrations never mix
/// with the application's sqlx migrations in the same database.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.dangerous_set_table_name("annal_migrations");
    migrator
}

async fn check_transaction_ids(pool: &PgPool) -> Result<()> {
    let ahead: bool = sqlx::query_scalar(
        "SELECT coalesce(max(tx_id), 0) >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint FROM annal_events",
    )
    .fetch_one(pool)
    .await?;
    if ahead {
        return Err(Error::Corrupt {
            location: "annal_events.tx_id".into(),
            reason: "stored transaction ids are ahead of the server's, as after a restore into a new cluster; \
                     appending now would break the global order. Advance the server's transaction id epoch \
                     (docs/ordering.md) before using this store."
                .into(),
        });
    }
    Ok(())
}

/// Stores the snapshot `$rows` gives (stream, version, schema version, state) unless the stream
/// has one at a later version of the same schema.
macro_rules! save_snapshot {
    ($rows:literal) => {
        concat!(
            "INSERT INTO annal_snapshots (stream, version, schema_version, state) ",
            $rows,
            " ON CONFLICT (stream) DO UPDATE SET version = excluded.version, schema_version = excluded.schema_version, \
             state = excluded.state, recorded_at = excluded.recorded_at \
             WHERE annal_snapshots.version < excluded.version OR annal_snapshots.schema_version <> excluded.schema_version"
        )
    };
}

/// The columns every append writes, in the order its `SELECT` gives them.
macro_rules! insert_events {
    () => {
        "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) "
    };
}

/// A batch's events: the arrays `$3` to `$7` (ids, types, schema versions, data, metadata)
/// as rows `e`, numbered `e.n` from 1.
macro_rules! batch_rows {
    () => {
        " FROM unnest($3::uuid[], $4::text[], $5::int4[], $6::text[], $7::text[]) WITH ORDINALITY AS e(id, ty, sv, data, meta, n) "
    };
}

/// The guard of an exact expectation, `$8` the version expected (-1 for no stream).
macro_rules! exact_guard {
    () => {
        "WHERE $8 < 0 OR EXISTS (SELECT 1 FROM annal_events WHERE stream = $1 AND version = $8 \
            AND tx_id <= pg_current_xact_id()::text::bigint) "
    };
}

/// The stream's last event and the guard of an expectation at the end (`$8`: it must exist).
macro_rules! last_event {
    () => {
        "WITH last AS (SELECT version, tx_id FROM annal_events WHERE stream = $1 ORDER BY version DESC LIMIT 1) "
    };
}
macro_rules! at_end_guard {
    () => {
        "WHERE (NOT $8 OR EXISTS (SELECT 1 FROM last)) \
            AND NOT EXISTS (SELECT 1 FROM last WHERE tx_id > pg_current_xact_id()::text::bigint) "
    };
}

/// The append statement for each expectation. Versions are `base + n`, where `n` counts the
/// batch from 1; the guards make a statement insert nothing when the expectation fails in a way
/// no unique key catches (the stream is shorter than expected, or missing), and when the stream's
/// last event was written by a transaction younger than this one: its events would sort before
/// that event in the global order (see `docs/ordering.md`, "Per-stream order").
macro_rules! append_exact {
    () => {
        concat!(
            insert_events!(),
            "SELECT e.id, $1, $2, $8 + e.n, e.ty, e.sv, e.data::jsonb, e.meta::jsonb, $9",
            batch_rows!(),
            exact_guard!(),
            "ORDER BY e.n RETURNING version, tx_id, seq"
        )
    };
}
const APPEND_EXACT: &str = append_exact!();

/// [`APPEND_EXACT`] and the snapshot at the version it ends at (`$10`, schema version `$11`,
/// state `$12`), stored only when the events are, by the same statement.
const APPEND_EXACT_WITH_SNAPSHOT: &str = concat!(
    "WITH appended AS (",
    append_exact!(),
    "), snapshot AS (",
    save_snapshot!("SELECT $1, $10, $11, $12::jsonb WHERE EXISTS (SELECT 1 FROM appended)"),
    ") SELECT version, tx_id, seq FROM appended"
);

const APPEND_AT_END: &str = concat!(
    last_event!(),
    insert_events!(),
    "SELECT e.id, $1, $2, coalesce((SELECT version FROM last), -1) + e.n, e.ty, e.sv, e.data::jsonb, e.meta::jsonb, $9",
    batch_rows!(),
    at_end_guard!(),
    "ORDER BY e.n RETURNING version, tx_id, seq"
);

/// The same statements for a single event, `$3` to `$7` its id, type, schema version, data and
/// metadata: no arrays to build, unnest, number and sort, which is most of what a one-event
/// append costs beyond a plain `INSERT` (`bench/pgbench/append-forms.sh`). The exact one takes
/// its row from a join with the event it expects (`$8`, at least 0), the guard of
/// `exact_guard!` without the sub-plan and its filter: 4% more appends at one writer
/// (`docs/benchmarks.md`, "The single-event guard as a join").
const APPEND_ONE_EXACT: &str = concat!(
    insert_events!(),
    "SELECT $3, $1, $2, $8 + 1, $4, $5, $6::jsonb, $7::jsonb, $9 FROM annal_events p \
     WHERE p.stream = $1 AND p.version = $8 AND p.tx_id <= pg_current_xact_id()::text::bigint ",
    "RETURNING version, tx_id, seq"
);
/// A single event expected to start its stream (`$8` is -1): no guard, the unique key on
/// `(stream, version)` rejects it when the stream has a first event.
const APPEND_ONE_FIRST: &str = concat!(
    insert_events!(),
    "SELECT $3, $1, $2, $8 + 1, $4, $5, $6::jsonb, $7::jsonb, $9 ",
    "RETURNING version, tx_id, seq"
);
const APPEND_ONE_AT_END: &str = concat!(
    last_event!(),
    insert_events!(),
    "SELECT $3, $1, $2, coalesce((SELECT version FROM last), -1) + 1, $4, $5, $6::jsonb, $7::jsonb, $9 ",
    at_end_guard!(),
    "RETURNING version, tx_id, seq"
);

/// Fills in the stream hash of events written before it was stored (migration 0003): one
/// read of the streams concerned through a partial index, then one update per chunk of streams.
async fn hash_old_streams(pool: &PgPool) -> Result<()> {
    let streams: Vec<String> = sqlx::query_scalar("SELECT DISTINCT stream FROM annal_events WHERE stream_hash IS NULL")
        .fetch_all(pool)
        .await?;
    for chunk in streams.chunks(1000) {
        let hashes =
            chunk.iter().map(|s| StreamName::new(s).map(|s| i64::from(stream_hash(&s)))).collect::<Result<Vec<_>>>()?;
        sqlx::query(
            "UPDATE annal_events e SET stream_hash = h.hash FROM unnest($1::text[], $2::int8[]) AS h(stream, hash) \
             WHERE e.stream = h.stream AND e.stream_hash IS NULL",
        )
        .bind(chunk)
        .bind(hashes)
        .execute(pool)
        .await?;
    }
    Ok(())
}

async fn try_insert(
    conn: &mut PgConnection,
    stream: &StreamName,
    expected: ExpectedVersion,
    batch: &[EncodedEvent],
    snapshot: Option<(&Snapshot, &str)>,
) -> Result<Vec<(i64, Position)>, sqlx::Error> {
    let single = match (batch, snapshot) {
        ([event], None) => Some(event),
        _ => None,
    };
    let (exact, at_end) = match (single, snapshot) {
        (Some(_), _) => (APPEND_ONE_EXACT, APPEND_ONE_AT_END),
        (None, Some(_)) => (APPEND_EXACT_WITH_SNAPSHOT, APPEND_AT_END),
        (None, None) => (APPEND_EXACT, APPEND_AT_END),
    };
    let (sql, base) = match expected {
        ExpectedVersion::Exact(v) => (exact, Some(to_i64(v))),
        ExpectedVersion::NoStream if single.is_some() => (APPEND_ONE_FIRST, Some(-1)),
        ExpectedVersion::NoStream => (exact, Some(-1)),
        // `check_snapshot_with_append` refuses a snapshot with these.
        ExpectedVersion::Any | ExpectedVersion::StreamExists => (at_end, None),
    };
    let query = sqlx::query(sql).bind(stream.as_str()).bind(stream.category());
    let query = match single {
        Some(e) => query
            .bind(e.event.id)
            .bind(e.event.event_type.as_str())
            .bind(e.event.schema_version as i32)
            .bind(e.data.as_str())
            .bind(e.metadata.as_str()),
        None => query
            .bind(batch.iter().map(|e| e.event.id).collect::<Vec<_>>())
            .bind(batch.iter().map(|e| e.event.event_type.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|e| e.event.schema_version as i32).collect::<Vec<_>>())
            .bind(batch.iter().map(|e| e.data.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|e| e.metadata.as_str()).collect::<Vec<_>>()),
    };
    let query = match base {
        Some(base) => query.bind(base),
        None => query.bind(expected == ExpectedVersion::StreamExists),
    };
    let mut query = query.bind(i64::from(stream_hash(stream)));
    if let Some((snapshot, state)) = snapshot {
        query = query.bind(to_i64(snapshot.version)).bind(snapshot.schema_version as i32).bind(state);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut rows = rows
        .iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)?, position(r.try_get(1)?, r.try_get(2)?))))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    rows.sort_unstable_by_key(|(version, _)| *version);
    Ok(rows)
}

/// Appends on `conn`: one statement on the fast path; the unique keys or the guards reject what
/// the expectation forbids, and only then is the store asked what happened.
async fn append_on(
    conn: &mut PgConnection,
    in_transaction: bool,
    stream: &StreamName,
    expected: ExpectedVersion,
    batch: &[EncodedEvent],
    snapshot: Option<(&Snapshot, &str)>,
) -> Result<AppendResult> {
    let mut actual = None;
    for _ in 0..APPEND_RETRIES {
        let attempt = if in_transaction {
            // A savepoint keeps the caller's transaction usable after a rejected append.
            let mut savepoint = conn.begin().await?;
            let attempt = try_insert(&mut savepoint, stream, expected, batch, snapshot).await;
            if attempt.is_ok() {
                savepoint.commit().await?;
            } else {
                savepoint.rollback().await?;
            }
            attempt
        } else {
            try_insert(conn, stream, expected, batch, snapshot).await
        };
        match attempt {
            Ok(rows) if rows.len() == batch.len() => {
                let version = rows.last().map_or(0, |(v, _)| to_u64(*v));
                return Ok(AppendResult::new(version, rows.into_iter().map(|(_, p)| p).collect()));
            }
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {}
            Err(e) => return Err(e.into()),
        }
        // Rejected: an idempotent retry, a duplicate, a version conflict, a transaction older
        // than the stream's last writer, or a race lost to a concurrent writer.
        let ids: Vec<Uuid> = batch.iter().map(|e| e.event.id).collect();
        if let Some(original) = resolve_written(stream, expected, &ids, written(conn, &ids).await?)? {
            return Ok(original);
        }
        let last = last_event(conn, stream).await?;
        actual = last.map(|(version, _)| version);
        if in_transaction && last.is_some_and(|(_, younger_writer)| younger_writer) {
            return Err(Error::StaleTransaction { stream: stream.clone() });
        }
        if !expected.is_satisfied_by(actual) {
            return Err(Error::Conflict { stream: stream.clone(), expected, actual });
        }
        // The expectation holds now: a concurrent writer took the version this attempt
        // computed (`Any`, `StreamExists`), or committed the one it expected. Try again.
    }
    Err(Error::Conflict { stream: stream.clone(), expected, actual })
}

async fn written(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Written>> {
    let rows = sqlx::query("SELECT event_id, stream, version, tx_id, seq FROM annal_events WHERE event_id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Written {
                id: r.try_get(0)?,
                stream: r.try_get(1)?,
                version: to_u64(r.try_get(2)?),
                position: position(r.try_get(3)?, r.try_get(4)?),
            })
        })
        .collect()
}

/// The stream's last version, and whether it was written by a transaction younger than the one
/// running on `conn` (never, outside a transaction that holds an id).
async fn last_event(conn: &mut PgConnection, stream: &StreamName) -> Result<Option<(u64, bool)>> {
    let row: Option<(i64, Option<bool>)> = sqlx::query_as(
        "SELECT version, tx_id > pg_current_xact_id_if_assigned()::text::bigint FROM annal_events \
         WHERE stream = $1 ORDER BY version DESC LIMIT 1",
    )
    .bind(stream.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(version, younger)| (to_u64(version), younger.unwrap_or(false))))
}

fn position(tx_id: i64, seq: i64) -> Position {
    Position::new(to_u64(tx_id), to_u64(seq))
}

/// Decodes a row of [`select_events!`], its columns taken by index (in the macro's order): a
/// lookup by name costs a search of the column names for every column of every row.
fn decode(row: &PgRow) -> Result<RecordedEvent> {
    let position = position(row.try_get(0)?, row.try_get(1)?);
    let mut problem = None;
    let p = &mut problem;
    StoredEvent {
        position,
        id: StoredEvent::column(p, "event_id", row.try_get::<Uuid, _>(2).map(Some)),
        stream: StoredEvent::column(p, "stream", row.try_get(3)),
        version: StoredEvent::column(p, "version", row.try_get(4)),
        event_type: StoredEvent::column(p, "event_type", row.try_get(5)),
        schema_version: i64::from(StoredEvent::column::<i32>(p, "schema_version", row.try_get(6))),
        data: StoredEvent::column(p, "data", row.try_get(7)),
        metadata: StoredEvent::column(p, "metadata", row.try_get(8)),
        recorded_at: StoredEvent::column(p, "recorded_at", row.try_get::<DateTime<Utc>, _>(9).map(Some)),
        problem,
    }
    .decode()
}

/// The columns [`decode`] takes by index, in this order.
macro_rules! select_events {
    () => {
        concat!("SELECT ", event_columns!(), " FROM annal_events")
    };
}

/// [`select_events!`]'s columns.
macro_rules! event_columns {
    () => {
        "tx_id, seq, event_id, stream, version, event_type, schema_version, data::text AS data, \
         metadata::text AS metadata, recorded_at"
    };
}

/// The oldest transaction id still running: every event below it is committed or rolled back,
/// and no event will ever appear below it again.
macro_rules! horizon {
    () => {
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    };
}
const HORIZON: &str = horizon!();

/// The head as a row of a filtered page: [`select_events!`]'s columns null, then the head's
/// position at [`PAGE_HEAD`]. No row when the log is empty.
macro_rules! head_row {
    () => {
        last_visible!("NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, tx_id, seq")
    };
}

/// `$columns` of the last visible event: the head's row, below the horizon.
macro_rules! last_visible {
    ($columns:literal) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM annal_events WHERE tx_id < ",
            horizon!(),
            " ORDER BY tx_id DESC, seq DESC LIMIT 1"
        )
    };
}

/// The index of the head's first column in a filtered page's rows, after [`select_events!`]'s.
const PAGE_HEAD: usize = 10;

/// A filtered page's row: the event's, or `None` when it is the head's row (the head is then
/// stored in `head`).
fn event_or_head(row: PgRow, head: &mut Position) -> Result<Option<PgRow>, sqlx::Error> {
    if row.try_get::<Option<i64>, _>(0)?.is_some() {
        return Ok(Some(row));
    }
    *head = position(row.try_get(PAGE_HEAD)?, row.try_get(PAGE_HEAD + 1)?);
    Ok(None)
}

/// Appends the filter's selection (categories, event types, partition, data) as ` AND ...`, every
/// value bound.
fn push_selection(q: &mut QueryBuilder<Postgres>, filter: &Filter) {
    for (column, values) in [("category", filter.category_list()), ("event_type", filter.event_type_list())] {
        if !values.is_empty() {
            q.push(format_args!(" AND {column} = ANY(")).push_bind(values.to_vec()).push(")");
        }
    }
    if let Some((index, count)) = filter.partition() {
        q.push(" AND stream_hash % ").push_bind(i64::from(count)).push(" = ").push_bind(i64::from(index));
    }
    predicate::push_data(q, filter.data());
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        crate::metrics::append("postgres", stream, events.len(), async {
            let encoded = encode_batch(events, self.max_event_size)?;
            let result = self.groups.append(stream, expected, encoded).await?;
            self.committed(result.position());
            Ok(result)
        })
        .await
    }

    /// One statement writes the events and the snapshot; never grouped with other appends.
    async fn append_with_snapshot(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: &Snapshot,
    ) -> Result<AppendResult> {
        let (_, state) = crate::append::check_snapshot_with_append(expected, events.len(), snapshot)?;
        crate::metrics::append("postgres", stream, events.len(), async {
            let encoded = encode_batch(events, self.max_event_size)?;
            let mut conn = self.pool.acquire().await?;
            let result = append_on(&mut conn, false, stream, expected, &encoded, Some((snapshot, &state))).await?;
            self.committed(result.position());
            Ok(result)
        })
        .await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        check_limit(limit)?;
        const FORWARDS: &str =
            concat!(select_events!(), " WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3");
        const BACKWARDS: &str =
            concat!(select_events!(), " WHERE stream = $1 AND version <= $2 ORDER BY version DESC LIMIT $3");
        let sql = match direction {
            Direction::Forwards => FORWARDS,
            Direction::Backwards => BACKWARDS,
        };
        let rows = sqlx::query(sql)
            .bind(stream.as_str())
            .bind(to_i64(from))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> Result<Page> {
        check_limit(limit)?;
        let mut q = QueryBuilder::<Postgres>::new(if filter.is_all() {
            concat!("(", select_events!(), " WHERE (tx_id, seq) > (")
        } else {
            // Room for the head's columns (see below).
            concat!("(SELECT ", event_columns!(), ", NULL::int8, NULL::int8 FROM annal_events WHERE (tx_id, seq) > (")
        });
        q.push_bind(to_i64(from.transaction())).push(", ").push_bind(to_i64(from.sequence()));
        q.push(format_args!(") AND tx_id < {HORIZON}"));
        push_selection(&mut q, filter);
        q.push(" ORDER BY tx_id, seq LIMIT ").push_bind(to_i64(limit as u64)).push(")");
        if filter.is_all() {
            let (events, stopped) = decode_rows(q.build().fetch(&self.pool), limit, decode).await?;
            return Ok(Page::after(from, events, limit, from, stopped));
        }
        // A filtered page skips events, so the reader needs the head to move past them. The
        // same statement reads it, in the same snapshot and below the same horizon, so a short
        // page has seen every selected event up to it: one round trip. It is the last row,
        // its event columns null (the union is merged in order, not sorted).
        q.push(concat!(" UNION ALL (", head_row!(), ") ORDER BY 1, 2"));
        let mut head = Position::START;
        let rows = futures::TryStreamExt::try_filter_map(q.build().fetch(&self.pool), |row| {
            std::future::ready(event_or_head(row, &mut head))
        });
        let (events, stopped) = decode_rows(rows, limit, decode).await?;
        Ok(Page::after(from, events, limit, head, stopped))
    }

    async fn read_event(&self, id: Uuid) -> Result<Option<RecordedEvent>> {
        let row =
            sqlx::query(concat!(select_events!(), " WHERE event_id = $1")).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(decode).transpose()
    }

    async fn head(&self) -> Result<Position> {
        let row: Option<(i64, i64)> = sqlx::query_as(last_visible!("tx_id, seq")).fetch_optional(&self.pool).await?;
        Ok(row.map_or(Position::START, |(t, s)| position(t, s)))
    }

    async fn count(&self, after: Position, up_to: Position, filter: &Filter) -> Result<u64> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT count(*) FROM annal_events WHERE (tx_id, seq) > (");
        q.push_bind(to_i64(after.transaction())).push(", ").push_bind(to_i64(after.sequence()));
        q.push(") AND (tx_id, seq) <= (").push_bind(to_i64(up_to.transaction())).push(", ");
        q.push_bind(to_i64(up_to.sequence())).push(")");
        push_selection(&mut q, filter);
        let count: i64 = q.build_query_scalar().fetch_one(&self.pool).await?;
        Ok(to_u64(count))
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>> {
        let row: Option<(i64, i32, String)> =
            sqlx::query_as("SELECT version, schema_version, state::text FROM annal_snapshots WHERE stream = $1")
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(version, schema_version, state)| {
            let state = decode_json(&state, || format!("snapshot of {stream}"))?;
            Ok(Snapshot::new(to_u64(version), u32::try_from(schema_version).unwrap_or_default(), state))
        })
        .transpose()
    }

    /// One statement: the snapshot's row (event columns null but the version, its state in the
    /// data column), then the page of events after it, in version order.
    async fn load_snapshot_and_events(
        &self,
        stream: &StreamName,
        schema_version: u32,
        limit: usize,
    ) -> Result<(Option<Snapshot>, Vec<RecordedEvent>)> {
        check_limit(limit)?;
        // The snapshot's key probed twice rather than through a CTE, and no `ORDER BY` over the
        // union (a `Merge Append` with a sort): about 3% more loads a second without a
        // snapshot (pgbench, 30-event streams; `docs/benchmarks.md`). The rows are put in order here instead.
        const LOAD: &str = concat!(
            "(SELECT NULL::int8, NULL::int8, NULL::uuid, NULL::text, version, NULL::text, NULL::int4, state::text, ",
            "NULL::text, NULL::timestamptz FROM annal_snapshots WHERE stream = $1 AND schema_version = $2) UNION ALL (",
            select_events!(),
            " WHERE stream = $1 AND version > coalesce((SELECT version FROM annal_snapshots WHERE stream = $1 \
             AND schema_version = $2), -1) ORDER BY version LIMIT $3)"
        );
        let rows = sqlx::query(LOAD)
            .bind(stream.as_str())
            .bind(i64::from(schema_version))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.pool)
            .await?;
        let (mut snapshot, mut events) = (None, Vec::with_capacity(rows.len()));
        for row in &rows {
            if row.try_get::<Option<i64>, _>(0)?.is_some() {
                events.push(decode(row)?);
                continue;
            }
            let state = decode_json(&row.try_get::<String, _>(7)?, || format!("snapshot of {stream}"))?;
            snapshot = Some(Snapshot::new(to_u64(row.try_get(4)?), schema_version, state));
        }
        if !events.is_sorted_by_key(|e| e.version) {
            events.sort_by_key(|e| e.version);
        }
        Ok((snapshot, events))
    }

    async fn save_snapshot(&self, stream: &StreamName, snapshot: &Snapshot) -> Result<()> {
        let (_, state) = encode_snapshot(snapshot)?;
        sqlx::query(save_snapshot!("VALUES ($1, $2, $3, $4::jsonb)"))
            .bind(stream.as_str())
            .bind(to_i64(snapshot.version))
            .bind(snapshot.schema_version as i32)
            .bind(state)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn wakeup(&self) -> Wakeup {
        self.notifier.subscribe()
    }
}
