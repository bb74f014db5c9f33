-- Each event carries its stream's hash (see `partition_of`), so that a partitioned consumer
-- selects its own streams in the database instead of reading every event. Rows written before
-- this column existed are filled in by the store when it opens; the partial index finds them
-- (and is empty, so free, once they are done).
ALTER TABLE annal_events ADD COLUMN stream_hash bigint;
CREATE INDEX annal_events_unhashed ON annal_events (stream) WHERE stream_hash IS NULL;
