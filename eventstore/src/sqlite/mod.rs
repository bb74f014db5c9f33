//! The SQLite backend: embedded, one file, no server.

mod predicate;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use crate::append::{Written, first_version, resolve_written};
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

/// Rows per INSERT statement: 10 parameters each stays far below SQLite's variable limit.
const ROWS_PER_INSERT: usize = 100;

macro_rules! select_events {
    () => {
        concat!("SELECT ", event_columns!(), " FROM annal_events")
    };
}

/// [`select_events!`]'s columns.
macro_rules! event_columns {
    () => {
        "position, event_id, stream, version, event_type, schema_version, data, metadata, recorded_at"
    };
}

/// An event store in one SQLite file: the embedded default, no server needed.
///
/// The file is opened in WAL mode with durable commits (`synchronous = FULL`); appends go
/// through one writer connection (SQLite has one writer at a time, which also makes its global
/// order gap-free), reads through a small pool. Subscribers in the same process are woken at
/// once after each append; other processes sharing the file notice new events at their poll
/// interval.
///
/// Cloning is cheap; clones share the connections.
///
/// ```no_run
/// use annal_eventstore::SqliteEventStore;
///
/// # async fn example() -> annal_eventstore::Result<()> {
/// let store = SqliteEventStore::open("events.db").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteEventStore {
    writer: SqlitePool,
    readers: SqlitePool,
    notifier: Notifier,
    max_event_size: usize,
}

