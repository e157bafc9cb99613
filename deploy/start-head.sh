#!/usr/bin/env bash
# Start the Ray head of a dpfl cluster on this machine (a machine you own).
#
#   deploy/start-head.sh                       # port 6379, every CPU/GPU of this machine
#   NUM_CPUS=2 NUM_GPUS=0 deploy/start-head.sh # keep the head light (the driver/server runs here)
#   NUM_CPUS=0 deploy/start-head.sh            # no devices on the head at all
#
# Environment: RAY_PORT (6379), NODE_IP (first address of `hostname -I`), NUM_CPUS, NUM_GPUS,
# RAY_TEMP_DIR (a private Ray temp dir, e.g. when several clusters share a machine).
# Run it inside the Python environment where the project is installed (`ray` on PATH).
set -euo pipefail
PORT="${RAY_PORT:-6379}"
NODE_IP="${NODE_IP:-$(hostname -I | awk '{print $1}')}"
# Ray workers inherit this process' environment, not the driver's: set the run's env here.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
args=(--head --port "$PORT" --node-ip-address "$NODE_IP" --include-dashboard false --disable-usage-stats)
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir "$RAY_TEMP_DIR")
# setsid: the Ray daemons get a process group of their own (stop-node.sh stops exactly that group)
setsid -w ray start "${args[@]}"
echo
echo "head is up. On every other machine:   deploy/start-worker.sh $NODE_IP:$PORT"
echo "then, on this machine:                 dpfl launch --address $NODE_IP:$PORT [simulate options]"
