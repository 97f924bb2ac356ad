#!/usr/bin/env bash
# Side by side on this machine: the same burst of one-GPU `true` jobs on 8 GPUs, through Slurm
# (Debian's 22.05, fake GPU device files) and through Tessera (8 simulated GPUs), timed from the
# first submission to the last job finished. Both get one node of 16 CPUs and 16000 MiB, and both
# are driven the way a user would: one CLI call per job (sbatch / tessera submit).
#
# Usage (as root; installs Slurm and munge with apt when they are missing, and writes
# /etc/slurm/slurm.conf and gres.conf):
#   bench/slurm-vs-tessera.sh [JOBS] [RUNS]        # defaults: 200 jobs, 3 runs each
# TESSERA_BIN_DIR=DIR uses the binaries built there instead of building a release (the test
# suite's smoke run of every bench script does, with a few jobs).
set -euo pipefail
JOBS=${1:-200}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
REPO=$PWD

if [ -z "${TESSERA_BIN_DIR:-}" ]; then
  cargo build --release --quiet
  TESSERA_BIN_DIR=$REPO/target/release
fi
TESSERA=$TESSERA_BIN_DIR/tessera

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi

S=$(mktemp -d)
PIDS=()
MUNGED_PID=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$S"/slurmctld.pid "$S"/slurmd.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  [ -n "$MUNGED_PID" ] && kill "$MUNGED_PID" 2>/dev/null || true
  sleep 1
  rm -rf "$S"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# --- Slurm -----------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge "$S/state" "$S/spool" "$S/log" "$S/fakegpu"
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -f /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create >/dev/null
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  MUNGED_PID=$(cat /run/munge/munged.pid)
fi
for i in $(seq 0 7); do mknod "$S/fakegpu/nvidia$i" c 195 "$i"; done
HOST=$(hostname)
mkdir -p /etc/slurm
sed "s#@SCRATCH@#$S#g; s#@HOST@#$HOST#g" bench/slurm/slurm.conf.in > /etc/slurm/slurm.conf
sed "s#@SCRATCH@#$S#g; s#@HOST@#$HOST#g" bench/slurm/gres.conf.in > /etc/slurm/gres.conf
slurmctld -i
slurmd
for _ in $(seq 100); do
  sinfo -h -o %t 2>/dev/null | grep -q idle && break
  scontrol update nodename="$HOST" state=resume 2>/dev/null || true
  sleep 0.2
done
sinfo -h -o %t | grep -q idle || { echo "slurmd did not come up; see $S/log" >&2; exit 1; }

slurm_times=()
for run in $(seq "$RUNS"); do
  t0=$(now)
  for _ in $(seq "$JOBS"); do sbatch -Q -o /dev/null --gres=gpu:1 --wrap true; done
  t_submitted=$(now)
  while [ -n "$(squeue -h)" ]; do sleep 0.1; done
  t1=$(now)
  slurm_times+=("$(elapsed "$t0" "$t1")")
  echo "slurm   run $run: $JOBS jobs submitted in $(elapsed "$t0" "$t_submitted") s, all finished after $(elapsed "$t0" "$t1") s"
done

# --- Tessera ---------------------------------------------------------------------------------
export TESSERA_CONFIG=$S/tessera-cli.yaml
# Free ports of its own (the defaults may be taken, and 7481 is the gateway's default).
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
TESSERA_LOG=warn "$TESSERA" up --data-dir "$S/tessera" --listen "127.0.0.1:$(port)" \
  --gateway-listen off \
  --simulate-gpus 8xH100-80GB --cpus 16 --memory 16000MiB >"$S/tessera-up.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  [ -f "$TESSERA_CONFIG" ] && "$TESSERA" nodes 2>/dev/null | grep -q ready && break
  sleep 0.2
done
"$TESSERA" nodes | grep -q ready || { cat "$S/tessera-up.log" >&2; exit 1; }

tessera_times=()
for run in $(seq "$RUNS"); do
  t0=$(now)
  for _ in $(seq "$JOBS"); do "$TESSERA" submit --gpu 1 -- true >/dev/null; done
  t_submitted=$(now)
  while [ "$("$TESSERA" jobs --state pending,scheduled,running -o json)" != "[]" ]; do sleep 0.1; done
  t1=$(now)
  tessera_times+=("$(elapsed "$t0" "$t1")")
  echo "tessera run $run: $JOBS jobs submitted in $(elapsed "$t0" "$t_submitted") s, all finished after $(elapsed "$t0" "$t1") s"
done
failed=$("$TESSERA" jobs --state failed,cancelled -o json)
[ "$failed" = "[]" ] || { echo "some Tessera jobs did not succeed: $failed" >&2; exit 1; }

echo
echo "first submission -> all $JOBS finished (s), per run"
echo "slurm:   ${slurm_times[*]}"
echo "tessera: ${tessera_times[*]}"
