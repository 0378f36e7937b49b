#!/usr/bin/env bash
#
# scripts/bench.sh - reproduce every figure in BENCHMARKS.md with one command.
#
# Builds the release binaries (the three services and the bench tool), then runs
# `bench all --spawn`: the tool starts the services itself on free loopback ports, each
# scenario against a fresh scratch database (bench_<run>_*) and a private Redis stream key
# (bench-<run>-*), and drops them at the end. Needs the local PostgreSQL and Redis
# (started here when local and stopped, as scripts/run-local.sh does).
#
# Usage: scripts/bench.sh [extra bench flags...]
#   e.g. scripts/bench.sh --level-secs 5 --rebuild-events 300000
# Env: BENCH_OUT (default docs/bench/results.json), BENCH_SVG (default
#      docs/bench/latency-throughput.svg), BENCH_SKIP_BUILD=1 to reuse built binaries,
#      CARGO_TARGET_DIR, DATABASE_URL's server (via BENCH_POSTGRES_URL), REDIS_URL.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="$(repo_root)"
cd "$root"

ensure_postgres start
ensure_redis start

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
