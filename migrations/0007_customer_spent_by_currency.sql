-- customer_stats: what each customer spent in each currency. `total_spent` adds totals in minor
-- units whatever their currency (the contract's figure); a customer ordering in EUR and USD needs
-- the sums kept apart to mean anything.

-- The projection's memory of each order now includes its currency. Orders remembered before
-- this migration take it from order_summaries; one that projection has not seen yet keeps ''
-- until `projector rebuild customer_stats` (`projector verify customer_stats` reports it).
ALTER TABLE customer_stats_orders ADD COLUMN currency text NOT NULL DEFAULT '';
UPDATE customer_stats_orders o
SET currency = trim(s.currency)
FROM order_summaries s
WHERE s.order_id = o.order_id;

-- Per customer and currency, the sum of the totals of paid and shipped orders, in minor units.
-- Applies add deltas to it, like customer_stats; a row may fall back to 0 (a paid order later
-- cancelled), and readers leave such rows out.
CREATE TABLE customer_stats_spent (
    customer_id uuid   NOT NULL,
    currency    text   NOT NULL,
    total_spent bigint NOT NULL,
    PRIMARY KEY (customer_id, currency)
) WITH (fillfactor = 70);

INSERT INTO customer_stats_spent (customer_id, currency, total_spent)
SELECT customer_id, currency, sum(total)
FROM customer_stats_orders
WHERE status IN ('paid', 'shipped')
GROUP BY customer_id, currency;
