-- Runners register per projection: a runner's fair share of a projection's partitions counts
-- only the runners that run that projection (a `rebuild` process, which runs one shadow
-- projection, must not make the others give up partitions). The rows are heartbeats that every
-- runner rewrites each lease round, so the old table is dropped rather than converted.
DROP TABLE annal_runners;
CREATE TABLE annal_runners (
    projection TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (projection, owner)
);
