SET plan_cache_mode = force_custom_plan;
PREPARE m(text, int8, text) AS
WITH cp AS (SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE SKIP LOCKED),
target AS MATERIALIZED (SELECT cp.position AS start, COALESCE((SELECT e.global_position FROM events e
         WHERE e.global_position > cp.position
           AND e.global_position <= cp.position + $2
           AND NOT COALESCE(
               (SELECT ps.version >= e.stream_version
                       OR COALESCE(ps.parked_version <= e.stream_version, false)
                FROM projection_streams ps
                WHERE ps.projection = $1 AND ps.stream_id = e.stream_id),
               false)
         ORDER BY e.global_position LIMIT 1) - 1, GREATEST(cp.position, LEAST((SELECT max(global_position) FROM events),
                                            cp.position + $2))) AS position FROM cp),
moved AS (UPDATE projection_checkpoints c SET position = t.position, updated_at = now() FROM target t
          WHERE c.projection = $1 AND t.position > t.start RETURNING c.position)
SELECT position, pg_notify($3, $1 || ':' || position) FROM moved;
-- Warm the session's caches first, as a projector's long-lived session is.
EXPLAIN (ANALYZE, SUMMARY, COSTS OFF) EXECUTE m('order_summaries', 10000, 'x');
-- The mark 20 events back: this execution moves it, the next finds nothing to move.
BEGIN;
UPDATE projection_checkpoints SET position = position - 20 WHERE projection = 'order_summaries';
EXPLAIN (ANALYZE, SUMMARY, COSTS OFF) EXECUTE m('order_summaries', 10000, 'x');
EXPLAIN (ANALYZE, SUMMARY, COSTS OFF) EXECUTE m('order_summaries', 10000, 'x');
ROLLBACK;
-- What it returns: the mark it moves to, from 20 events back, on this database.
SELECT (SELECT count(*) FROM order_summaries) AS orders, (SELECT count(*) FROM events) AS events;
BEGIN;
UPDATE projection_checkpoints SET position = position - 20 WHERE projection = 'order_summaries'
RETURNING position AS mark_before;
EXECUTE m('order_summaries', 10000, 'x');
ROLLBACK;
