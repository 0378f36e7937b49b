#!/usr/bin/env bash
#
# scripts/test.sh - run the whole test suite against real PostgreSQL and Redis.
#
# Makes sure PostgreSQL and Redis answer (starting the machine's own servers when
# they are down and local, else printing the command to start them), creates the
# database named in DATABASE_URL if missing (sqlx::test creates its per-test
# databases through it), then runs
#   cargo nextest run --workspace --no-fail-fast "$@"
# or `cargo test --workspace --no-fail-fast "$@"` where cargo-nextest is missing.
# Extra arguments go to the test runner (e.g. scripts/test.sh -p store).
#
# Env knobs:
#   DATABASE_URL       default postgres://postgres@127.0.0.1:5432/orders
#   REDIS_URL          default redis://127.0.0.1:6379
#   CARGO_TARGET_DIR   cargo's target directory (default <repo>/target)
#   SQLX_OFFLINE       defaults to true when a committed .sqlx/ exists, so that
#                      sqlx macros check against it instead of the live database
#   SERVICE_WAIT_SECS  how long to wait for a server that was just started (30)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$(repo_root)"

command -v cargo >/dev/null 2>&1 || die "cargo is not installed (https://rustup.rs)"
ok=1
ensure_postgres start || ok=0
ensure_redis start || ok=0
((ok)) || exit 1
ensure_database

if [[ -d .sqlx && -z "${SQLX_OFFLINE:-}" ]]; then
    export SQLX_OFFLINE=true
fi

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --no-fail-fast "$@"
fi
warn "cargo-nextest not found (cargo install cargo-nextest --locked); using cargo test"
exec cargo test --workspace --no-fail-fast "$@"
