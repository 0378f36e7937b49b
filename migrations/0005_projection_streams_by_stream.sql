-- `projection_streams` is only ever looked up by stream: a batch's streams (`stream_id = ANY`),
-- one stream per event in the sweep, an `UPDATE ... FROM UNNEST` join on the stream. With the
-- key led by `projection`, which has two values, the planner could serve those lookups by
-- reading every row of the projection and filtering, and did whenever it had no statistics for
-- the column (a new table, or a server without autovacuum): each apply batch then cost as much
-- as the number of orders ever projected (BENCHMARKS.md). Led by `stream_id`, the key gives it
-- no such plan: a lookup is a probe per stream, or a scan of the whole table when it is small.
ALTER TABLE projection_streams DROP CONSTRAINT projection_streams_pkey;
ALTER TABLE projection_streams ADD PRIMARY KEY (stream_id, projection);
