-- The latest snapshot of each aggregate stream: its state after the event at `version`.
CREATE TABLE annal_snapshots (
    stream         TEXT    PRIMARY KEY,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    -- Microseconds since the Unix epoch, UTC.
    recorded_at    INTEGER NOT NULL
);