impl SqliteEventStore {
    /// Opens (creating if needed) the store in the SQLite file at `path` and brings its schema
    /// up to date.
    ///
    /// # Errors
    /// [`Error::Backend`] if the file cannot be opened or migrated.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        Self::open_with(options).await
    }

    /// Opens the store described by a `sqlite:` URL, such as `sqlite://events.db`.
    ///
    /// # Errors
    /// [`Error::Backend`] if the URL is invalid or the file cannot be opened or migrated.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        Self::open_with(options).await
    }

    /// Opens the store with explicit connection options. WAL mode, a busy timeout and, unless
    /// the options set another, `synchronous = FULL` are applied on top.
    ///
    /// # Errors
    /// [`Error::Backend`] if the file cannot be opened or migrated.
    pub async fn open_with(options: SqliteConnectOptions) -> Result<Self> {
        Self::open_writable(options, true).await
    }

    /// Opens an existing store whose schema is already up to date, without creating the file or
    /// migrating: for processes that write (events, read models) but leave the schema to an
    /// explicit migration step. WAL mode, a busy timeout and `synchronous = FULL` as
    /// [`SqliteEventStore::open_with`].
    ///
    /// # Errors
    /// [`Error::Backend`] if the file does not exist or cannot be opened; [`Error::NotMigrated`]
    /// if its schema lacks migrations this version needs.
    pub async fn open_migrated(options: SqliteConnectOptions) -> Result<Self> {
        let store = Self::open_writable(options.create_if_missing(false), false).await?;
        store.check_migrated(&migrator()).await?;
        Ok(store)
    }

    async fn open_writable(options: SqliteConnectOptions, migrate: bool) -> Result<Self> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // No test per acquire (sqlx tests every connection when it is released already, and a
        // file has no network to break): it would cost each call a trip to the worker thread.
        let writer = again_if_raced(|| {
            SqlitePoolOptions::new().max_connections(1).test_before_acquire(false).connect_with(options.clone())
        })
        .await?;
        if migrate {
            Self::run_migrations(&migrator(), &writer).await.map_err(Error::backend)?;
            hash_old_streams(&writer).await?;
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteEventStore { writer, readers, notifier: Notifier::new(), max_event_size: DEFAULT_MAX_EVENT_SIZE })
    }

    /// Opens an existing store read-only: the file is never created, never migrated and never
    /// written (both pools are read-only connections, so an append fails). For tools that
    /// inspect a store, such as the runner's read-only commands.
    ///
    /// # Errors
    /// [`Error::Backend`] if the file does not exist or cannot be opened; [`Error::NotMigrated`]
    /// if its schema lacks migrations this version needs (run [`SqliteEventStore::open`] or
    /// `annal-runner migrate` first).
    ///
    /// ```no_run
    /// use annal_eventstore::SqliteEventStore;
    /// use sqlx::sqlite::SqliteConnectOptions;
    ///
    /// # async fn example() -> annal_eventstore::Result<()> {
    /// let store = SqliteEventStore::open_read_only(SqliteConnectOptions::new().filename("events.db")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open_read_only(options: SqliteConnectOptions) -> Result<Self> {
        // No journal mode: setting one writes (a file in WAL mode is read in WAL mode anyway).
        let options = options.create_if_missing(false).read_only(true).busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(4).test_before_acquire(false).connect_with(options).await?;
        let store = SqliteEventStore {
            writer: pool.clone(),
            readers: pool,
            notifier: Notifier::new(),
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
        };
        store.check_migrated(&migrator()).await?;
        Ok(store)
    }

    /// Checks, without writing, that every migration of `migrator` (the store's, a projection
    /// store's) is applied to this file.
    ///
    /// # Errors
    /// [`Error::NotMigrated`] naming the versions that are not; [`Error::Backend`] if the file
    /// cannot be read.
    pub async fn check_migrated(&self, migrator: &sqlx::migrate::Migrator) -> Result<()> {
        let history: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1")
            .bind(migrator.table_name.as_ref())
            .fetch_one(&self.readers)
            .await?;
        let applied: Vec<i64> = if history == 0 {
            Vec::new()
        } else {
            sqlx::query_scalar(sqlx::AssertSqlSafe(crate::schema::applied_sql(migrator)))
                .fetch_all(&self.readers)
                .await?
        };
        crate::schema::require(migrator, &applied)
    }

    /// Runs `migrator` on a SQLite pool, where sqlx takes no lock: when two processes open a new
    /// file at once, both may try a migration, and the one that waited for the other's write lock
    /// then fails with "table ... already exists" (or "database is locked"). Running again, after
    /// a pause, finds that migration applied.
    ///
    /// # Errors
    /// The last attempt's error.
    async fn run_migrations(
        migrator: &sqlx::migrate::Migrator,
        pool: &SqlitePool,
    ) -> std::result::Result<(), sqlx::migrate::MigrateError> {
        again_if_raced(|| migrator.run(pool)).await
    }

    /// Runs `migrator` (the migrations of a projection store or of a read model kept in this
    /// file) through the writer, as opening runs the store's own: a migration that another
    /// process opening the file at the same moment applied first is not an error.
    ///
    /// # Errors
    /// [`Error::Backend`] with the migration's error.
    pub async fn migrate(&self, migrator: &sqlx::migrate::Migrator) -> Result<()> {
        Self::run_migrations(migrator, &self.writer).await.map_err(Error::backend)
    }

    /// Sets the limit on one event's encoded size (default 1 MiB).
    pub fn with_max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes;
        self
    }

    /// The pool of the one connection that writes. Read models kept in the same file are written
    /// through it, in the same transactions as their projections' checkpoints.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Wakes this store's subscribers, as an append does. For code that writes events through
    /// [`SqliteEventStore::writer`] directly.
    pub fn notify(&self) {
        self.notifier.notify();
    }

    /// Closes the connections; every later call fails with [`Error::Closed`].
    pub async fn close(&self) {
        self.writer.close().await;
        self.readers.close().await;
    }

    async fn written(&self, ids: &[Uuid]) -> Result<Vec<Written>> {
        let mut written = Vec::new();
        for chunk in ids.chunks(ROWS_PER_INSERT * 9) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT event_id, stream, version, position FROM annal_events WHERE event_id IN (",
            );
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            q.push(")");
            for row in q.build().fetch_all(&self.writer).await? {
                written.push(Written {
                    id: row.try_get("event_id")?,
                    stream: row.try_get("stream")?,
                    version: to_u64(row.try_get("version")?),
                    position: Position::new(0, to_u64(row.try_get("position")?)),
                });
            }
        }
        Ok(written)
    }

    /// After a failed append: an idempotent retry (the original result), a duplicate, or the
    /// conflict.
    async fn resolve(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        ids: &[Uuid],
        conflict: Error,
    ) -> Result<AppendResult> {
        match resolve_written(stream, expected, ids, self.written(ids).await?)? {
            Some(original) => Ok(original),
            None => Err(conflict),
        }
    }
}

