#!/usr/bin/env bash
# Remote GPUs on the simulated driver: a GPU node and a CPU node in two network namespaces joined
# by a veth pair capped at 10 Gbit/s (tc tbf), the server on the GPU node, the probe (an
# unmodified CUDA program) on the CPU node with the remote client as its libcuda.so.1.
#
#  1. A launch loop with one synchronization per N launches (N = 1, 10, 1000), kernels of 10 and
#     100 µs of simulated device time: on the GPU node itself (local), attached remotely at 0, 20
#     and 100 µs added round trip (a relay on the CPU node adds them: no netem here), and the
#     naive per-call RPC (every call waits for its answer) beside it.
#  2. Host-to-device and device-to-host bandwidth (pageable and pinned) against iperf3 on the
#     same link, and against the same copies on the GPU node itself.
#  3. The same attachment over TLS (a self-signed certificate made with openssl): a round trip,
#     a launch loop and copies, beside the clear.
#
#   bench/remote-gpu.sh [SECONDS_EACH] [COPY_MIB]
# TESSERA_BIN_DIR=DIR uses what is built there instead of building a release (the test suite's
# smoke run of every bench script does). Needs root, iproute2 and iperf3.
set -euo pipefail
SECONDS_EACH=${1:-2}
COPY_MIB=${2:-256}
cd "$(dirname "$0")/.."
if [ -z "${TESSERA_BIN_DIR:-}" ]; then
  cargo build --release --quiet -p tessera-vgpu -p tessera-fakecuda -p tessera-remote -p tessera-remote-cuda
  TESSERA_BIN_DIR=$PWD/target/release
