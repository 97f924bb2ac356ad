#!/usr/bin/env bash
# Placement quality where tasks pin GPU models: constrained variants of openb pod lists (a share
# of GPU tasks name the models they accept, drawn three ways), every policy, FGD's protocol.
#
# usage: bench/openb-constrained.sh TRACES_DIR [SEEDS] [BASES] [SHARES] [SETS] [POLICIES]
#   TRACES_DIR  the openb CSVs (openb_node_list_gpu_node.csv and openb_pod_list_<base>.csv)
#   SEEDS       replay seeds (default 42..51)
#   BASES       pod lists to constrain (default "default gpushare80 multigpu50 cpu250")
#   SHARES      shares of GPU tasks that pin models (default "0.10 0.25 0.45")
#   SETS        how allowed sets are drawn (default "plentiful scarce family")
#   POLICIES    policies to replay (default all)
# Variants, curves, summary.json and plots go to $OUT (default sim-constrained/).
set -euo pipefail
T=$(realpath "${1:?usage: bench/openb-constrained.sh TRACES_DIR [SEEDS] [BASES] [SHARES] [SETS] [POLICIES]}")
SEEDS=${2:-42..51}
BASES=${3:-default gpushare80 multigpu50 cpu250}
SHARES=${4:-0.10 0.25 0.45}
SETS=${5:-plentiful scarce family}
POLICIES=${6:-all}
BIN=$(realpath "${TESSERA_BIN_DIR:-target/release}/tessera")
OUT=${OUT:-sim-constrained}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
pods=()
for base in $BASES; do
  for share in $SHARES; do
    for sets in $SETS; do
      pct=$(awk -v s="$share" 'BEGIN { printf "%02d", s * 100 + 0.5 }')
      variant="$OUT/openb_pod_list_${base}_spec${pct}_${sets}.csv"
      # Variant seed 1: the same variants on every machine; the replay seeds vary the order.
      "$BIN" sim constrain --nodes "$T/openb_node_list_gpu_node.csv" \
        --pods "$T/openb_pod_list_$base.csv" --share "$share" --sets "$sets" --seed 1 \
        --out "$variant" >&2
      pods+=(--pods "$variant")
    done
  done
done
"$BIN" sim openb --nodes "$T/openb_node_list_gpu_node.csv" "${pods[@]}" \
  --policy "$POLICIES" --seeds "$SEEDS" --out "$OUT"