/// Runs `attempt` again, up to 10 times with a growing pause, while it fails the way two
/// processes opening a new file at once make each other fail (switching it to WAL, migrating it):
/// SQLite answers SQLITE_BUSY at once instead of waiting (a deferred transaction cannot wait to
/// upgrade), or the loser of a migration finds the winner's work done. Other errors (a file that
/// cannot be opened) return at once.
async fn again_if_raced<T, E, F>(mut attempt: impl FnMut() -> F) -> std::result::Result<T, E>
where
    E: std::error::Error + 'static,
    F: std::future::Future<Output = std::result::Result<T, E>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Err(error) if attempts < 10 && raced(&error) => {
                tracing::debug!(%error, "raced another process opening the file; again");
                tokio::time::sleep(Duration::from_millis(20 * attempts)).await;
            }
            result => return result,
        }
    }
}

/// Whether `error` may come from another process opening the file at the same moment: SQLITE_BUSY
/// or SQLITE_LOCKED (anywhere in its causes), or a failed migration (the other process may have
/// applied it first, whatever the error says: "already exists", "duplicate column name"...; a
/// migration broken for good fails every attempt and is reported after about a second).
fn raced(error: &(dyn std::error::Error + 'static)) -> bool {
    if error.downcast_ref::<sqlx::migrate::MigrateError>().is_some() {
        return true;
    }
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(sqlx::Error::Database(db)) = error.downcast_ref::<sqlx::Error>() {
            // Extended result codes keep the primary code in their low byte.
            let code = db.code().and_then(|c| c.parse::<u32>().ok()).map(|c| c & 0xff);
            return matches!(code, Some(5 | 6));
        }
        cause = error.source();
    }
    false
}

/// The embedded migrations, kept in their own history table so they never mix with an
/// application's own sqlx migrations in the same database.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.dangerous_set_table_name("annal_migrations");
    migrator
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// A filtered page's row: the event's, or `None` when it is the head's row (the head is then
/// stored in `head`; `Position::START` for an empty log).
fn event_or_head(row: SqliteRow, head: &mut Position) -> Result<Option<SqliteRow>, sqlx::Error> {
    if row.try_get::<i64, _>("head_row")? == 0 {
        return Ok(Some(row));
    }
    *head = row.try_get::<Option<i64>, _>("position")?.map_or(Position::START, |p| Position::new(0, to_u64(p)));
    Ok(None)
}

fn decode(row: &SqliteRow) -> Result<RecordedEvent> {
    let mut problem = None;
    let position = Position::new(0, to_u64(row.try_get("position")?));
    let p = &mut problem;
    let recorded_at: i64 = StoredEvent::column(p, "recorded_at", row.try_get("recorded_at"));
    StoredEvent {
        position,
        id: StoredEvent::column(p, "event_id", row.try_get::<Uuid, _>("event_id").map(Some)),
        stream: StoredEvent::column(p, "stream", row.try_get("stream")),
        version: StoredEvent::column(p, "version", row.try_get("version")),
        event_type: StoredEvent::column(p, "event_type", row.try_get("event_type")),
        schema_version: StoredEvent::column(p, "schema_version", row.try_get("schema_version")),
        data: StoredEvent::column(p, "data", row.try_get("data")),
        metadata: StoredEvent::column(p, "metadata", row.try_get("metadata")),
        recorded_at: DateTime::from_timestamp_micros(recorded_at),
        problem,
    }
    .decode()
}

