#!/usr/bin/env bash
#
# scripts/bench.sh - reproduce every figure in BENCHMARKS.md with one command.
#
# Builds the release binaries (the three services and the bench tool), then runs
# `bench all --spawn`: the tool starts the services itself on free loopback ports, each
# scenario against a fresh scratch database (bench_<run>_*) and a private Redis stream key
# (bench-<run>-*), and drops them at the end. Needs the PostgreSQL and Redis the tool
# uses (BENCH_POSTGRES_URL, BENCH_REDIS_URL): checked first, and started when they are
# the machine's own and down (as scripts/run-local.sh does); left running afterwards.
#
# Usage: scripts/bench.sh [extra bench flags...]
#   e.g. scripts/bench.sh --level-secs 5 --rebuild-events 300000
# Env: BENCH_OUT (default docs/bench/results.json), BENCH_SVG (default
#      docs/bench/latency-throughput.svg), BENCH_SKIP_BUILD=1 to reuse built binaries,
#      CARGO_TARGET_DIR,
#      BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres: the server
#        of the scratch databases, through a database that exists),
#      BENCH_REDIS_URL (default redis://127.0.0.1:6379).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="$(repo_root)"
cd "$root"

# The tool's own defaults (crates/bench/src/cli.rs), exported so that the servers checked
# here are the ones it uses.
: "${BENCH_POSTGRES_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
: "${BENCH_REDIS_URL:=redis://127.0.0.1:6379}"
export BENCH_POSTGRES_URL BENCH_REDIS_URL

# lib.sh's checks read DATABASE_URL and REDIS_URL: given the tool's URLs here.
DATABASE_URL="$BENCH_POSTGRES_URL" ensure_postgres start ||
    die "the bench needs the PostgreSQL server of BENCH_POSTGRES_URL"
REDIS_URL="$BENCH_REDIS_URL" ensure_redis start ||
    die "the bench needs the Redis server of BENCH_REDIS_URL"

target_dir="$(cargo_target_dir)"
if [[ "${BENCH_SKIP_BUILD:-0}" != "1" ]]; then
    log "building release binaries into $target_dir/release (slow on 2 cores)"
    cargo build --release -p command-service -p query-service -p projector -p bench
fi

out="${BENCH_OUT:-docs/bench/results.json}"
svg="${BENCH_SVG:-docs/bench/latency-throughput.svg}"
mkdir -p "$(dirname "$out")" "$(dirname "$svg")"

log "running bench all (five to six minutes on 2 cores)"
"$target_dir/release/bench" all --spawn \
    --bin-dir "$target_dir/release" \
    --out "$out" --svg "$svg" "$@" | tee "${out%.json}.md"
