-- The outbox relay's durable progress: the highest global position known to be on the Redis
-- stream. Owned by command-service's relay; one row per published stream key.
CREATE TABLE relay_checkpoints (
    stream_key text        PRIMARY KEY,
    position   bigint      NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
