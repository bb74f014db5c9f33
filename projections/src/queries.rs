//! The queries shared by the PostgreSQL and SQLite projection stores, written with `$n`
//! placeholders (SQLite reads them as `?n`). Timestamps are bound by the caller: `timestamptz`
//! on PostgreSQL, microseconds since the epoch on SQLite.

/// Moves a checkpoint that exists and is at `from` ($5, $6) to `to` ($3, $4), if the writer
/// still holds the partition's lease (owner $9, token $10), or writes without one ($9 null).
pub(crate) const ADVANCE: &str = "UPDATE annal_checkpoints SET position_tx = $3, position_seq = $4, updated_at = $7, \
     last_recorded_at = coalesce($8, last_recorded_at) \
     WHERE projection = $1 AND partition = $2 AND position_tx = $5 AND position_seq = $6 \
     AND (EXISTS (SELECT 1 FROM annal_leases l WHERE l.projection = $1 AND l.partition = $2 \
                  AND l.owner = $9 AND l.token = $10) OR $9 IS NULL)";

/// Creates a checkpoint at `to` if none exists (a projection's first move, from the start),
/// fenced like [`ADVANCE`] by owner $7 and token $8.
pub(crate) const CREATE: &str = "INSERT INTO annal_checkpoints \
     (projection, partition, position_tx, position_seq, updated_at, last_recorded_at) \
     SELECT $1, $2, $3, $4, $5, $6 \
     WHERE (EXISTS (SELECT 1 FROM annal_leases l WHERE l.projection = $1 AND l.partition = $2 \
                    AND l.owner = $7 AND l.token = $8) OR $7 IS NULL) \
     ON CONFLICT (projection, partition) DO NOTHING";

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
