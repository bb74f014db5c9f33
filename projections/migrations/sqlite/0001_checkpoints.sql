-- Where each projection (and partition) has got to in the global order.
CREATE TABLE annal_checkpoints (
    projection       TEXT    NOT NULL,
    partition        INTEGER NOT NULL,
    position_tx      INTEGER NOT NULL,
    position_seq     INTEGER NOT NULL,
    -- Microseconds since the Unix epoch, UTC.
    updated_at       INTEGER NOT NULL,
    -- When the last event applied was recorded: the base of "seconds behind".
    last_recorded_at INTEGER,
    PRIMARY KEY (projection, partition)
);

-- Events a projection gave up on after its retries, kept with the error.
CREATE TABLE annal_dead_letters (
    id           INTEGER PRIMARY KEY,
    projection   TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    event_id     BLOB    NOT NULL,
    stream       TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    position_tx  INTEGER NOT NULL,
    position_seq INTEGER NOT NULL,
    error        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    parked_at    INTEGER NOT NULL,
    CONSTRAINT annal_dead_letters_event UNIQUE (projection, event_id)
);

CREATE INDEX annal_dead_letters_stream ON annal_dead_letters (projection, stream, version);
