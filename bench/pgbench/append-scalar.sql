-- The one-event append statement (APPEND_ONE_EXACT): scalars, no arrays.
\set v :v + 1
\set b :v - 1
INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata, stream_hash) SELECT gen_random_uuid(), 's-' || :run || '-' || :client_id, 's', :b + 1, 'Deposited', 1, '{"amount": 100, "note": "a deposit of some money into the account"}'::text::jsonb, '{"correlation_id": "6a1f3c2e-1111-4222-8333-944455556666"}'::text::jsonb, 12345 WHERE :b < 0 OR EXISTS (SELECT 1 FROM annal_events WHERE stream = 's-' || :run || '-' || :client_id AND version = :b AND tx_id <= pg_current_xact_id()::text::bigint) RETURNING version, tx_id, seq;