fi
newest() { ls -t "$TESSERA_BIN_DIR/$1" "$TESSERA_BIN_DIR/deps/$1" 2>/dev/null | head -1 || true; }
PROBE=$TESSERA_BIN_DIR/tessera-vgpu-probe
REMOTE=$TESSERA_BIN_DIR/tessera-remote
T=$(mktemp -d)
ID=$(( $$ % 4000 ))
G=tsrb-g$ID C=tsrb-c$ID GIP=10.99.$(( ID % 250 )).1 CIP=10.99.$(( ID % 250 )).2
cleanup() {
  for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
  ip netns pids "$G" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns pids "$C" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$G" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT
ip netns add "$G"
ip netns add "$C"
ip link add "tsrbg$ID" type veth peer name "tsrbc$ID"
ip link set "tsrbg$ID" netns "$G"
ip link set "tsrbc$ID" netns "$C"
for side in "$G tsrbg$ID $GIP" "$C tsrbc$ID $CIP"; do
  set -- $side
  ip -n "$1" addr add "$3/30" dev "$2"
  ip -n "$1" link set "$2" up
  ip -n "$1" link set lo up
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate 10gbit burst 2mb latency 5ms
done

mkdir "$T/driver" "$T/client"
ln -s "$(newest libcuda.so)" "$T/driver/libcuda.so.1"
ln -s "$(newest libtessera_remote_cuda.so)" "$T/client/libcuda.so.1"
head -c 32 /dev/urandom | base64 >"$T/secret"

# One server per kernel size (the simulated device's time per thread is set when it starts):
# the probe's spin kernel has 132 x 256 threads.
declare -A NS_PER_THREAD=([100]=2.96 [10]=0.296)
declare -A PORT=([100]=7100 [10]=7010)
for k in 100 10; do
  ip netns exec "$G" env LD_LIBRARY_PATH="$T/driver" TESSERA_FAKECUDA_DIR="$T/dev-remote-$k" \
    TESSERA_FAKECUDA_NS_PER_THREAD="${NS_PER_THREAD[$k]}" \
    "$REMOTE" serve --listen "$GIP:${PORT[$k]}" --secret-file "$T/secret" >/dev/null 2>"$T/server-$k.log" &
  for rtt in 20 100; do
    ip netns exec "$C" "$REMOTE" relay --listen "127.0.0.1:$(( ${PORT[$k]} + rtt ))" \
      --to "$GIP:${PORT[$k]}" --rtt-us "$rtt" >/dev/null &
  done
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj "/CN=gpu" \
  -addext "subjectAltName=IP:$GIP" -addext "basicConstraints=critical,CA:FALSE" -keyout "$T/tls.key" -out "$T/tls.pem" 2>/dev/null
ip netns exec "$G" env LD_LIBRARY_PATH="$T/driver" TESSERA_FAKECUDA_DIR="$T/dev-remote-tls" \
  TESSERA_FAKECUDA_NS_PER_THREAD="${NS_PER_THREAD[100]}" \
  "$REMOTE" serve --listen "$GIP:7300" --secret-file "$T/secret" --tls-cert "$T/tls.pem" \
  --tls-key "$T/tls.key" >/dev/null 2>"$T/server-tls.log" &
sleep 1
target() { # kernel rtt -> ADDR
  if [ "$2" = 0 ]; then echo "$GIP:${PORT[$1]}"; else echo "127.0.0.1:$(( ${PORT[$1]} + $2 ))"; fi
}
local_probe() { # kernel args...
  local k=$1; shift
  ip netns exec "$G" env LD_LIBRARY_PATH="$T/driver" TESSERA_FAKECUDA_DIR="$T/dev-local-$k" \
    TESSERA_FAKECUDA_NS_PER_THREAD="${NS_PER_THREAD[$k]}" "$PROBE" "$@"
}
remote_probe() { # kernel rtt naive args...
  local k=$1 rtt=$2 naive=$3; shift 3
  ip netns exec "$C" env LD_LIBRARY_PATH="$T/client" TESSERA_REMOTE_GPU="$(target "$k" "$rtt")" \
    TESSERA_REMOTE_SECRET_FILE="$T/secret" TESSERA_REMOTE_WAIT_EVERY_CALL="$naive" "$PROBE" "$@"
}
tls_probe() { # args...
  ip netns exec "$C" env LD_LIBRARY_PATH="$T/client" TESSERA_REMOTE_GPU="$GIP:7300" \
    TESSERA_REMOTE_SECRET_FILE="$T/secret" TESSERA_REMOTE_TLS_CA="$T/tls.pem" "$PROBE" "$@"
}
rate() { sed -n 's/.*launches_per_s=\([0-9.]*\).*/\1/p'; }

echo "== round trip of a synchronizing call (empty kernel, one sync per launch) =="
for rtt in 0 20 100; do
  r=$(remote_probe 10 "$rtt" 0 launch --empty --sync-every 1 --seconds "$SECONDS_EACH" | rate)
  awk -v a="$rtt" -v r="$r" 'BEGIN { printf "added %3d us: %.1f us per launch + synchronize\n", a, 1e6/r }'
done

echo "== launch loop: launches/s, and overhead against local =="
for k in 100 10; do
  for every in 1 10 1000; do
    args=(launch --sync-every "$every" --seconds "$SECONDS_EACH")
    loc=$(local_probe "$k" "${args[@]}" | rate)
    line="kernel ${k} us, sync every ${every}: local $(printf %.0f "$loc")"
    for rtt in 0 20 100; do
      rem=$(remote_probe "$k" "$rtt" 0 "${args[@]}" | rate)
      line+=$(awk -v a="$rtt" -v l="$loc" -v r="$rem" 'BEGIN { printf " | +%dus %.0f (%.1f%%)", a, r, 100*(l-r)/l }')
    done
    for rtt in 0 20; do
      nai=$(remote_probe "$k" "$rtt" 1 "${args[@]}" | rate)
      line+=$(awk -v a="$rtt" -v l="$loc" -v r="$nai" 'BEGIN { printf " | naive +%dus %.0f (%.1f%%)", a, r, 100*(l-r)/l }')
    done
    echo "$line"
  done
done

echo "== copies over the 10 Gbit/s link =="
ip netns exec "$G" iperf3 -s -1 -B "$GIP" >/dev/null 2>&1 &
sleep 0.5
# iperf3 takes whole seconds (a fraction makes it run forever).
link=$(ip netns exec "$C" iperf3 -c "$GIP" -t "$(awk -v s="$SECONDS_EACH" 'BEGIN { print (s < 1) ? 1 : int(s) }')" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
echo "iperf3: $(printf %.2f "$link") Gbit/s"
bytes=$(( COPY_MIB << 20 ))
gbit() { sed -n "s/.*$1_mb_s=\([0-9.]*\).*/\1/p" | awk '{ printf "%.2f", $1*8/1000 }'; }
for pinned in "" --pinned; do
  out=$(local_probe 10 copy --bytes "$bytes" --rounds 4 $pinned)
  echo "local ${pinned:-pageable}: host-to-device $(echo "$out" | gbit htod) Gbit/s, device-to-host $(echo "$out" | gbit dtoh) Gbit/s"
  out=$(remote_probe 10 0 0 copy --bytes "$bytes" --rounds 4 $pinned)
  up=$(echo "$out" | gbit htod) down=$(echo "$out" | gbit dtoh)
  awk -v p="${pinned:-pageable}" -v u="$up" -v d="$down" -v l="$link" 'BEGIN {
    printf "remote %s: host-to-device %.2f Gbit/s (%.0f%% of the link), device-to-host %.2f Gbit/s (%.0f%%)\n", p, u, 100*u/l, d, 100*d/l }'
done

echo "== over TLS (kernel 100 us) =="
clear=$(remote_probe 10 0 0 launch --empty --sync-every 1 --seconds "$SECONDS_EACH" | rate)
tls=$(tls_probe launch --empty --sync-every 1 --seconds "$SECONDS_EACH" | rate)
awk -v c="$clear" -v t="$tls" 'BEGIN { printf "round trip of a launch + synchronize: clear %.1f us, TLS %.1f us\n", 1e6/c, 1e6/t }'
for every in 10 1000; do
  args=(launch --sync-every "$every" --seconds "$SECONDS_EACH")
  loc=$(local_probe 100 "${args[@]}" | rate)
  rem=$(remote_probe 100 0 0 "${args[@]}" | rate)
  tls=$(tls_probe "${args[@]}" | rate)
  awk -v e="$every" -v l="$loc" -v r="$rem" -v t="$tls" 'BEGIN {
    printf "sync every %d: local %.0f | clear %.0f (%.1f%%) | TLS %.0f (%.1f%%)\n", e, l, r, 100*(l-r)/l, t, 100*(l-t)/l }'
done
for pinned in "" --pinned; do
  out=$(tls_probe copy --bytes "$bytes" --rounds 4 $pinned)
  up=$(echo "$out" | gbit htod) down=$(echo "$out" | gbit dtoh)
  awk -v p="${pinned:-pageable}" -v u="$up" -v d="$down" -v l="$link" 'BEGIN {
    printf "TLS %s: host-to-device %.2f Gbit/s (%.0f%% of the link), device-to-host %.2f Gbit/s (%.0f%%)\n", p, u, 100*u/l, d, 100*d/l }'
done
