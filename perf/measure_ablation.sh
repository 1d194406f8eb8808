#!/usr/bin/env bash
# The ablation evidence of docs/results.md (issue #22), end to end and resumable: re-running
# after a kill skips every finished stage and run.
#
#   bash perf/measure_ablation.sh [ROOT]        # ROOT defaults to ./moon2-measure
#
# 1. the demo's data (2,000 products, 10 % noise, seed 0): synth -> build-bench -> augment the
#    train split with the demo recipe; the full model and the four ablations, 3 seeds each,
#    2 epochs (the filter's warm-up is 20 % of the run, so every switch acts), each tested
#    against the full model over (query x seed) pairs: ROOT/grid/ablation.md
# 2. a noisier catalog (30 % noise), where the dynamic filter has more to find: the full model
#    against w/o dynamic filtering, 3 seeds: ROOT/grid-noise30/ablation.md
#
# About 5 minutes a run on 2 CPU cores alone (21 runs): run it on an otherwise idle machine if
# the times matter; the quality figures do not depend on the load.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-moon2-measure}
epochs=${EPOCHS:-2}
seeds=${SEEDS:-3}

data() {  # data NAME NOISE: a catalog, its benchmark and its augmented train split
    local name=$1 noise=$2
    moon2 synth "$root/$name/catalog" --products 2000 --noise "$noise" --seed 0
    if [[ ! -f "$root/$name/bench/manifest.json" ]]; then
        moon2 build-bench "$root/$name/catalog" "$root/$name/bench"
    fi
    moon2 augment "$root/$name/bench/train" "$root/$name/aug" \
        --config configs/augment/demo.yaml --no-ray
}

data noise10 0.1
moon2 ablate "$root/noise10/aug" "$root/grid" --bench "$root/noise10/bench" \
    --seeds "$seeds" --epochs "$epochs"

data noise30 0.3
moon2 ablate "$root/noise30/aug" "$root/grid-noise30" --bench "$root/noise30/bench" \
    --seeds "$seeds" --epochs "$epochs" --variants full,no_filter

echo "tables: $root/grid/ablation.md, $root/grid-noise30/ablation.md"
