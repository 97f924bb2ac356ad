#!/usr/bin/env bash
# Real-GPU telemetry in one command from the repository root (a host with an NVIDIA GPU, its
# driver and PyTorch):
#   bench/gpu/telemetry.sh [OUT_DIR]
# Starts a pool on this machine (`tessera up`, real devices through NVML), runs a PyTorch job that
# keeps one GPU busy and one that holds a GPU and idles, then checks what the controller reports:
# dcgm-exporter's names on /metrics with the busy device above 50% and drawing more power than
# the idle one, per-workload series, and each job's energy in `tessera usage`.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
log() { echo "$*" | tee -a "$OUT/telemetry.txt"; }
fail() { log "FAIL $*"; exit 1; }
BIN=${TESSERA:-target/release/tessera}
[ -x "$BIN" ] || cargo build --release -q || fail "build"
W=$(mktemp -d)
trap 'kill %1 2>/dev/null; rm -rf "$W"' EXIT
export TESSERA_CONFIG="$W/cli.yaml"
"$BIN" up --data-dir "$W/data" --listen 127.0.0.1:17480 --gateway-listen off \
    --telemetry-interval 1s >"$W/up.log" 2>&1 &
for _ in $(seq 60); do grep -q "admin token" "$W/up.log" && break; sleep 1; done
TOKEN=$(sed -n 's/.*admin token (shown once): //p' "$W/up.log")
[ -n "$TOKEN" ] || fail "no pool: $(tail -5 "$W/up.log")"
export TESSERA_URL=http://127.0.0.1:17480 TESSERA_TOKEN="$TOKEN"
T=("$BIN")
"${T[@]}" nodes | tee -a "$OUT/telemetry.txt"
BUSY=$("${T[@]}" submit -o json --name burn --gpu 1 -- python3 -c '
import torch, time
a = torch.randn(8192, 8192, device="cuda")
end = time.time() + 60
while time.time() < end:
    a = (a @ a).clamp_(-1, 1)
torch.cuda.synchronize()' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
IDLE=$("${T[@]}" submit -o json --name idle --gpu 1 -- python3 -c '
import torch, time
x = torch.zeros(1, device="cuda"); time.sleep(60)' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
sleep 30
curl -s http://127.0.0.1:17480/metrics >"$OUT/metrics.txt"
grep -E '^DCGM_FI_DEV_(GPU_UTIL|POWER_USAGE|FB_USED)' "$OUT/metrics.txt" | tee -a "$OUT/telemetry.txt"
grep -q 'simulated="false"' "$OUT/metrics.txt" || fail "the devices read as simulated"
max_util=$(grep '^DCGM_FI_DEV_GPU_UTIL' "$OUT/metrics.txt" | awk '{print $2}' | sort -g | tail -1)
awk "BEGIN{exit !($max_util > 50)}" || fail "no device above 50% (max $max_util)"
grep "tessera_workload_gpu_util_percent{job=\"$BUSY\"" "$OUT/metrics.txt" | tee -a "$OUT/telemetry.txt"
"${T[@]}" cancel "$BUSY" "$IDLE" >/dev/null
sleep 3
"${T[@]}" usage --since 1h --by job | tee -a "$OUT/telemetry.txt"
"${T[@]}" usage --since 1h --by job -o json >"$OUT/usage.json"
python3 - "$OUT/usage.json" "$BUSY" "$IDLE" <<'PY' || fail "energy"
import json, sys
rows = {r["key"]: r for r in json.load(open(sys.argv[1]))["rows"]}
busy, idle = rows[sys.argv[2]], rows[sys.argv[3]]
print("energy J: busy", busy["energy_mj"] / 1000, "idle", idle["energy_mj"] / 1000)
assert not busy["simulated"] and busy["energy_mj"] > idle["energy_mj"] > 0
PY
log "PASS real-GPU telemetry"
