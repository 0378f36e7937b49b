//! End-to-end tests live in `tests/`: they start `command-service`, two `projector`s and
//! `query-service` as real processes against a fresh database and a private stream key, drive
//! orders through the HTTP APIs and check the read models, so the wiring a user runs is the
//! wiring that is tested. This library is intentionally empty.
