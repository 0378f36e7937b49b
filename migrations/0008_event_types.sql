-- event_types: every event type some release has been able to write, one row per type. A
-- release that adds a type adds it here in the migration that ships with it; migrations run
-- before a release serves, so by the time an event of a new type can exist, its name is here.
--
-- Why: during a rollout, instances of the previous release still answer reads. A client of the
-- new release asking one of them for `GET /events?event_type=<the new type>` must get the
-- (possibly empty) log of that type, not 400 invalid_event_type, while a misspelt name is still
-- refused. An instance that does not know a name looks it up here (one primary-key probe)
-- instead of scanning `events`, which has no index on event_type.
--
-- Rows are never deleted: events of a type stay in the log after the code stops writing it.
CREATE TABLE event_types (
    event_type    text        PRIMARY KEY,
    registered_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO event_types (event_type) VALUES
    ('OrderCreated'),
    ('ItemAdded'),
    ('ItemRemoved'),
    ('OrderPlaced'),
    ('OrderPaid'),
    ('OrderShipped'),
    ('OrderCancelled');
