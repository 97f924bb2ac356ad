#!/usr/bin/env bash
# The slice checks on a real NVIDIA GPU (H100/H200, driver 580, PyTorch installed), in one command
# from the repository root:
#   bench/gpu/run.sh [OUT_DIR]
# Uses target/release/{libtessera_vgpu.so,tessera-vgpu-probe} when present (build them where a
# Rust toolchain is: cargo build --release -p tessera-vgpu), else builds them. Prints every result
# and a PASS/FAIL line per check; exits 1 when any check fails. Results also go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
LIB=$PWD/target/release/libtessera_vgpu.so
PROBE=$PWD/target/release/tessera-vgpu-probe
if [ ! -x "$PROBE" ] || [ ! -f "$LIB" ]; then
  cargo build --release -p tessera-vgpu || { echo "no build and no Rust toolchain" >&2; exit 1; }
fi
S=$(mktemp -d)
trap 'rm -rf "$S"' EXIT
FAILED=0
GIB=$((1 << 30))
log() { echo "$*" | tee -a "$OUT/results.txt"; }
check() { # name awk-condition
  if awk "BEGIN { if ($2) exit 0; exit 1 }"; then log "PASS $1"; else log "FAIL $1"; FAILED=1; fi
}
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", 100 * a / (a + b) }'; }
SECS=${SECS:-20}
val() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" | tail -1; }
slice() { # name share memory_bytes command...
  env LD_PRELOAD="$LIB" TESSERA_VGPU_SHM="$S/slice-$1" TESSERA_VGPU_DEVICE_SHM="$S/gpu0" \
    TESSERA_COMPUTE_SHARE="$2" TESSERA_GPU_MEMORY_BYTES="$3" CUDA_VISIBLE_DEVICES=0 "${@:4}"
}

log "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0 2>/dev/null || echo 'no nvidia-smi')"

# 1. The probe against the real driver.
r=$("$PROBE" meminfo); log "probe, no slice: $r"
for via in alloc managed async pool pitch vmm array; do
  for entry in "" "--proc-address --ptds"; do
    # shellcheck disable=SC2086
    r=$(slice "oom-$via" 0.5 $((4 * GIB)) "$PROBE" oom --via $via $entry); log "probe oom $via $entry: $r"
    a=$(echo "$r" | val allocated_bytes); res=$(echo "$r" | val result)
    check "probe oom $via $entry stops at 4 GiB" "$a == $((4 * GIB)) && \"$res\" == \"CUDA_ERROR_OUT_OF_MEMORY\""
  done
done
r=$(slice info 0.5 $((4 * GIB)) "$PROBE" meminfo); log "probe meminfo in a 4 GiB slice: $r"
check "probe meminfo shows 4 GiB" "$(echo "$r" | val total_bytes) == $((4 * GIB))"

two() { # label modeA modeB (probe modes at 30% and 70%)
  slice a 0.3 $GIB "$PROBE" $2 --seconds "$SECS" > "$S/a" &
  slice b 0.7 $GIB "$PROBE" $3 --seconds "$SECS" > "$S/b"
  wait
  local ka kb v; ka=$(val kernels_per_s < "$S/a"); kb=$(val kernels_per_s < "$S/b"); v=$(pct "$ka" "$kb")
  log "probe $1: 30% slice $ka kernels/s, 70% slice $kb kernels/s: $v%"
  check "probe $1 within 30±5" "$v >= 25 && $v <= 35"
}
two "launch vs launch" launch launch
two "graph vs launch" graph launch

for i in 1 2 3; do
  p=$("$PROBE" launch --empty --seconds "$SECS" | val launches_per_s)
  l=$(slice lone 0.5 $GIB "$PROBE" launch --empty --seconds "$SECS" | val launches_per_s)
  log "empty-kernel launches/s run $i: without $p, with the library $l"
  check "launch overhead run $i <= 2%" "$l >= 0.98 * $p"
done

# 2. Unmodified PyTorch.
if [ -n "${SKIP_TORCH:-}" ]; then
  [ "$FAILED" = 0 ] && log "ALL PASS (PyTorch skipped)" || log "SOME FAILED"
  exit "$FAILED"
fi
PY=bench/gpu/torch_slices.py
r=$(slice torch-info 0.5 $((8 * GIB)) python3 $PY meminfo); log "torch mem_get_info in an 8 GiB slice: $r"
check "torch sees 8 GiB" "$(echo "$r" | val total_bytes) == $((8 * GIB))"
r=$(slice torch-oom 0.5 $((8 * GIB)) python3 $PY oom); log "torch past the cap: $r"
check "torch raises OutOfMemoryError at the cap" "\"$(echo "$r" | val error)\" == \"OutOfMemoryError\" && $(echo "$r" | val allocated_bytes) <= $((8 * GIB))"
torch_two() { # label extra-args
  # shellcheck disable=SC2086
  slice ta 0.3 $((20 * GIB)) python3 $PY train --seconds "$((SECS + 10))" $2 > "$S/ta" &
  # shellcheck disable=SC2086
  slice tb 0.7 $((20 * GIB)) python3 $PY train --seconds "$((SECS + 10))" $2 > "$S/tb"
  wait
  local a b v; a=$(val steps_per_s < "$S/ta"); b=$(val steps_per_s < "$S/tb"); v=$(pct "$a" "$b")
  log "torch $1: 30% slice $a steps/s, 70% slice $b steps/s: $v%"
  check "torch $1 within 30±5" "$v >= 25 && $v <= 35"
}
torch_two "training loops" ""
torch_two "CUDA-graph training steps" "--graph"

[ "$FAILED" = 0 ] && log "ALL PASS" || log "SOME FAILED"
exit "$FAILED"
