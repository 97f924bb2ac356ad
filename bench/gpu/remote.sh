#!/usr/bin/env bash
# Remote GPUs on a real NVIDIA GPU (H100/H200, driver 580, PyTorch installed), in one command from
# the repository root:
#   bench/gpu/remote.sh [OUT_DIR]
# The server runs on the GPU machine over its real driver (under the slice library, in a 0.5
# slice of 20 GiB); the client (the program's libcuda.so.1 and libnvidia-ml.so.1) runs in a
# network namespace joined by a veth pair, or on loopback where namespaces cannot be made.
#  1. the probe's check through the client: kernel launches with parameters (real PTX, JIT on the
#     device), memset, chunked copies, events, pinned copies, graphs, each read back;
#  2. launch loops (sync every 1, 10, 1000 launches), local (in the same slice) and remote;
#  3. unmodified PyTorch: memory info, and training steps eager and through CUDA graphs, local and
#     remote (bench/gpu/torch_slices.py), with TESSERA_REMOTE_TRACE=1 so that every driver entry
#     point and export table the CUDA runtime asks for and the client does not forward is in the
#     log: what docs/remote-gpu.md needs to say about cuGetExportTable.
# Uses target/release/{tessera-remote,tessera-vgpu-probe,libtessera_remote_cuda.so,
# libtessera_vgpu.so} (build them where a Rust toolchain is: cargo build --release -p tessera-remote
# -p tessera-remote-cuda -p tessera-vgpu). Prints every result and a PASS/FAIL line per check;
# exits 1 when any check fails. Results also go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
R=$PWD/target/release
for f in tessera-remote tessera-vgpu-probe libtessera_remote_cuda.so libtessera_vgpu.so; do
  [ -e "$R/$f" ] || cargo build --release -p tessera-remote -p tessera-remote-cuda -p tessera-vgpu \
    || { echo "no $R/$f and no Rust toolchain" >&2; exit 1; }
done
S=$(mktemp -d)
G=tsr-gpu-$$ C=tsr-cpu-$$
cleanup() {
  kill "$SERVER" 2>/dev/null
  ip netns del "$G" 2>/dev/null; ip netns del "$C" 2>/dev/null
  rm -rf "$S"
}
trap cleanup EXIT
FAILED=0
log() { echo "$*" | tee -a "$OUT/remote.txt"; }
check() { if awk "BEGIN { if ($2) exit 0; exit 1 }"; then log "PASS $1"; else log "FAIL $1"; FAILED=1; fi; }
val() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" | tail -1; }
SECS=${SECS:-10}
GIB=$((1 << 30))
log "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0 2>/dev/null || echo 'no nvidia-smi')"

# The network: two namespaces over a veth pair where possible.
if ip netns add "$G" 2>/dev/null && ip netns add "$C" 2>/dev/null \
  && ip link add tsrg$$ type veth peer name tsrc$$ 2>/dev/null; then
  ip link set tsrg$$ netns "$G"; ip link set tsrc$$ netns "$C"
  ip -n "$G" addr add 10.98.0.1/30 dev tsrg$$; ip -n "$C" addr add 10.98.0.2/30 dev tsrc$$
  for ns in "$G tsrg$$" "$C tsrc$$"; do set -- $ns; ip -n "$1" link set "$2" up; ip -n "$1" link set lo up; done
  ON_GPU=(ip netns exec "$G") ON_CPU=(ip netns exec "$C") ADDR=10.98.0.1:7070
  log "network: two namespaces over a veth pair"
else
  ON_GPU=() ON_CPU=() ADDR=127.0.0.1:7070
  log "network: loopback (network namespaces could not be made here)"
fi
head -c 32 /dev/urandom | base64 >"$S/secret"
mkdir "$S/client"
for n in libcuda.so.1 libnvidia-ml.so.1; do ln -s "$R/libtessera_remote_cuda.so" "$S/client/$n"; done
slice() { # name command... : in a 0.5 slice of 20 GiB
  env LD_PRELOAD="$R/libtessera_vgpu.so" TESSERA_VGPU_SHM="$S/slice-$1" TESSERA_VGPU_DEVICE_SHM="$S/gpu0" \
    TESSERA_COMPUTE_SHARE=0.5 TESSERA_GPU_MEMORY_BYTES=$((20 * GIB)) CUDA_VISIBLE_DEVICES=0 "${@:2}"
}
slice server "${ON_GPU[@]}" "$R/tessera-remote" serve --listen "$ADDR" --secret-file "$S/secret" \
  >"$OUT/remote-server.log" 2>&1 &
SERVER=$!
sleep 2
remote() { "${ON_CPU[@]}" env LD_LIBRARY_PATH="$S/client" TESSERA_REMOTE_GPU="$ADDR" \
  TESSERA_REMOTE_SECRET_FILE="$S/secret" TESSERA_REMOTE_TRACE=1 "$@"; }

# 1. The probe's check through the client.
r=$(remote "$R/tessera-vgpu-probe" check 2>>"$OUT/remote-client.log"); log "remote probe check: $r"
for k in fill_ok memset_ok copy_ok events_ok pinned_ok graph_ok; do check "remote $k" "\"$(echo "$r" | val $k)\" == \"1\""; done
r=$(remote "$R/tessera-vgpu-probe" meminfo 2>>"$OUT/remote-client.log"); log "remote meminfo: $r"
check "remote meminfo shows the 20 GiB slice" "$(echo "$r" | val total_bytes) == $((20 * GIB))"

# 2. Launch loops, local and remote.
for every in 1 10 1000; do
  l=$(slice local "$R/tessera-vgpu-probe" launch --sync-every "$every" --seconds "$SECS" | val launches_per_s)
  m=$(remote "$R/tessera-vgpu-probe" launch --sync-every "$every" --seconds "$SECS" 2>>"$OUT/remote-client.log" | val launches_per_s)
  log "launch loop, sync every $every: local $l/s, remote $m/s"
done
r=$(remote "$R/tessera-vgpu-probe" copy --bytes $((256 << 20)) --rounds 8 --pinned 2>>"$OUT/remote-client.log"); log "remote copies (pinned): $r"

# 3. Unmodified PyTorch.
T=bench/gpu/torch_slices.py
r=$(remote python3 "$T" meminfo 2>>"$OUT/remote-client.log"); log "remote torch meminfo: $r"
check "remote torch sees the 20 GiB slice" "\"$(echo "$r" | val total_bytes)\" == \"$((20 * GIB))\""
for g in "" --graph; do
  l=$(slice local python3 "$T" train --seconds "$SECS" $g | val steps_per_s)
  m=$(remote python3 "$T" train --seconds "$SECS" $g 2>>"$OUT/remote-client.log" | val steps_per_s)
  log "torch training ${g:-eager}: local ${l:-failed} steps/s, remote ${m:-failed} steps/s"
  check "remote torch training ${g:-eager} runs" "\"${m:-0}\" != \"0\""
done
log "what the runtime asked for and the client does not forward (remote-client.log):"
grep -ho 'trace: .*' "$OUT/remote-client.log" | sort | uniq -c | sort -rn | head -40 | tee -a "$OUT/remote.txt"
exit $FAILED
