-- One control record per projection, written by operators (`annal-runner pause`, `resume`,
-- `reset --to`, `rebuild --in-place`) and read by every runner on each lease round.
-- `paused_by` not null: the projection is paused, and only the runner named there (a rebuild
-- that took it over, or nobody for an operator's pause) may hold its partitions.
-- `epoch` grows with every reset, rebuild and checkpoint move, so a worker learns that its
-- checkpoint was changed under it even when no new event arrives.
-- Times are microseconds since the Unix epoch, UTC.
CREATE TABLE annal_projection_control (
    projection    TEXT    PRIMARY KEY,
    paused_by     TEXT,
    paused_reason TEXT,
    paused_at     INTEGER,
    epoch         INTEGER NOT NULL DEFAULT 0
);
