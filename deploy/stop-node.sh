#!/usr/bin/env bash
# Stop the Ray node this machine runs for dpfl.
#
# With RAY_TEMP_DIR set (the same value given to start-head.sh / start-worker.sh) only the
# Ray processes of that temp dir and their process groups are stopped, so other Ray users of
# the machine are left alone. Without it, `ray stop` stops EVERY Ray process of this machine:
# use that only on machines dedicated to the cluster.
set -euo pipefail
if [[ -z "${RAY_TEMP_DIR:-}" ]]; then
  exec ray stop
fi
pids=$(pgrep -f -- "$RAY_TEMP_DIR" || true)
[[ -z "$pids" ]] && { echo "no Ray process uses $RAY_TEMP_DIR"; exit 0; }
pgids=$(for p in $pids; do ps -o pgid= -p "$p" 2>/dev/null; done | sort -u)
for g in $pgids; do kill -TERM -- "-$g" 2>/dev/null || true; done
sleep 5
for g in $pgids; do kill -KILL -- "-$g" 2>/dev/null || true; done
for p in $(pgrep -f -- "$RAY_TEMP_DIR" || true); do kill -KILL "$p" 2>/dev/null || true; done
echo "stopped the Ray node of $RAY_TEMP_DIR"
