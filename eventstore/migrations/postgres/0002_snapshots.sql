-- The latest snapshot of each aggregate stream: its state after the event at `version`.
CREATE TABLE annal_snapshots (
    stream         text        PRIMARY KEY,
    version        bigint      NOT NULL,
    schema_version integer     NOT NULL,
    state          jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
