-- Who runs each projection partition. A runner holds a partition while its lease is unexpired;
-- `token` grows with every new holder and fences checkpoint writes of a holder that lost it.
-- Times are microseconds since the Unix epoch, UTC.
CREATE TABLE annal_leases (
    projection TEXT    NOT NULL,
    partition  INTEGER NOT NULL,
    owner      TEXT    NOT NULL,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (projection, partition)
);

-- The runner processes alive, so that each can take its fair share of partitions.
CREATE TABLE annal_runners (
    owner      TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
