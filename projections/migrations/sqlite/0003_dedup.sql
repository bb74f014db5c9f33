-- Event ids an at-least-once consumer has handled, kept for a retention window.
-- Times are microseconds since the Unix epoch, UTC.
CREATE TABLE annal_dedup (
    consumer    TEXT    NOT NULL,
    event_id    BLOB    NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX annal_dedup_age ON annal_dedup (consumer, recorded_at);
