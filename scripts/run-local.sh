#!/usr/bin/env bash
#
# scripts/run-local.sh - run the whole order system on this machine, in the foreground.
#
# 1. checks that PostgreSQL and Redis answer (prints the command to start them if not)
# 2. builds the binaries (cargo build --bins; debug unless RELEASE=1)
# 3. runs `command-service migrate` once
# 4. starts command-service (:8080), two projectors (:8082, :8083, consumers
#    local-1 and local-2) and query-service (:8081), logs in .local/logs/*.log
# 5. waits until every /readyz answers 200, then prints where everything listens
# 6. Ctrl-C (or SIGTERM) stops every process it started, and waits for them
#
# Env knobs:
#   DATABASE_URL       default postgres://postgres@127.0.0.1:5432/orders
#   REDIS_URL          default redis://127.0.0.1:6379
#   CARGO_TARGET_DIR   cargo's target directory (default <repo>/target)
#   RELEASE=1          release build instead of debug
#   SKIP_BUILD=1       use the binaries already in the target directory
#   RUST_LOG           default info;  LOG_FORMAT  default pretty
#   API_TOKEN          passed through: when set, requests need `Authorization: Bearer ...`
#   READY_TIMEOUT      seconds to wait for every /readyz (default 90)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(repo_root)"
cd "$ROOT"

: "${RELEASE:=0}"
: "${SKIP_BUILD:=0}"
: "${READY_TIMEOUT:=90}"
: "${RUST_LOG:=info}"
: "${LOG_FORMAT:=pretty}"
export RUST_LOG LOG_FORMAT

LOG_DIR="$ROOT/.local/logs"

# name | listen address | extra env (space-separated KEY=VALUE)
SERVICES=(
    "command-service|0.0.0.0:8080|"
    "projector-1|0.0.0.0:8082|PROJECTOR_CONSUMER_NAME=local-1"
    "projector-2|0.0.0.0:8083|PROJECTOR_CONSUMER_NAME=local-2"
    "query-service|0.0.0.0:8081|"
)

# --- 1. prerequisites ------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo is not installed (https://rustup.rs)"
command -v curl >/dev/null 2>&1 || die "curl is not installed (apt-get install curl)"
ok=1
ensure_postgres check || ok=0
ensure_redis check || ok=0
((ok)) || exit 1

for spec in "${SERVICES[@]}"; do
    IFS='|' read -r name addr _ <<<"$spec"
    port="${addr##*:}"
    if tcp_open 127.0.0.1 "$port"; then
        die "port $port (for $name) is already in use: is another run-local.sh still running?"
    fi
done

# --- 2. build ----------------------------------------------------------------------
profile=debug
build_args=(build --bins)
if [[ "$RELEASE" == 1 ]]; then
    profile=release
    build_args+=(--release)
fi
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "==> cargo ${build_args[*]}"
    cargo "${build_args[@]}"
fi
BIN="$(cargo_target_dir)/$profile"
for b in command-service query-service projector; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b was not built (is CARGO_TARGET_DIR the same as for the build?)"
done

mkdir -p "$LOG_DIR"
# Keep the logs out of git without touching the repository's .gitignore.
printf '*\n' >"$ROOT/.local/.gitignore"

# --- 3. migrations -------------------------------------------------------------
log "==> command-service migrate (log: .local/logs/migrate.log)"
if ! "$BIN/command-service" migrate >"$LOG_DIR/migrate.log" 2>&1; then
    log "error: migrations failed; last lines of .local/logs/migrate.log:"
    tail -n 30 "$LOG_DIR/migrate.log" >&2
    exit 1
fi

# --- 4. start the services -------------------------------------------------------
PIDS=()
NAMES=()

# shellcheck disable=SC2317,SC2329 # invoked from the traps below
stop_all() {
    local pid
    ((${#PIDS[@]})) || return 0
    log "==> stopping ${NAMES[*]}"
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give them the same 30 s a container gets, then force.
    local deadline=$((SECONDS + 30))
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    log "==> stopped"
}
# shellcheck disable=SC2317,SC2329 # invoked from the trap below
on_signal() {
    trap - INT TERM
    stop_all
    exit 0
}
trap on_signal INT TERM
trap stop_all EXIT

for spec in "${SERVICES[@]}"; do
    IFS='|' read -r name addr extra <<<"$spec"
    binary="${name%-[0-9]}"
    read -r -a extra_env <<<"$extra"
    log "==> starting $name on $addr (log: .local/logs/$name.log)"
    env LISTEN_ADDR="$addr" SKIP_MIGRATIONS=true "${extra_env[@]}" \
        "$BIN/$binary" >"$LOG_DIR/$name.log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
done

# --- 5. wait for readiness ------------------------------------------------------
ready() { [[ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1")" == 200 ]]; }

deadline=$((SECONDS + READY_TIMEOUT))
for i in "${!SERVICES[@]}"; do
    IFS='|' read -r name addr _ <<<"${SERVICES[$i]}"
    url="http://127.0.0.1:${addr##*:}/readyz"
    until ready "$url"; do
        failure=""
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            failure="$name exited before becoming ready"
        elif ((SECONDS >= deadline)); then
            failure="$name did not answer 200 on $url within ${READY_TIMEOUT}s"
        fi
        if [[ -n "$failure" ]]; then
            log "error: $failure; last lines of .local/logs/$name.log:"
            tail -n 30 "$LOG_DIR/$name.log" >&2
            exit 1
        fi
        sleep 0.5
    done
done

# --- 6. report and wait -----------------------------------------------------------
customer_id="$(cat /proc/sys/kernel/random/uuid 2>/dev/null ||
    python3 -c 'import uuid; print(uuid.uuid4())')"
cat <<EOF

The order system is running (${profile} build, logs in .local/logs/):
  command-service  http://localhost:8080   write API   (/openapi.json, /metrics)
  query-service    http://localhost:8081   read API    (/openapi.json, /metrics)
  projector 1      http://localhost:8082   consumer local-1 (/readyz, /metrics)
  projector 2      http://localhost:8083   consumer local-2 (/readyz, /metrics)

Try:
  curl -s -X POST localhost:8080/orders -H 'content-type: application/json' \\
    -d '{"customer_id":"${customer_id}","currency":"EUR"}'
  scripts/demo.sh        # drives a few orders through their whole life

Press Ctrl-C to stop everything.
EOF

# Wake up when any child exits (or on a signal): one service dying stops the rest.
set +e
wait -n "${PIDS[@]}"
status=$?
set -e
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        name="${NAMES[$i]}"
        log "error: $name exited (status $status); last lines of .local/logs/$name.log:"
        tail -n 30 "$LOG_DIR/$name.log" >&2
        break
    fi
done
exit 1
