-- Who runs each projection partition. A runner holds a partition while its lease is unexpired;
-- `token` grows with every new holder and fences checkpoint writes of a holder that lost it.
CREATE TABLE annal_leases (
    projection text        NOT NULL,
    partition  integer     NOT NULL,
    owner      text        NOT NULL,
    token      bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (projection, partition)
);

-- The runner processes alive, so that each can take its fair share of partitions.
CREATE TABLE annal_runners (
    owner      text        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
