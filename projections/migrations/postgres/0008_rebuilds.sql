-- One rebuild record per projection: the last rebuild of it, written by the rebuilding process
-- (`annal-runner rebuild`) every second and read by `status` and the console. `updated_at` is
-- the server's clock at each write, so a record's age (and whether it is stale: running but not
-- written for `stale_after_ms`, its process died) is judged by one clock, not two machines'.
-- `outcome`: running, swapped_in, resumed, left_paused, failed (with `reason`), interrupted.
CREATE TABLE annal_rebuilds (
    projection     text             PRIMARY KEY,
    owner          text             NOT NULL,
    mode           text             NOT NULL,
    started_at     timestamptz      NOT NULL,
    updated_at     timestamptz      NOT NULL,
    total          bigint           NOT NULL DEFAULT 0,
    done           bigint           NOT NULL DEFAULT 0,
    rate           double precision NOT NULL DEFAULT 0,
    eta_seconds    double precision,
    outcome        text             NOT NULL,
    reason         text,
    stale_after_ms bigint           NOT NULL
);