impl SqliteEventStore {
    async fn write(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: Option<(&Snapshot, String)>,
    ) -> Result<AppendResult> {
        let encoded = encode_batch(events, self.max_event_size)?;
        let ids: Vec<Uuid> = encoded.iter().map(|e| e.event.id).collect();
        if snapshot.is_none() && encoded.len() <= ROWS_PER_INSERT {
            return self.write_in_one_statement(stream, expected, &encoded, &ids).await;
        }
        // IMMEDIATE takes the write lock now, so the version read below cannot go stale.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let current = last_version(&mut *tx, stream).await?;
        let first = match first_version(stream, expected, current) {
            Ok(first) => first,
            Err(conflict) => {
                tx.rollback().await?;
                return self.resolve(stream, expected, &ids, conflict).await;
            }
        };
        let recorded_at = Utc::now().timestamp_micros();
        let mut positions = Vec::with_capacity(encoded.len());
        for (chunk_index, chunk) in encoded.chunks(ROWS_PER_INSERT).enumerate() {
            let base = first + (chunk_index * ROWS_PER_INSERT) as u64;
            let inserted = insert_chunk(&mut tx, stream, base, chunk, recorded_at).await;
            match inserted {
                Ok(mut rows) => {
                    rows.sort_unstable();
                    positions.extend(rows.into_iter().map(|(_, position)| Position::new(0, to_u64(position))));
                }
                Err(e) if is_unique_violation(&e) => {
                    tx.rollback().await?;
                    let conflict = Error::Conflict { stream: stream.clone(), expected, actual: current };
                    return self.resolve(stream, expected, &ids, conflict).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some((snapshot, state)) = snapshot {
            save_snapshot(&mut *tx, stream, snapshot, state).await?;
        }
        tx.commit().await?;
        let result = AppendResult::new(first + encoded.len() as u64 - 1, positions);
        self.notifier.notify_up_to(result.position());
        Ok(result)
    }

    /// Appends a batch of at most [`ROWS_PER_INSERT`] events by one statement, its own
    /// transaction: the guard compares the stream's last version with the expectation in the
    /// same statement, so no transaction has to hold the write lock across a read.
    async fn write_in_one_statement(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        batch: &[EncodedEvent],
        ids: &[Uuid],
    ) -> Result<AppendResult> {
        let mut actual = None;
        for _ in 0..APPEND_RETRIES {
            match insert_guarded(&self.writer, stream, expected, batch).await {
                Ok(mut rows) if rows.len() == batch.len() => {
                    rows.sort_unstable();
                    let version = rows.last().map_or(0, |(v, _)| to_u64(*v));
                    let result = AppendResult::new(
                        version,
                        rows.into_iter().map(|(_, p)| Position::new(0, to_u64(p))).collect(),
                    );
                    self.notifier.notify_up_to(result.position());
                    return Ok(result);
                }
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(e.into()),
            }
            // Rejected: an idempotent retry, a duplicate id, or a version conflict; or another
            // process appended between this statement and the read below.
            if let Some(original) = resolve_written(stream, expected, ids, self.written(ids).await?)? {
                return Ok(original);
            }
            actual = last_version(&self.writer, stream).await?;
            if !expected.is_satisfied_by(actual) {
                break;
            }
        }
        Err(Error::Conflict { stream: stream.clone(), expected, actual })
    }
}

/// The stream's last version; `None`: no stream.
async fn last_version<'c>(on: impl sqlx::SqliteExecutor<'c>, stream: &StreamName) -> Result<Option<u64>> {
    let last: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM annal_events WHERE stream = ?")
        .bind(stream.as_str())
        .fetch_one(on)
        .await?;
    Ok(last.map(to_u64))
}

/// How often a one-statement append is tried again when the expectation holds after it was
/// rejected (another process sharing the file appended in between).
const APPEND_RETRIES: usize = 50;

/// The one-statement append: the stream's last version (`-1`: no stream) is read by the
/// statement itself, the new versions follow it, and the guard makes the statement insert
/// nothing when the expectation does not hold. `?5` is the exact version expected (`-1` for no
/// stream, `NULL` for an append at the end), `?6` whether the stream must exist.
async fn insert_guarded(
    writer: &SqlitePool,
    stream: &StreamName,
    expected: ExpectedVersion,
    batch: &[EncodedEvent],
) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let (base, must_exist) = match expected {
        ExpectedVersion::Exact(v) => (Some(to_i64(v)), false),
        ExpectedVersion::NoStream => (Some(-1), false),
        ExpectedVersion::Any => (None, false),
        ExpectedVersion::StreamExists => (None, true),
    };
    let mut query = sqlx::query(guarded_insert(batch.len()))
        .bind(stream.as_str())
        .bind(stream.category())
        .bind(Utc::now().timestamp_micros())
        .bind(i64::from(stream_hash(stream)))
        .bind(base)
        .bind(must_exist);
    for e in batch {
        query = query
            .bind(e.event.id)
            .bind(e.event.event_type.as_str())
            .bind(i64::from(e.event.schema_version))
            .bind(e.data.as_str())
            .bind(e.metadata.as_str());
    }
    let rows = query.fetch_all(writer).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// [`insert_guarded`]'s statement for `rows` events (1 to [`ROWS_PER_INSERT`]), each built once.
fn guarded_insert(rows: usize) -> &'static str {
    static STATEMENTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let statements = STATEMENTS.get_or_init(|| {
        (1..=ROWS_PER_INSERT)
            .map(|rows| {
                let values = (1..=rows)
                    .map(|n| {
                        let p = 7 + (n - 1) * 5;
                        format!("(?{p}, ?{}, ?{}, ?{}, ?{}, {n})", p + 1, p + 2, p + 3, p + 4)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "WITH b AS MATERIALIZED (SELECT coalesce(max(version), -1) AS last FROM annal_events WHERE stream = ?1) \
                     INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, recorded_at, stream_hash) \
                     SELECT e.column1, ?1, ?2, b.last + e.column6, e.column2, e.column3, e.column4, e.column5, ?3, ?4 \
                     FROM b, (VALUES {values}) AS e \
                     WHERE CASE WHEN ?5 IS NULL THEN (NOT ?6 OR b.last >= 0) ELSE b.last = ?5 END \
                     RETURNING version, position"
                )
            })
            .collect()
    });
    &statements[rows - 1]
}

/// Stores a snapshot unless the stream has one at a later version of the same schema.
async fn save_snapshot<'c>(
    on: impl sqlx::SqliteExecutor<'c>,
    stream: &StreamName,
    snapshot: &Snapshot,
    state: String,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO annal_snapshots (stream, version, schema_version, state, recorded_at) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (stream) DO UPDATE SET version = excluded.version, schema_version = excluded.schema_version, \
             state = excluded.state, recorded_at = excluded.recorded_at \
         WHERE annal_snapshots.version < excluded.version OR annal_snapshots.schema_version <> excluded.schema_version",
    )
    .bind(stream.as_str())
    .bind(to_i64(snapshot.version))
    .bind(i64::from(snapshot.schema_version))
    .bind(state)
    .bind(Utc::now().timestamp_micros())
    .execute(on)
    .await?;
    Ok(())
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        crate::metrics::append("sqlite", stream, events.len(), self.write(stream, expected, events, None)).await
    }

    async fn append_with_snapshot(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        snapshot: &Snapshot,
    ) -> Result<AppendResult> {
        let (_, state) = crate::append::check_snapshot_with_append(expected, events.len(), snapshot)?;
        let count = events.len();
        crate::metrics::append("sqlite", stream, count, self.write(stream, expected, events, Some((snapshot, state))))
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
        let sql = match direction {
            Direction::Forwards => {
                concat!(select_events!(), " WHERE stream = ? AND version >= ? ORDER BY version LIMIT ?")
            }
            Direction::Backwards => {
                concat!(select_events!(), " WHERE stream = ? AND version <= ? ORDER BY version DESC LIMIT ?")
            }
        };
        let rows = sqlx::query(sql)
            .bind(stream.as_str())
            .bind(to_i64(from))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(decode).collect()
    }

    async fn read_all_page(&self, from: Position, filter: &Filter, limit: usize) -> Result<Page> {
        check_limit(limit)?;
        if filter.is_all() {
            let mut q = QueryBuilder::<Sqlite>::new(concat!(select_events!(), " WHERE position > "));
            q.push_bind(to_i64(from.flat_sequence()));
            q.push(" ORDER BY position LIMIT ").push_bind(to_i64(limit as u64));
            let (events, stopped) = decode_rows(q.build().fetch(&self.readers), limit, decode).await?;
            return Ok(Page::after(from, events, limit, from, stopped));
        }
        // A filtered page skips events, so the reader needs the head to move past them. The
        // same query reads it, in the same snapshot, so a short page has seen every selected
        // event up to it. It is the row with `head_row` 1, its event columns null.
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT * FROM (SELECT ",
            event_columns!(),
            ", 0 AS head_row FROM annal_events WHERE position > "
        ));
        q.push_bind(to_i64(from.flat_sequence()));
        push_in(&mut q, "category", filter.category_list());
        push_in(&mut q, "event_type", filter.event_type_list());
        push_partition(&mut q, filter);
        predicate::push_data(&mut q, filter.data());
        q.push(" ORDER BY position LIMIT ").push_bind(to_i64(limit as u64));
        q.push(
            ") UNION ALL SELECT max(position), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1 FROM annal_events \
             ORDER BY position, head_row",
        );
        let mut head = Position::START;
        let rows = futures::TryStreamExt::try_filter_map(q.build().fetch(&self.readers), |row| {
            std::future::ready(event_or_head(row, &mut head))
        });
        let (events, stopped) = decode_rows(rows, limit, decode).await?;
        Ok(Page::after(from, events, limit, head, stopped))
    }

    async fn read_event(&self, id: Uuid) -> Result<Option<RecordedEvent>> {
        let row = sqlx::query(concat!(select_events!(), " WHERE event_id = ?"))
            .bind(id)
            .fetch_optional(&self.readers)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    async fn head(&self) -> Result<Position> {
        let head: Option<i64> =
            sqlx::query_scalar("SELECT max(position) FROM annal_events").fetch_one(&self.readers).await?;
        Ok(head.map_or(Position::START, |p| Position::new(0, to_u64(p))))
    }

    async fn count(&self, after: Position, up_to: Position, filter: &Filter) -> Result<u64> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT count(*) FROM annal_events WHERE position > ");
        q.push_bind(to_i64(after.flat_sequence())).push(" AND position <= ").push_bind(to_i64(up_to.flat_sequence()));
        push_in(&mut q, "category", filter.category_list());
        push_in(&mut q, "event_type", filter.event_type_list());
        push_partition(&mut q, filter);
        predicate::push_data(&mut q, filter.data());
        let count: i64 = q.build_query_scalar().fetch_one(&self.readers).await?;
        Ok(to_u64(count))
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>> {
        let row: Option<(i64, i64, String)> =
            sqlx::query_as("SELECT version, schema_version, state FROM annal_snapshots WHERE stream = ?")
                .bind(stream.as_str())
                .fetch_optional(&self.readers)
                .await?;
        row.map(|(version, schema_version, state)| {
            let state = decode_json(&state, || format!("snapshot of {stream}"))?;
            Ok(Snapshot::new(to_u64(version), u32::try_from(schema_version).unwrap_or_default(), state))
        })
        .transpose()
    }

    /// One query: the snapshot's row (event columns null but the version, its state in the data
    /// column), then the page of events after it, in version order.
    async fn load_snapshot_and_events(
        &self,
        stream: &StreamName,
        schema_version: u32,
        limit: usize,
    ) -> Result<(Option<Snapshot>, Vec<RecordedEvent>)> {
        check_limit(limit)?;
        const LOAD: &str = concat!(
            "WITH snapshot AS (SELECT version, state FROM annal_snapshots WHERE stream = ?1 AND schema_version = ?2) ",
            "SELECT NULL AS position, NULL AS event_id, NULL AS stream, version, NULL AS event_type, ",
            "NULL AS schema_version, state AS data, NULL AS metadata, NULL AS recorded_at FROM snapshot ",
            "UNION ALL SELECT * FROM (",
            select_events!(),
            " WHERE stream = ?1 AND version > coalesce((SELECT version FROM snapshot), -1) ORDER BY version LIMIT ?3)",
            " ORDER BY version"
        );
        let rows = sqlx::query(LOAD)
            .bind(stream.as_str())
            .bind(i64::from(schema_version))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.readers)
            .await?;
        let mut rows = rows.iter().peekable();
        let snapshot = match rows.next_if(|row| matches!(row.try_get::<Option<i64>, _>("position"), Ok(None))) {
            Some(row) => {
                let state = decode_json(&row.try_get::<String, _>("data")?, || format!("snapshot of {stream}"))?;
                Some(Snapshot::new(to_u64(row.try_get("version")?), schema_version, state))
            }
            None => None,
        };
        Ok((snapshot, rows.map(decode).collect::<Result<_>>()?))
    }

    async fn save_snapshot(&self, stream: &StreamName, snapshot: &Snapshot) -> Result<()> {
        let (_, state) = encode_snapshot(snapshot)?;
        save_snapshot(&self.writer, stream, snapshot, state).await
    }

    fn wakeup(&self) -> Wakeup {
        self.notifier.subscribe()
    }
}

