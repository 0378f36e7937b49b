#!/usr/bin/env bash
#
# scripts/demo.sh - a guided tour of the running system (start it first with
# scripts/run-local.sh, or docker compose up).
#
# Drives orders through their life with curl: one created, filled, placed, paid
# and shipped; one cancelled; one paid. Then shows the read model (waiting for
# the write with ?min_position=), the audit history, time travel to version 2,
# the customer's statistics, and finally produces a dead letter by injecting an
# undecodable entry into the event stream, waits for the projector to
# dead-letter it, and prints how to inspect it.
#
# Needs curl, python3 (JSON parsing: no jq) and, for the dead-letter part, redis-cli.
#
# Env knobs:
#   COMMAND_URL        default http://localhost:8080
#   QUERY_URL          default http://localhost:8081
#   API_TOKEN          bearer token, when the services require one
#   REDIS_URL          default redis://127.0.0.1:6379
#   EVENT_STREAM       default es:events
#   DLQ_GROUP          projection whose dead letters are watched (order_summaries)
#   DLQ_WAIT_SECS      how long to wait for the dead letter (default 90)
#   SKIP_DLQ=1         skip the dead-letter part
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${COMMAND_URL:=http://localhost:8080}"
: "${QUERY_URL:=http://localhost:8081}"
: "${EVENT_STREAM:=es:events}"
: "${DLQ_GROUP:=order_summaries}"
: "${DLQ_WAIT_SECS:=90}"
: "${SKIP_DLQ:=0}"
COMMAND_URL="${COMMAND_URL%/}"
QUERY_URL="${QUERY_URL%/}"

command -v curl >/dev/null 2>&1 || die "curl is not installed"
command -v python3 >/dev/null 2>&1 || die "python3 is not installed (used to read JSON)"

AUTH=()
if [[ -n "${API_TOKEN:-}" ]]; then
    AUTH=(-H "Authorization: Bearer $API_TOKEN")
fi

for url in "$COMMAND_URL" "$QUERY_URL"; do
    if [[ "$(curl -s -o /dev/null -m 3 -w '%{http_code}' "$url/readyz")" != 200 ]]; then
        die "$url/readyz is not 200: start the system first with scripts/run-local.sh"
    fi
done

BODY_FILE="$(mktemp)"
trap 'rm -f "$BODY_FILE"' EXIT

# json FIELD [JSON]: prints a top-level field of a JSON document (stdin or $2).
json() {
    local doc
    if (($# > 1)); then doc="$2"; else doc="$(cat)"; fi
    python3 -c '
import json, sys
v = json.loads(sys.argv[2]).get(sys.argv[1])
print(json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v))
' "$1" "$doc"
}

pretty() { python3 -m json.tool 2>/dev/null || cat; }

new_uuid() {
    cat /proc/sys/kernel/random/uuid 2>/dev/null || python3 -c 'import uuid; print(uuid.uuid4())'
}

# call METHOD URL [JSON]: prints the response body; dies on a non-2xx status.
call() {
    local method="$1" url="$2" data="${3:-}" status
    local args=(-s -m 10 -o "$BODY_FILE" -w '%{http_code}' -X "$method" "${AUTH[@]}")
    if [[ -n "$data" ]]; then
        args+=(-H 'content-type: application/json' -d "$data")
    fi
    status="$(curl "${args[@]}" "$url")" || die "$method $url: no response"
    if [[ "$status" != 2* ]]; then
        log "error: $method $url -> $status"
        pretty <"$BODY_FILE" >&2
        exit 1
    fi
    cat "$BODY_FILE"
}

LAST_POSITION=0
# cmd DESCRIPTION METHOD PATH [JSON]: a write; prints one line, remembers the position.
cmd() {
    local desc="$1" method="$2" path="$3" data="${4:-}" body
    body="$(call "$method" "$COMMAND_URL$path" "$data")"
    LAST_POSITION="$(json position "$body")"
    printf '  %-34s -> version %s, position %s\n' "$desc" "$(json version "$body")" "$LAST_POSITION"
}

section() { printf '\n== %s\n' "$*"; }

customer="$(new_uuid)"

section "Order A: create, add items, place, pay, ship (customer $customer)"
order_a="$(new_uuid)"
cmd "create" POST /orders "{\"customer_id\":\"$customer\",\"currency\":\"EUR\",\"order_id\":\"$order_a\"}"
position_a_created="$LAST_POSITION"
cmd "add 2 x SKU-KEYBOARD @ 49.99" POST "/orders/$order_a/items" '{"sku":"SKU-KEYBOARD","quantity":2,"unit_price":4999}'
cmd "add 1 x SKU-MOUSE @ 19.50" POST "/orders/$order_a/items" '{"sku":"SKU-MOUSE","quantity":1,"unit_price":1950}'
cmd "place" POST "/orders/$order_a/place"
cmd "pay 119.48" POST "/orders/$order_a/pay" '{"amount":11948,"payment_reference":"PAY-DEMO-A"}'
cmd "ship" POST "/orders/$order_a/ship" '{"carrier":"DHL","tracking_number":"DEMO-TRACK-A"}'
position_a="$LAST_POSITION"

section "Order B: create, add an item, cancel"
order_b="$(new_uuid)"
cmd "create" POST /orders "{\"customer_id\":\"$customer\",\"currency\":\"EUR\",\"order_id\":\"$order_b\"}"
cmd "add 1 x SKU-MONITOR @ 199.00" POST "/orders/$order_b/items" '{"sku":"SKU-MONITOR","quantity":1,"unit_price":19900}'
cmd "cancel" POST "/orders/$order_b/cancel" '{"reason":"customer changed their mind"}'

section "Order C: create, add an item, place, pay"
order_c="$(new_uuid)"
cmd "create" POST /orders "{\"customer_id\":\"$customer\",\"currency\":\"EUR\",\"order_id\":\"$order_c\"}"
cmd "add 3 x SKU-CABLE @ 5.00" POST "/orders/$order_c/items" '{"sku":"SKU-CABLE","quantity":3,"unit_price":500}'
cmd "place" POST "/orders/$order_c/place"
cmd "pay 15.00" POST "/orders/$order_c/pay" '{"amount":1500,"payment_reference":"PAY-DEMO-C"}'
last_position="$LAST_POSITION"

section "Read model of order A (waits until position $position_a is projected)"
echo "  GET $QUERY_URL/orders/$order_a?min_position=$position_a"
call GET "$QUERY_URL/orders/$order_a?min_position=$position_a" | pretty

section "Audit history of order A"
echo "  GET $QUERY_URL/orders/$order_a/events"
call GET "$QUERY_URL/orders/$order_a/events" | python3 -c '
import json, sys
for e in json.load(sys.stdin)["events"]:
    print("  v%-3s pos %-6s %-22s %s" % (e["version"], e["position"], e["event_type"], json.dumps(e["data"])))
'

section "Time travel: order A as of version 2"
echo "  GET $QUERY_URL/orders/$order_a/state?version=2"
call GET "$QUERY_URL/orders/$order_a/state?version=2" | pretty

section "Order B (cancelled)"
call GET "$QUERY_URL/orders/$order_b?min_position=$last_position" | python3 -c '
import json, sys
o = json.load(sys.stdin)
print("  %s: status %s, total %s" % (o["order_id"], o["status"], o["total"]))
'

section "Customer statistics (total_spent counts paid and shipped orders: 119.48 + 15.00)"
echo "  GET $QUERY_URL/customers/$customer?min_position=$last_position"
call GET "$QUERY_URL/customers/$customer?min_position=$last_position" | pretty

section "The customer's orders, newest first"
call GET "$QUERY_URL/orders?customer_id=$customer&limit=10&min_position=$last_position" | python3 -c '
import json, sys
for o in json.load(sys.stdin)["items"]:
    print("  %s  %-9s total %s" % (o["order_id"], o["status"], o["total"]))
'

section "The whole log, only the payments and shipments, from order A's creation on"
echo "  GET $QUERY_URL/events?event_type=OrderPaid,OrderShipped&after_position=$((position_a_created - 1))"
call GET "$QUERY_URL/events?event_type=OrderPaid,OrderShipped&after_position=$((position_a_created - 1))" | python3 -c '
import json, sys
page = json.load(sys.stdin)
for e in page["events"]:
    print("  pos %-6s %-13s %s" % (e["position"], e["event_type"], e["stream_id"]))
print("  read_to %s (resume with after_position=%s)" % (page["read_to"], page["read_to"]))
'
echo "  The same as a live stream: curl -N '$QUERY_URL/events/stream?event_type=OrderPaid,OrderShipped'"
echo "  Order A alone, its history then each new event: curl -N '$QUERY_URL/orders/$order_a/events/stream'"

if [[ "$SKIP_DLQ" == 1 ]]; then
    exit 0
fi

section "Dead letters: inject an undecodable entry into $EVENT_STREAM"
command -v redis-cli >/dev/null 2>&1 || die "redis-cli is not installed (apt-get install redis-tools)"
rcli() { redis-cli --no-auth-warning -u "$REDIS_URL" "$@"; }
dlq="$EVENT_STREAM:dlq:$DLQ_GROUP"
dlq_len() { rcli XLEN "$dlq" 2>/dev/null || echo 0; }
before="$(dlq_len)"
# Entry ids on this stream are `<global position>-0`. An injected entry must take the id right
# after the newest one (`<position>-1`): a `*` (time-based) id would sort above every future
# position and the relay could no longer publish (projectors would then heal from PostgreSQL,
# but only after their grace period).
newest_id="$(rcli XREVRANGE "$EVENT_STREAM" + - COUNT 1 | head -n 1)"
[[ -n "$newest_id" ]] || die "$EVENT_STREAM is empty: run the demo's orders first"
poison_id="${newest_id%-*}-$((${newest_id#*-} + 1))"
entry_id="$(rcli XADD "$EVENT_STREAM" "$poison_id" position not-a-number event_id demo-poison \
    stream_id order-demo-poison event_type Garbage data '{not json' metadata '{}')"
echo "  XADD $EVENT_STREAM $poison_id position not-a-number ... -> entry $entry_id"
echo "  waiting up to ${DLQ_WAIT_SECS}s for the projector to retry it and dead-letter it into $dlq"
# shellcheck disable=SC2317,SC2329 # called through wait_until
dlq_grew() { (($(dlq_len) > before)); }
if wait_until "$DLQ_WAIT_SECS" "a new entry in $dlq" dlq_grew; then
    echo "  dead-lettered; the newest entry of $dlq:"
    # Raw output is the entry id, then field and value lines in turn.
    rcli XREVRANGE "$dlq" + - COUNT 1 |
        awk 'NR == 1 { print "    id: " $0; next } NR % 2 == 0 { k = $0; next } { print "    " k ": " $0 }'
    dlq_status=0
else
    warn "no dead letter yet: is a projector running? (its log: .local/logs/projector-1.log)"
    dlq_status=1
fi

projector_bin="$(cargo_target_dir)/debug/projector"
[[ -x "$projector_bin" ]] || projector_bin="projector"
dlq_id="$(rcli XREVRANGE "$dlq" + - COUNT 1 | head -n 1)"
cat <<EOF

Where every projection stands (head, relay, lag, parked orders, dead letters, groups):
  $projector_bin status

Inspect and handle dead letters:
  redis-cli XRANGE $dlq - +
  redis-cli XLEN $dlq
  $projector_bin dlq list $DLQ_GROUP
  $projector_bin dlq show $DLQ_GROUP --id $dlq_id     # one entry as JSON
  $projector_bin dlq replay $DLQ_GROUP               # re-apply from the event store (after a fix)
  $projector_bin dlq purge $DLQ_GROUP --id $dlq_id    # drop it for good (this one can never succeed)
EOF
exit "$dlq_status"
