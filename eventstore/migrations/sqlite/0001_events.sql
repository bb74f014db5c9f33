-- The event log. `position` is the rowid: SQLite has one writer at a time, so positions are
-- assigned in commit order and the global order has no gaps.
CREATE TABLE annal_events (
    position       INTEGER PRIMARY KEY,
    event_id       BLOB    NOT NULL,
    stream         TEXT    NOT NULL,
    category       TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    data           TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    -- Microseconds since the Unix epoch, UTC.
    recorded_at    INTEGER NOT NULL,
    -- The optimistic-concurrency check and the idempotency key are unique keys.
    CONSTRAINT annal_events_stream_version UNIQUE (stream, version),
    CONSTRAINT annal_events_event_id UNIQUE (event_id)
);

CREATE INDEX annal_events_category ON annal_events (category, position);
CREATE INDEX annal_events_event_type ON annal_events (event_type, position);
