-- Event ids an at-least-once consumer has handled, kept for a retention window.
CREATE TABLE annal_dedup (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX annal_dedup_age ON annal_dedup (consumer, recorded_at);
