#!/usr/bin/env bash
# On a host with NVIDIA GPUs: the pool reads its devices through NVML (not simulated), places a
# one-GPU job, and the job sees exactly its device. One command, from the repository root:
#   bench/gpu-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
TESSERA=$PWD/target/release/tessera
S=$(mktemp -d)
export TESSERA_CONFIG=$S/cli.yaml
TESSERA_LOG=warn "$TESSERA" up --data-dir "$S/data" --listen 127.0.0.1:7482 --gateway-listen off \
  >"$S/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null || true; sleep 1; rm -rf "$S"' EXIT
for _ in $(seq 100); do
  [ -f "$TESSERA_CONFIG" ] && "$TESSERA" nodes 2>/dev/null | grep -q ready && break
  sleep 0.2
done
echo "== nvidia-smi"; nvidia-smi --query-gpu=index,name,memory.total --format=csv
echo "== tessera nodes"; "$TESSERA" nodes
nodes=$("$TESSERA" nodes -o json)
echo "$nodes" | grep -q '"simulated": false' || { echo "FAIL: devices are simulated" >&2; exit 1; }
id=$("$TESSERA" submit --gpu 1 -o json -- sh -c 'echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; nvidia-smi -L' \
  | sed -n 's/^  "id": \([0-9]*\),$/\1/p')
for _ in $(seq 100); do
  "$TESSERA" jobs -o json | grep -q '"state": "succeeded"' && break
  sleep 0.2
done
echo "== job $id output"; "$TESSERA" logs "$id"
"$TESSERA" jobs -o json | grep -q '"state": "succeeded"' || { echo "FAIL: job did not succeed" >&2; exit 1; }
echo "PASS"
