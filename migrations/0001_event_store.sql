-- The event store: the append-only log of every event of every stream, and the source of truth
-- for everything else (Redis and the read models can be rebuilt from it).
--
-- Only the `store` crate writes these tables. Appends run under one transaction-scoped advisory
-- lock (see crates/store/src/append.rs), which is what makes `global_position` dense and equal to
-- commit order: a reader that sees position N has already been able to see every position below N.

CREATE TABLE events (
    -- Position in the global log: 1, 2, 3, ... with no gaps, assigned under the append lock.
    global_position bigint      PRIMARY KEY CHECK (global_position >= 1),
    -- Client-visible identity of the event; appending an existing id is recognised as a retry.
    event_id        uuid        NOT NULL UNIQUE,
    -- `order-<uuid>` for orders.
    stream_id       text        NOT NULL,
    -- 1, 2, 3, ... within a stream. The unique constraint below is the optimistic-concurrency
    -- backstop: two writers can never both own a version.
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    event_type      text        NOT NULL,
    -- Version of the payload's shape for its event_type; readers upcast older versions.
    schema_version  integer     NOT NULL CHECK (schema_version >= 1),
    data            jsonb       NOT NULL,
    -- correlation_id, causation_id, command_id, actor, traceparent.
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Wall-clock time of the insert (taken after the append lock, so it follows position order).
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

COMMENT ON TABLE events IS 'Append-only event log; rows are never updated or deleted.';

-- Rows are never updated or deleted: make the database refuse it, not just the code.
CREATE FUNCTION events_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- The latest snapshot of a stream's folded state, taken every N events. A snapshot is only a
-- cache: loading ignores one whose state_schema_version differs from the running code's.
CREATE TABLE snapshots (
    stream_id            text        PRIMARY KEY,
    stream_version       bigint      NOT NULL CHECK (stream_version >= 1),
    state_schema_version integer     NOT NULL,
    state                jsonb       NOT NULL,
    taken_at             timestamptz NOT NULL DEFAULT now()
);

-- Responses of commands sent with an `Idempotency-Key`, written in the same transaction as the
-- command's events, so a retry after a crash still finds the first answer.
CREATE TABLE idempotency_keys (
    idempotency_key text        PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- SHA-256 of method, path and body: the same key with another request is refused.
    request_hash    bytea       NOT NULL,
    response_status smallint    NOT NULL,
    response_body   jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Expiry of old keys scans by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
