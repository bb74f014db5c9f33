-- Where each projection (and partition) has got to in the global order.
CREATE TABLE annal_checkpoints (
    projection       text        NOT NULL,
    partition        integer     NOT NULL,
    position_tx      bigint      NOT NULL,
    position_seq     bigint      NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When the last event applied was recorded: the base of "seconds behind".
    last_recorded_at timestamptz,
    PRIMARY KEY (projection, partition)
);

-- Events a projection gave up on after its retries, kept with the error.
CREATE TABLE annal_dead_letters (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection   text        NOT NULL,
    partition    integer     NOT NULL,
    event_id     uuid        NOT NULL,
    stream       text        NOT NULL,
    version      bigint      NOT NULL,
    position_tx  bigint      NOT NULL,
    position_seq bigint      NOT NULL,
    error        text        NOT NULL,
    attempts     integer     NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT annal_dead_letters_event UNIQUE (projection, event_id)
);

CREATE INDEX annal_dead_letters_stream ON annal_dead_letters (projection, stream, version);
