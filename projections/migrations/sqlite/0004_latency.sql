-- The commit-to-applied p99 latency the partition's runner last reported, for `annal-runner status`.
ALTER TABLE annal_checkpoints ADD COLUMN latency_p99_us INTEGER;
