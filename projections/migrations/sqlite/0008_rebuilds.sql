-- One rebuild record per projection: the last rebuild of it, written by the rebuilding process
-- (`annal-runner rebuild`) every second and read by `status` and the console. `updated_at` is
-- SQLite's clock (that of the machine holding the file, which all its writers share) at each
-- write; a record running but not written for `stale_after_ms` is stale: its process died.
-- `outcome`: running, swapped_in, resumed, left_paused, failed (with `reason`), interrupted.
-- Times are microseconds since the Unix epoch, UTC.
CREATE TABLE annal_rebuilds (
    projection     TEXT    PRIMARY KEY,
    owner          TEXT    NOT NULL,
    mode           TEXT    NOT NULL,
    started_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    total          INTEGER NOT NULL DEFAULT 0,
    done           INTEGER NOT NULL DEFAULT 0,
    rate           REAL    NOT NULL DEFAULT 0,
    eta_seconds    REAL,
    outcome        TEXT    NOT NULL,
    reason         TEXT,
    stale_after_ms INTEGER NOT NULL
);
