#!/bin/bash
# Samples the projector's counters every 3 s while any projector runs from $1 (a bin dir).
dir=$1; out=$2
while true; do
  for pid in $(pgrep -f "^$dir/projector" ); do
    port=$(ss -ltnpH 2>/dev/null | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://' | head -1)
    [ -z "$port" ] && continue
    m=$(curl -s --max-time 2 http://127.0.0.1:$port/metrics | grep -E '^projector_(duplicates_total|events_applied_total|sweeper_healed_events_total)' | tr '\n' ' ')
    echo "$(date +%H:%M:%S) pid=$pid port=$port $m" >> $out
  done
  sleep 3
done
