-- Read models and the projector's bookkeeping. Only the projector writes these tables; the
-- query service only reads them. Every row here can be rebuilt from `events` alone.

-- Per projection and stream: the version of the last event applied. This is the guard that makes
-- application exactly-once and in order: an event is applied only when it is exactly the next
-- version; an older one is a duplicate, a newer one first pulls the missing ones from `events`.
CREATE TABLE projection_streams (
    projection     text   NOT NULL,
    stream_id      text   NOT NULL,
    version        bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    -- Set when the event at this version was dead-lettered: later events of the stream are held
    -- back (never applied out of order) until it is replayed or skipped.
    parked_version bigint,
    parked_error   text,
    PRIMARY KEY (projection, stream_id)
);

-- Streams held back, for operators and the sweeper.
CREATE INDEX projection_streams_parked ON projection_streams (projection)
    WHERE parked_version IS NOT NULL;

-- Per projection: the low-water mark. Every event with global_position <= position has been
-- applied (or dead-lettered and held back). Advanced by one sweeper per projection; served as
-- `X-Projection-Position` and awaited by read-your-writes requests.
CREATE TABLE projection_checkpoints (
    projection text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The `order_summaries` projection: one row per order, exactly the shared summary fold.
CREATE TABLE order_summaries (
    order_id         uuid        PRIMARY KEY,
    customer_id      uuid        NOT NULL,
    status           text        NOT NULL
        CHECK (status IN ('draft', 'placed', 'paid', 'shipped', 'cancelled')),
    currency         char(3)     NOT NULL,
    -- [{"sku", "quantity", "unit_price"}] in the order lines were first added.
    items            jsonb       NOT NULL DEFAULT '[]'::jsonb,
    total            bigint      NOT NULL,
    item_count       integer     NOT NULL,
    version          bigint      NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- Global position of the OrderCreated event: the unique, immutable key of the newest-first
    -- keyset paging of `GET /orders`, so a page boundary never moves while orders are created.
    created_position bigint      NOT NULL UNIQUE
);

-- `GET /orders?customer_id=` and `GET /orders?status=`, newest first.
CREATE INDEX order_summaries_customer ON order_summaries (customer_id, created_position DESC);
CREATE INDEX order_summaries_status ON order_summaries (status, created_position DESC);

-- The `customer_stats` projection: per customer, counts by status and money spent.
CREATE TABLE customer_stats (
    customer_id     uuid        PRIMARY KEY,
    order_count     bigint      NOT NULL DEFAULT 0,
    -- Sum of the totals of paid and shipped orders, in minor units.
    total_spent     bigint      NOT NULL DEFAULT 0,
    draft_count     bigint      NOT NULL DEFAULT 0,
    placed_count    bigint      NOT NULL DEFAULT 0,
    paid_count      bigint      NOT NULL DEFAULT 0,
    shipped_count   bigint      NOT NULL DEFAULT 0,
    cancelled_count bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The customer_stats projection's own memory of each order (status and total), so it can move
-- an order between status counts without reading another projection's table.
CREATE TABLE customer_stats_orders (
    order_id    uuid   PRIMARY KEY,
    customer_id uuid   NOT NULL,
    status      text   NOT NULL,
    total       bigint NOT NULL
);
