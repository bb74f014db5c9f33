-- The page read alone (what a load without snapshots runs).
\set s random(0, 999)
SELECT tx_id, seq, event_id, stream, version, event_type, schema_version, data::text AS data, metadata::text AS metadata, recorded_at FROM annal_events WHERE stream = 'c-' || :s AND version >= 0 ORDER BY version LIMIT 512;
