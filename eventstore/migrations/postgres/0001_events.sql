-- The event log.
--
-- The global order is (tx_id, seq): the id of the transaction that wrote the event, then a
-- sequence number. Readers only return events whose transaction id is below the oldest
-- transaction still running (pg_snapshot_xmin), so a transaction that commits late can never
-- slip an event in behind a position a reader has already passed. See docs/ordering.md.
CREATE TABLE annal_events (
    tx_id          bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    seq            bigint      NOT NULL GENERATED ALWAYS AS IDENTITY,
    event_id       uuid        NOT NULL,
    stream         text        NOT NULL,
    category       text        NOT NULL,
    version        bigint      NOT NULL,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL,
    data           jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT annal_events_pkey PRIMARY KEY (tx_id, seq),
    -- The optimistic-concurrency check and the idempotency key are unique keys: a violation
    -- (SQLSTATE 23505) is how a conflict or a retried batch is detected.
    CONSTRAINT annal_events_stream_version UNIQUE (stream, version),
    CONSTRAINT annal_events_event_id UNIQUE (event_id)
);

CREATE INDEX annal_events_category ON annal_events (category, tx_id, seq);
CREATE INDEX annal_events_event_type ON annal_events (event_type, tx_id, seq);
