-- The partition count each projection's checkpoints were made with. A stream's partition is its
-- hash modulo the count, so checkpoints made with one count mean nothing under another: a
-- runner configured with a different count refuses to run the projection (changing it would
-- apply events twice or skip them) until it is rebuilt.
CREATE TABLE annal_partition_counts (
    projection text    PRIMARY KEY,
    partitions integer NOT NULL
);
