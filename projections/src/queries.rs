//! The queries shared by the PostgreSQL and SQLite projection stores, written with `$n`
//! placeholders (SQLite reads them as `?n`). Timestamps are bound by the caller: `timestamptz`
//! on PostgreSQL, microseconds since the epoch on SQLite.

/// Moves a checkpoint that exists and is at `from` ($5, $6) to `to` ($3, $4), if the writer
/// still holds the partition's lease (owner $9, token $10) and the projection is not paused for
/// another runner, or writes without a lease ($9 null). The pause is part of the fence: a
/// holder whose lease ran out unnoticed (a slow lease round) cannot commit once the projection
/// is paused, even before its coordinator sees the pause.
macro_rules! advance {
    ($($gate:expr)?) => {
        concat!("UPDATE annal_checkpoints SET position_tx = $3, position_seq = $4, updated_at = $7, \
     last_recorded_at = coalesce($8, last_recorded_at) \
     WHERE projection = $1 AND partition = $2 AND position_tx = $5 AND position_seq = $6 \
     AND (EXISTS (SELECT 1 FROM annal_leases l WHERE l.projection = $1 AND l.partition = $2 \
                  AND l.owner = $9 AND l.token = $10) OR $9 IS NULL) \
     AND NOT EXISTS (SELECT 1 FROM annal_projection_control c WHERE c.projection = $1 \
                     AND c.paused_by IS NOT NULL AND c.paused_by <> $9)"$(, $gate)?)
    };
}
pub(crate) const ADVANCE: &str = advance!();

/// Creates a checkpoint at `to` if none exists (a projection's first move, from the start),
/// fenced like [`ADVANCE`] by owner $7 and token $8 and the pause.
macro_rules! create {
    ($($gate:expr)?) => {
        concat!("INSERT INTO annal_checkpoints \
     (projection, partition, position_tx, position_seq, updated_at, last_recorded_at) \
     SELECT $1, $2, $3, $4, $5, $6 \
     WHERE (EXISTS (SELECT 1 FROM annal_leases l WHERE l.projection = $1 AND l.partition = $2 \
                    AND l.owner = $7 AND l.token = $8) OR $7 IS NULL) \
     AND NOT EXISTS (SELECT 1 FROM annal_projection_control c WHERE c.projection = $1 \
                     AND c.paused_by IS NOT NULL AND c.paused_by <> $7)"$(, $gate)?, " ON CONFLICT (projection, partition) DO NOTHING")
    };
}
pub(crate) const CREATE: &str = create!();

/// The condition of the batch queries below: no stream of the batch (parameter `$n`, spelled by
/// each dialect) has a dead letter in partition $2 of projection $1.
macro_rules! unparked {
    (postgres, $n:literal) => {
        concat!(
            " AND NOT EXISTS (SELECT 1 FROM annal_dead_letters d WHERE d.projection = $1 AND d.partition = $2 \
             AND d.stream = ANY($",
            $n,
            "))"
        )
    };
    (sqlite, $n:literal) => {
        concat!(
            " AND NOT EXISTS (SELECT 1 FROM annal_dead_letters d WHERE d.projection = $1 AND d.partition = $2 \
             AND d.stream IN (SELECT value FROM json_each($",
            $n,
            ")))"
        )
    };
}

/// The checkpoint moves of a batch ([`ADVANCE`] and [`CREATE`] with the streams of the batch as
/// $11 and $9), refused while one of those streams has a dead letter in the partition: its later
/// events wait behind it. `blocked` tells that refusal from a moved checkpoint. PostgreSQL
/// binds the streams as a `text[]`, SQLite as a JSON array.
pub(crate) struct BatchQueries {
    pub(crate) advance: &'static str,
    pub(crate) create: &'static str,
    /// Whether a stream of the batch ($3) has a dead letter in partition $2 of projection $1.
    pub(crate) blocked: &'static str,
}

macro_rules! batch_queries {
    ($dialect:ident) => {
        BatchQueries {
            advance: advance!(unparked!($dialect, "11")),
            create: create!(unparked!($dialect, "9")),
            blocked: concat!("SELECT NOT (TRUE", unparked!($dialect, "3"), ")"),
        }
    };
}

#[cfg(feature = "postgres")]
pub(crate) const POSTGRES_BATCH: BatchQueries = batch_queries!(postgres);

#[cfg(feature = "sqlite")]
pub(crate) const SQLITE_BATCH: BatchQueries = batch_queries!(sqlite);

pub(crate) const LATENCY: &str =
    "UPDATE annal_checkpoints SET latency_p99_us = $3 WHERE projection = $1 AND partition = $2";

