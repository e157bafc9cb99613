#!/usr/bin/env bash
# Join this machine to a dpfl Ray cluster:  deploy/start-worker.sh HEAD_IP:PORT
#
# Environment: NODE_IP (first address of `hostname -I`), NUM_CPUS, NUM_GPUS (default: all
# of this machine's), RAY_TEMP_DIR. The project must be installed here in the same Python
# version as on the head, and --data-dir / a local --model path must exist at the same path.
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "usage: $0 HEAD_IP:PORT" >&2
  exit 2
fi
NODE_IP="${NODE_IP:-$(hostname -I | awk '{print $1}')}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
args=(--address "$1" --node-ip-address "$NODE_IP" --disable-usage-stats)
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir "$RAY_TEMP_DIR")
# setsid: the Ray daemons get a process group of their own (stop-node.sh stops exactly that group)
setsid -w ray start "${args[@]}"
