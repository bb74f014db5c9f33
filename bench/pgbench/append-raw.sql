-- A plain INSERT of one row, as the benchmark's baseline writes it.
\set v :v + 1
INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) SELECT * FROM unnest(ARRAY[gen_random_uuid()], ARRAY['r-' || :run || '-' || :client_id], ARRAY['r'], ARRAY[:v::int8], ARRAY['Deposited'], ARRAY[1], ARRAY['{"amount": 100, "note": "a deposit of some money into the account"}'::jsonb], ARRAY['{"correlation_id": "6a1f3c2e-1111-4222-8333-944455556666"}'::jsonb]);
