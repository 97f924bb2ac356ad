#!/usr/bin/env bash
# What the slice library adds to each kernel launch: the probe's empty-kernel launch loop against
# the simulated driver with launches that take no simulated time (so the loop is bound by the
# CPU), without the library, with it on a lone slice (launches pass straight through), and with
# it holding a window (the limiter's full check on every launch). Runs interleaved, RUNS times.
#   bench/vgpu-overhead.sh [SECONDS] [RUNS]
# TESSERA_BIN_DIR=DIR uses what is built there instead of building a release (the test suite's
# smoke run of every bench script does).
set -euo pipefail
SECONDS_EACH=${1:-5}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
if [ -z "${TESSERA_BIN_DIR:-}" ]; then
  cargo build --release --quiet -p tessera-vgpu -p tessera-fakecuda
  TESSERA_BIN_DIR=$PWD/target/release
fi
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
# A test build leaves the libraries under deps/ only; take the newest of the two places.
newest() { ls -t "$TESSERA_BIN_DIR/$1" "$TESSERA_BIN_DIR/deps/$1" 2>/dev/null | head -1 || true; }
ln -s "$(newest libcuda.so)" "$T/libcuda.so.1"
export LD_LIBRARY_PATH=$T TESSERA_FAKECUDA_DIR=$T/devices TESSERA_FAKECUDA_MIN_KERNEL_NS=0
PROBE=$TESSERA_BIN_DIR/tessera-vgpu-probe
LIB=$(newest libtessera_vgpu.so)
slice() {
  env LD_PRELOAD="$LIB" TESSERA_GPU_MEMORY_BYTES=1073741824 TESSERA_VGPU_SHM="$T/slice-$1" \
    TESSERA_VGPU_DEVICE_SHM="$T/gpu0" TESSERA_COMPUTE_SHARE="$2" TESSERA_COMPUTE_BURST="$3" "${@:4}"
}
rate() { sed -n 's/.*launches_per_s=\([0-9.]*\).*/\1/p'; }
for run in $(seq "$RUNS"); do
  plain=$("$PROBE" launch --empty --seconds "$SECONDS_EACH" | rate)
  lone=$(slice lone 0.5 1 "$PROBE" launch --empty --seconds "$SECONDS_EACH" | rate)
  gated=$(slice gated 1.0 0 "$PROBE" launch --empty --seconds "$SECONDS_EACH" | rate)
  awk -v r="$run" -v p="$plain" -v l="$lone" -v g="$gated" 'BEGIN {
    printf "run %d: launches/s without %.0f, lone slice %.0f (%+.1f%%, %+.0f ns/launch), in a window %.0f (%+.1f%%, %+.0f ns/launch)\n",
      r, p, l, 100*(l-p)/p, 1e9/l-1e9/p, g, 100*(g-p)/p, 1e9/g-1e9/p }'
done
