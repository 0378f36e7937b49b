#!/usr/bin/env bash
#
# scripts/test.sh - run the whole test suite against real PostgreSQL and Redis.
#
# Needs cargo-nextest (cargo install cargo-nextest --locked): tests read
# process-global metrics, so each needs a process of its own, which nextest gives.
# Makes sure PostgreSQL and Redis answer (starting the machine's own servers when
# they are down and local, else printing the command to start them), creates the
# database named in DATABASE_URL if missing (sqlx::test creates its per-test
# databases through it), builds the three service binaries (the end-to-end tests
# run them as processes, and a test run of some packages alone would not build
# them), then runs
#   cargo nextest run --workspace --no-fail-fast "$@"
# Extra arguments go to the test runner; with -p/--package they choose the packages
# instead of --workspace (e.g. scripts/test.sh -p store, scripts/test.sh -p e2e).
# --release and --cargo-profile apply to the binaries' build too.
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
cargo nextest --version >/dev/null 2>&1 ||
    die "cargo-nextest is required (cargo install cargo-nextest --locked): each test needs a process of its own"
ok=1
ensure_postgres start || ok=0
ensure_redis start || ok=0
((ok)) || exit 1
ensure_database

if [[ -d .sqlx && -z "${SQLX_OFFLINE:-}" ]]; then
    export SQLX_OFFLINE=true
fi

# What the runner's arguments say about the packages and the profile of the build.
select=(--workspace)
build=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --) break ;;
        -p | -p?* | --package | --package=*) select=() ;;
        -r | --release) build+=(--release) ;;
        --cargo-profile) build+=(--profile "${args[i + 1]:-}") ;;
        --cargo-profile=*) build+=(--profile "${args[i]#--cargo-profile=}") ;;
    esac
done

log "==> building the service binaries"
cargo build "${build[@]}" -p command-service -p query-service -p projector --bins
exec cargo nextest run "${select[@]}" --no-fail-fast "$@"
