-- Tables updated in place on every event or batch (the projector's bookkeeping and read models,
-- both checkpoints) keep free space in each page, so that an update can stay on its page as a
-- HOT update: no new index entries, and the old version is pruned when the page is next visited,
-- without waiting for VACUUM. With full pages every update moved the row to another page, left a
-- dead version and index entries behind, and a long load slowed every later one down (measured
-- in BENCHMARKS.md, on a server with autovacuum off). Takes effect for pages written from now on;
-- `VACUUM FULL <table>` rewrites an existing table with it.
ALTER TABLE projection_streams SET (fillfactor = 50);
ALTER TABLE projection_checkpoints SET (fillfactor = 50);
ALTER TABLE relay_checkpoints SET (fillfactor = 50);
ALTER TABLE customer_stats SET (fillfactor = 50);
ALTER TABLE customer_stats_orders SET (fillfactor = 70);
ALTER TABLE order_summaries SET (fillfactor = 70);
