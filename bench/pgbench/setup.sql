-- 1,000 streams of 30 events of about 300 bytes, no snapshots.
INSERT INTO annal_events (event_id, stream, version, category, event_type, schema_version, data, metadata)
SELECT gen_random_uuid(), 'c-' || (g % 1000), g / 1000, 'c', 'Incremented', 1, jsonb_build_object('by', 1, 'pad', repeat('x', 267)), '{}'
FROM generate_series(0, 29999) g;
ANALYZE;
