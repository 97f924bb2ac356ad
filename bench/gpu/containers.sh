#!/usr/bin/env bash
# What GPU image jobs get on a real NVIDIA GPU host, in one command from the repository root:
#   bench/gpu/containers.sh [OUT_DIR]
# Uses target/release/tessera (build it where a Rust toolchain is: cargo build --release -p
# tessera). Describes the driver as the agent does at start (`tessera images cdi`) and checks that
# the CDI spec names every GPU nvidia-smi lists, the control node, libcuda.so.1 and
# libnvidia-ml.so.1; prints PASS/FAIL per check and exits 1 when any fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
TESSERA=$PWD/target/release/tessera
[ -x "$TESSERA" ] || cargo build --release -p tessera || { echo "no build and no Rust toolchain" >&2; exit 1; }
FAILED=0
log() { echo "$*" | tee -a "$OUT/containers.txt"; }
check() { if [ "$2" = yes ]; then log "PASS $1"; else log "FAIL $1"; FAILED=1; fi; }
has() { grep -q -- "$1" "$OUT/cdi.json" && echo yes || echo no; }

log "== $(date -u +%FT%TZ) containers: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i 0 2>/dev/null || echo 'no nvidia-smi')"
if ! "$TESSERA" images cdi > "$OUT/cdi.json" 2> "$OUT/cdi.err"; then
  log "FAIL tessera images cdi: $(cat "$OUT/cdi.err")"
  exit 1
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
nodes=$(grep -c '"path": "/dev/nvidia[0-9]*"' "$OUT/cdi.json")
log "nvidia-smi lists $gpus GPU(s); the spec names $nodes device node(s)"
check "a device node per GPU" "$([ "$gpus" -gt 0 ] && [ "$nodes" -eq "$gpus" ] && echo yes || echo no)"
check "the control node" "$(has '"/dev/nvidiactl"')"
check "libcuda.so.1 bound by soname" "$(has '/usr/local/nvidia/lib64/libcuda.so.1')"
check "libnvidia-ml.so.1 bound by soname" "$(has '/usr/local/nvidia/lib64/libnvidia-ml.so.1')"
check "nvidia-smi bound" "$(has '/usr/local/nvidia/bin/nvidia-smi')"
exit $FAILED
