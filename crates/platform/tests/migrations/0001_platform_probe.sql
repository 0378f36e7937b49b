-- Test-only migration for platform's db::connect tests: proves the migrator runs on a fresh database.
CREATE TABLE platform_probe (
    id integer PRIMARY KEY
);
