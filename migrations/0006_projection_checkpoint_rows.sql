-- Every projection's low-water mark exists from the start, at 0: apply transactions move it in
-- the same transaction as the rows they write (`FOR UPDATE SKIP LOCKED` on this row), which
-- needs the row to be there before the first apply, not only once a sweeper has run.
INSERT INTO projection_checkpoints (projection)
VALUES ('order_summaries'), ('customer_stats')
ON CONFLICT (projection) DO NOTHING;
