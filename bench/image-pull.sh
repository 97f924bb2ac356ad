#!/usr/bin/env bash
# Side by side on this machine, from one local registry (Debian's docker-registry on 127.0.0.1):
# pulling and unpacking an image of four layers of random data (so that compression cannot
# cheat), cold (nothing cached) and warm (all cached), with containerd (`ctr images pull`, which
# fetches into its content store and unpacks with its default overlayfs snapshotter) and with
# Tessera (`tessera images pull`, the agent's own path: streamed into the decompressors, all
# layers at once). Then starting from a warm cache: `ctr run --rm` of a busybox image against a
# Tessera pool's submit -> running for the same image, and for the same job in process mode.
#
# Usage (as root; installs containerd, docker-registry, umoci, skopeo and busybox-static with
# apt when missing):
#   bench/image-pull.sh [MIB] [RUNS] [STARTS]     # defaults: 1024 MiB, 3 runs, 20 starts
# TESSERA_BIN_DIR=DIR uses the binaries built there instead of building a release (the test
# suite's smoke run of every bench script does, with a few MiB).
set -euo pipefail
MIB=${1:-1024}
RUNS=${2:-3}
STARTS=${3:-20}
cd "$(dirname "$0")/.."
if [ -z "${TESSERA_BIN_DIR:-}" ]; then
  cargo build --release --quiet -p tessera
  TESSERA_BIN_DIR=$PWD/target/release
fi
TESSERA=$TESSERA_BIN_DIR/tessera
missing=()
for c in containerd:containerd docker-registry:docker-registry umoci:umoci skopeo:skopeo; do
  command -v "${c%%:*}" >/dev/null || missing+=("${c##*:}")