fn push_in(q: &mut QueryBuilder<Sqlite>, column: &'static str, values: &[String]) {
    if values.is_empty() {
        return;
    }
    q.push(format_args!(" AND {column} IN ("));
    let mut list = q.separated(", ");
    for value in values {
        list.push_bind(value.clone());
    }
    q.push(")");
}

fn push_partition(q: &mut QueryBuilder<Sqlite>, filter: &Filter) {
    if let Some((index, count)) = filter.partition() {
        q.push(" AND stream_hash % ").push_bind(i64::from(count)).push(" = ").push_bind(i64::from(index));
    }
}

/// Fills in the stream hash of events written before it was stored (migration 0003).
async fn hash_old_streams(writer: &SqlitePool) -> Result<()> {
    let streams: Vec<String> = sqlx::query_scalar("SELECT DISTINCT stream FROM annal_events WHERE stream_hash IS NULL")
        .fetch_all(writer)
        .await?;
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    for stream in streams {
        let hash = i64::from(stream_hash(&StreamName::new(&stream)?));
        sqlx::query("UPDATE annal_events SET stream_hash = ?1 WHERE stream = ?2 AND stream_hash IS NULL")
            .bind(hash)
            .bind(&stream)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn insert_chunk(
    tx: &mut sqlx::SqliteConnection,
    stream: &StreamName,
    first_version: u64,
    chunk: &[EncodedEvent],
    recorded_at: i64,
) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let hash = i64::from(stream_hash(stream));
    let mut q = QueryBuilder::<Sqlite>::new(
        "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, recorded_at, stream_hash) ",
    );
    q.push_values(chunk.iter().enumerate(), |mut row, (i, e)| {
        row.push_bind(e.event.id)
            .push_bind(stream.as_str())
            .push_bind(stream.category())
            .push_bind(to_i64(first_version + i as u64))
            .push_bind(e.event.event_type.as_str())
            .push_bind(i64::from(e.event.schema_version))
            .push_bind(e.data.as_str())
            .push_bind(e.metadata.as_str())
            .push_bind(recorded_at)
            .push_bind(hash);
    });
    q.push(" RETURNING version, position");
    let rows = q.build().fetch_all(&mut *tx).await?;
    rows.iter().map(|r| Ok((r.try_get("version")?, r.try_get("position")?))).collect()
}
