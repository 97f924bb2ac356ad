#!/usr/bin/env bash
# Transparent checkpoint of a CUDA program on a real NVIDIA GPU, in one command from the
# repository root, as root:
#   bench/gpu/criu-cuda.sh [OUT_DIR]
# Needs NVIDIA's cuda-checkpoint on the PATH (driver r555 or newer), PyTorch, and CRIU 4.x with its
# CUDA plugin: /usr/local/sbin/criu from scripts/install-criu.sh, or, on a machine without network,
# a copy built elsewhere with `CRIU_PREFIX=$PWD/target/criu scripts/install-criu.sh` and brought
# along (CRIU=target/criu/sbin/criu). A counter kept in GPU memory is dumped, the process ends,
# and the restored process must go on counting from the value in device memory.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
CRIU=${CRIU:-$( [ -x target/criu/sbin/criu ] && echo target/criu/sbin/criu || echo /usr/local/sbin/criu )}
PLUGINS=$(dirname "$(dirname "$CRIU")")/lib/criu
log() { echo "$*" | tee -a "$OUT/criu-cuda.txt"; }
fail() { log "FAIL $*"; exit 1; }
"$CRIU" --version >/dev/null 2>&1 || fail "no CRIU at $CRIU"
[ -f "$PLUGINS/cuda_plugin.so" ] || fail "no CUDA plugin in $PLUGINS"
command -v cuda-checkpoint >/dev/null || fail "no cuda-checkpoint on the PATH"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/img"
setsid python3 -c '
import time, torch
x = torch.zeros(1, device="cuda")
while True:
    x += 1
    print(int(x.item()), flush=True)
    time.sleep(0.05)
' </dev/null >"$W/out.log" 2>&1 &
PID=$!
sleep 8
before=$(tail -1 "$W/out.log")
t0=$(date +%s.%N)
"$CRIU" dump -t "$PID" -D "$W/img" --libdir "$PLUGINS" -v2 --log-file dump.log || { cp "$W/img/dump.log" "$OUT/"; fail "dump"; }
t1=$(date +%s.%N)
wait "$PID" 2>/dev/null
at_dump=$(tail -1 "$W/out.log")
sleep 1
"$CRIU" restore -D "$W/img" --libdir "$PLUGINS" -d -v2 --log-file restore.log || { cp "$W/img/restore.log" "$OUT/"; fail "restore"; }
t2=$(date +%s.%N)
sleep 3
after=$(tail -1 "$W/out.log")
pkill -9 -f 'x = torch.zeros' || true
log "counter before dump $before, at dump $at_dump, 3 s after restore $after"
log "dump $(echo "$t1 - $t0" | bc) s, restore $(echo "$t2 - $t1 - 1" | bc) s, images $(du -sh "$W/img" | cut -f1)"
[ "$after" -gt "$at_dump" ] || fail "the restored process did not go on counting"
grep -qx 1 "$W/out.log" && [ "$(grep -cx 1 "$W/out.log")" -eq 1 ] || fail "the count started over"
log "PASS a CUDA counter survives a CRIU dump and restore"