done
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
[ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends "${missing[@]}" >/dev/null

S=$(mktemp -d)
chmod 711 "$S" # image jobs run as an unprivileged uid that must pass through it
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for m in $(awk -v s="$S" '$2 ~ "^"s {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
  rm -rf "$S"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- The registry and the images ------------------------------------------------------------
REG=127.0.0.1:$(port)
cat > "$S/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $S/registry}}
http: {addr: $REG}
EOF
docker-registry serve "$S/registry.yml" >"$S/registry.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done

build() { # NAME: an OCI layout in $S/NAME, image NAME:t
  umoci init --layout "$S/$1" && umoci new --image "$S/$1:t" && umoci unpack --image "$S/$1:t" "$S/$1-b" >/dev/null
}
push() { skopeo copy --quiet --dest-tls-verify=false "oci:$S/$1:t" "docker://$REG/$1:1"; }
build big
for i in 1 2 3 4; do
  head -c $((MIB * 1024 * 1024 / 4)) /dev/urandom > "$S/big-b/rootfs/layer$i"
  umoci repack --refresh-bundle --image "$S/big:t" "$S/big-b"
done
push big
build small
mkdir -p "$S/small-b/rootfs/bin"
cp /bin/busybox "$S/small-b/rootfs/bin/" && ln -s busybox "$S/small-b/rootfs/bin/true" && ln -s busybox "$S/small-b/rootfs/bin/sh"
umoci repack --image "$S/small:t" "$S/small-b"
umoci config --image "$S/small:t" --config.env PATH=/bin >/dev/null
push small
BIG=$REG/big:1
SMALL=$REG/small:1
echo "image: $BIG, 4 layers of $((MIB / 4)) MiB of random data; machine: $(nproc) cores, $(uname -r)"

# --- containerd ----------------------------------------------------------------------------
start_containerd() { # DIR
  mkdir -p "$1"
  cat > "$1/config.toml" <<EOF
version = 2
root = "$1/root"
state = "$1/state"
[grpc]
  address = "$1/sock"
[plugins."io.containerd.grpc.v1.cri"]
  disable = true
EOF
  containerd --config "$1/config.toml" >"$1/log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [ -S "$1/sock" ] && break; sleep 0.05; done
}
stop_containerd() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }
ctr_cold=() ctr_warm=()
for run in $(seq "$RUNS"); do
  C=$S/containerd-$run
  start_containerd "$C"
  t0=$(now); ctr --address "$C/sock" images pull --plain-http "$BIG" >/dev/null; t1=$(now)
  ctr --address "$C/sock" images pull --plain-http "$BIG" >/dev/null; t2=$(now)
  ctr_cold+=("$(secs "$t0" "$t1")"); ctr_warm+=("$(secs "$t1" "$t2")")
  echo "containerd run $run: cold $(secs "$t0" "$t1") s, warm $(secs "$t1" "$t2") s"
  [ "$run" -lt "$RUNS" ] && { stop_containerd; rm -rf "$C"; }
done
# Starting from a warm cache: a new container of the small image, to its process's exit.
ctr --address "$C/sock" images pull --plain-http "$SMALL" >/dev/null
ctr_start=()
for i in $(seq "$STARTS"); do
  t0=$(now); ctr --address "$C/sock" run --rm "$SMALL" "s$i" true; t1=$(now)
  ctr_start+=("$(secs "$t0" "$t1")")
done
stop_containerd

# --- Tessera: the agent's pull ---------------------------------------------------------------
t_cold=() t_warm=()
for run in $(seq "$RUNS"); do
  D=$S/tessera-pull-$run
  t0=$(now); "$TESSERA" images pull "$BIG" --data-dir "$D" >/dev/null; t1=$(now)
  "$TESSERA" images pull "$BIG" --data-dir "$D" >/dev/null; t2=$(now)
  t_cold+=("$(secs "$t0" "$t1")"); t_warm+=("$(secs "$t1" "$t2")")
  echo "tessera    run $run: cold $(secs "$t0" "$t1") s, warm $(secs "$t1" "$t2") s"
  rm -rf "$D"
done

# --- Tessera: submit -> running in a pool, warm image against process mode -------------------
export TESSERA_CONFIG=$S/tessera-cli.yaml
TESSERA_LOG=warn "$TESSERA" up --data-dir "$S/tessera" --listen "127.0.0.1:$(port)" \
  --gateway-listen off --simulate-gpus 4xH100-80GB --cpus 16 --memory 16000MiB \
  >"$S/tessera-up.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  [ -f "$TESSERA_CONFIG" ] && "$TESSERA" nodes 2>/dev/null | grep -q ready && break
  sleep 0.2
done
# Submission to the replica's start, from the job's own record (its creation, its start event).
started_after() { # ID
  local job events
  job=$("$TESSERA" describe job "$1" -o json)
  events=$(printf '%s' "$job" | python3 -c 'import json,sys; d=json.load(sys.stdin); e=[x for x in d["events"] if "started on" in x["message"]]; f=d["job"].get("finished_ms"); print("%s %s" % ((e[0]["ts_ms"]-d["job"]["created_ms"])/1000 if e else -1, (f-d["job"]["created_ms"])/1000 if f else -1))')
  printf '%s' "$events"
}
run_jobs() { # MODE -> start latencies
  local out=()
  for _ in $(seq "$STARTS"); do
    if [ "$1" = image ]; then
      id=$("$TESSERA" submit -o json --cpu 0.5 --memory 128MiB --image "$SMALL" -- true | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    else
      id=$("$TESSERA" submit -o json --cpu 0.5 --memory 128MiB -- true | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    fi
    for _ in $(seq 200); do
      state=$("$TESSERA" jobs -o json | python3 -c "import json,sys; print([j['state'] for j in json.load(sys.stdin) if j['id']==$id][0])")
      [ "$state" = succeeded ] && break
      [ "$state" = failed ] && { "$TESSERA" describe job "$id" >&2; return 1; }
      sleep 0.05
    done
    out+=("$(started_after "$id")")
  done
  printf '%s\n' "${out[@]}"
}
run_jobs image >/dev/null # the first pulls the image into the node's cache
mapfile -t img_start < <(run_jobs image)
mapfile -t proc_start < <(run_jobs process)

echo
echo "pull and unpack $MIB MiB in 4 layers (s), per run"
echo "containerd cold: ${ctr_cold[*]}   warm: ${ctr_warm[*]}"
echo "tessera    cold: ${t_cold[*]}   warm: ${t_warm[*]}"
awk -v c="$(median "${ctr_cold[@]}")" -v t="$(median "${t_cold[@]}")" \
  'BEGIN { printf "median cold: containerd %.2f s, tessera %.2f s (%.2fx)\n", c, t, c / t }'
col() { printf '%s\n' "${@:2}" | awk -v c="$1" '{ print $c }'; }
echo "start from a warm cache (s), median of $STARTS"
echo "containerd ctr run --rm (create, start, exit):      $(median "${ctr_start[@]}")"
echo "tessera image job, submit -> started:               $(median $(col 1 "${img_start[@]}"))"
echo "tessera image job, submit -> exited (succeeded):    $(median $(col 2 "${img_start[@]}"))"
echo "tessera process-mode job, submit -> started:        $(median $(col 1 "${proc_start[@]}"))"
echo "tessera process-mode job, submit -> exited:         $(median $(col 2 "${proc_start[@]}"))"
