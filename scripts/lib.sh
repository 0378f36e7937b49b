# shellcheck shell=bash
#
# scripts/lib.sh - helpers shared by scripts/*.sh and .ci/run. Sourced, never run.
#
# Provides:
#   log / warn / die              one-line messages on stderr
#   repo_root                     absolute path of the repository
#   url_host_port URL DEFPORT     "host port" parsed from a postgres:// or redis:// URL
#   postgres_up / redis_up        is the server in DATABASE_URL / REDIS_URL answering?
#   ensure_postgres MODE          MODE=check: fail with the start command;
#   ensure_redis MODE                   start: start it when local (default port)
#                                       and the start command exists, then wait
#   ensure_database               create the database named in DATABASE_URL if missing
#   cargo_target_dir              where cargo puts binaries (honours CARGO_TARGET_DIR)
#   wait_until SECS DESC CMD...   poll CMD until it succeeds or SECS pass
#
# Env knobs: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/orders),
# REDIS_URL (default redis://127.0.0.1:6379), SERVICE_WAIT_SECS (default 30).

: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/orders}"
: "${REDIS_URL:=redis://127.0.0.1:6379}"
: "${SERVICE_WAIT_SECS:=30}"
export DATABASE_URL REDIS_URL

# The commands that start the machine's own PostgreSQL and Redis (Debian packages).
# Printed verbatim in messages; run by start_postgres / start_redis.
# shellcheck disable=SC2016 # printed for the user to run, not expanded here
PG_START_CMD='pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
REDIS_START_CMD='redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'

log() { printf '%s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

repo_root() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    (cd "$here/.." && pwd)
}

# url_host_port URL DEFAULT_PORT -> prints "host port".
# Handles scheme://[user[:pass]@]host[:port][/path][?query] and [v6]:port.
url_host_port() {
    local url="$1" default_port="$2" rest host port
    rest="${url#*://}"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    rest="${rest##*@}"
    if [[ "$rest" == \[* ]]; then
        host="${rest%%]*}"
        host="${host#[}"
        port="${rest##*]}"
        port="${port#:}"
    elif [[ "$rest" == *:* ]]; then
        host="${rest%%:*}"
        port="${rest##*:}"
    else
        host="$rest"
        port=""
    fi
    printf '%s %s\n' "${host:-127.0.0.1}" "${port:-$default_port}"
}

is_local_host() {
    case "$1" in
        127.* | localhost | ::1 | 0.0.0.0 | "") return 0 ;;
        *) return 1 ;;
    esac
}

# tcp_open HOST PORT: can a TCP connection be opened (bash /dev/tcp, 2 s cap)?
tcp_open() {
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

postgres_up() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -t 2 -d "$DATABASE_URL" >/dev/null 2>&1
    else
        local hp
        read -r -a hp <<<"$(url_host_port "$DATABASE_URL" 5432)"
        tcp_open "${hp[0]}" "${hp[1]}"
    fi
}

redis_up() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(timeout 3 redis-cli --no-auth-warning -u "$REDIS_URL" ping 2>/dev/null)" == PONG ]]
    else
        local hp
        read -r -a hp <<<"$(url_host_port "$REDIS_URL" 6379)"
        tcp_open "${hp[0]}" "${hp[1]}"
    fi
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll every 0.5 s.
wait_until() {
    local secs="$1" desc="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${secs}s waiting for $desc"
            return 1
        fi
        sleep 0.5
    done
}

start_postgres() {
    local confs=(/etc/postgresql/*/main)
    if [[ ! -d "${confs[-1]}" ]] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
        return 1
    fi
    local version
    version="$(basename "$(dirname "${confs[-1]}")")"
    log "starting PostgreSQL $version: pg_ctlcluster --skip-systemctl-redirect $version main start"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
}

start_redis() {
    command -v redis-server >/dev/null 2>&1 || return 1
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    log "starting Redis: $REDIS_START_CMD"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log >&2
}

# ensure_postgres check|start
ensure_postgres() {
    local mode="${1:-check}" hp
    postgres_up && return 0
    read -r -a hp <<<"$(url_host_port "$DATABASE_URL" 5432)"
    # The start command serves the default port only.
    if [[ "$mode" == start && "${hp[1]}" == 5432 ]] && is_local_host "${hp[0]}" && start_postgres; then
        wait_until "$SERVICE_WAIT_SECS" "PostgreSQL at ${hp[0]}:${hp[1]}" postgres_up && return 0
    fi
    log "PostgreSQL is not reachable at ${hp[0]}:${hp[1]} (DATABASE_URL); start it with: $PG_START_CMD"
    return 1
}

# ensure_redis check|start
ensure_redis() {
    local mode="${1:-check}" hp
    redis_up && return 0
    read -r -a hp <<<"$(url_host_port "$REDIS_URL" 6379)"
    if [[ "$mode" == start && "${hp[1]}" == 6379 ]] && is_local_host "${hp[0]}" && start_redis; then
        wait_until "$SERVICE_WAIT_SECS" "Redis at ${hp[0]}:${hp[1]}" redis_up && return 0
    fi
    log "Redis is not reachable at ${hp[0]}:${hp[1]} (REDIS_URL); start it with: $REDIS_START_CMD"
    return 1
}

# Creates the database named in DATABASE_URL when it does not exist (best effort:
# needs psql). sqlx::test connects to DATABASE_URL to create its per-test databases,
# so that database must exist before the tests run.
ensure_database() {
    command -v psql >/dev/null 2>&1 || return 0
    local base="${DATABASE_URL%%\?*}" query=""
    [[ "$DATABASE_URL" == *\?* ]] && query="?${DATABASE_URL#*\?}"
    local db="${base##*/}"
    local admin_url="${base%/*}/postgres${query}"
    [[ -n "$db" && "$db" =~ ^[A-Za-z0-9_]+$ ]] || return 0
    if [[ "$(psql "$admin_url" -XtAc "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>/dev/null)" != 1 ]]; then
        log "creating database $db"
        psql "$admin_url" -Xqc "CREATE DATABASE \"$db\"" >/dev/null 2>&1 ||
            warn "could not create database $db (it may have been created concurrently)"
    fi
}

# Where cargo writes build output: CARGO_TARGET_DIR when set (relative to the
# repository root, like cargo), else <repo>/target.
cargo_target_dir() {
    local root dir
    root="$(repo_root)"
    dir="${CARGO_TARGET_DIR:-$root/target}"
    [[ "$dir" == /* ]] || dir="$root/$dir"
    printf '%s\n' "$dir"
}