pub(crate) const LEASES: &str =
    "SELECT partition, owner, token, expires_at FROM annal_leases WHERE projection = $1 ORDER BY partition";

pub(crate) const DEREGISTER: &str = "DELETE FROM annal_runners WHERE projection = $1 AND owner = $2";

pub(crate) const CHECKPOINT: &str = "SELECT position_tx, position_seq, updated_at, last_recorded_at, latency_p99_us \
     FROM annal_checkpoints WHERE projection = $1 AND partition = $2";

pub(crate) const PARK: &str = "INSERT INTO annal_dead_letters \
     (projection, partition, event_id, stream, version, position_tx, position_seq, error, attempts, parked_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (projection, event_id) DO NOTHING";

pub(crate) const DEAD_LETTERS: &str = "SELECT id, projection, partition, event_id, stream, version, position_tx, \
     position_seq, error, attempts, parked_at FROM annal_dead_letters WHERE projection = $1 ORDER BY id";

pub(crate) const REMOVE_DEAD_LETTER: &str = "DELETE FROM annal_dead_letters WHERE projection = $1 AND id = $2";

pub(crate) const RESET_CHECKPOINTS: &str = "DELETE FROM annal_checkpoints WHERE projection = $1";

pub(crate) const RESET_DEAD_LETTERS: &str = "DELETE FROM annal_dead_letters WHERE projection = $1";

pub(crate) const RESET_LEASES: &str = "DELETE FROM annal_leases WHERE projection = $1";

/// Gives projection $1's checkpoints to projection $2 (whose own are deleted first).
pub(crate) const PROMOTE_CHECKPOINTS: &str = "UPDATE annal_checkpoints SET projection = $2 WHERE projection = $1";

/// Gives projection $1's dead letters to projection $2 (whose own are deleted first).
pub(crate) const PROMOTE_DEAD_LETTERS: &str = "UPDATE annal_dead_letters SET projection = $2 WHERE projection = $1";

/// The partition count recorded for projection $1, or, for a projection whose checkpoints
/// predate the record, the count its checkpoints imply.
pub(crate) const PARTITION_COUNT: &str = "SELECT coalesce((SELECT partitions FROM annal_partition_counts WHERE projection = $1), \
     (SELECT max(partition) + 1 FROM annal_checkpoints WHERE projection = $1))";

pub(crate) const RECORD_PARTITION_COUNT: &str =
    "INSERT INTO annal_partition_counts (projection, partitions) VALUES ($1, $2) ON CONFLICT (projection) DO NOTHING";

pub(crate) const RESET_PARTITION_COUNT: &str = "DELETE FROM annal_partition_counts WHERE projection = $1";

/// Gives projection $1's partition count to projection $2 (whose own is deleted first).
pub(crate) const PROMOTE_PARTITION_COUNT: &str =
    "UPDATE annal_partition_counts SET projection = $2 WHERE projection = $1";

pub(crate) const CONTROL: &str =
    "SELECT paused_by, paused_reason, paused_at, epoch FROM annal_projection_control WHERE projection = $1";

/// Pauses projection $1 for runner $2, with reason $3 at time $4 (replacing an earlier pause).
pub(crate) const PAUSE: &str = "INSERT INTO annal_projection_control (projection, paused_by, paused_reason, paused_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (projection) DO UPDATE \
     SET paused_by = excluded.paused_by, paused_reason = excluded.paused_reason, paused_at = excluded.paused_at";

pub(crate) const RESUME: &str = "UPDATE annal_projection_control \
     SET paused_by = NULL, paused_reason = NULL, paused_at = NULL WHERE projection = $1 AND paused_by IS NOT NULL";

pub(crate) const BUMP_EPOCH: &str = "INSERT INTO annal_projection_control (projection, epoch) VALUES ($1, 1) \
     ON CONFLICT (projection) DO UPDATE SET epoch = annal_projection_control.epoch + 1";

/// Puts the checkpoint of projection $1, partition $2 at ($3, $4), at time $5.
pub(crate) const PUT_CHECKPOINT: &str = "INSERT INTO annal_checkpoints \
     (projection, partition, position_tx, position_seq, updated_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (projection, partition) DO UPDATE \
     SET position_tx = excluded.position_tx, position_seq = excluded.position_seq, updated_at = excluded.updated_at";

/// Removes projection $1's dead letters after position ($2, $3).
pub(crate) const REMOVE_DEAD_LETTERS_AFTER: &str = "DELETE FROM annal_dead_letters WHERE projection = $1 \
     AND (position_tx > $2 OR (position_tx = $2 AND position_seq > $3))";
