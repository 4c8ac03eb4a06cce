#!/usr/bin/env bash
# From-scratch beans recipes, one per GPU at a time (single-process runs), logs to $1.
# Each line of $2 (a recipe file) is: name <vitboost train flags...>
set -u
out=${1:-results/sweep}; recipes=${2:-benchmarks/recipes.txt}; mkdir -p "$out"
export HF_HUB_OFFLINE=1
ngpu=$(nvidia-smi -L | wc -l); slot=0
while read -r name flags; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  CUDA_VISIBLE_DEVICES=$slot python3 -m vitboost train --dataset data/beans --output /tmp/sweep_$name --overwrite \
    --cache_dir /tmp/vbcache --no-progress $flags > "$out/$name.log" 2>&1 &
  slot=$(( (slot + 1) % ngpu ))
  [ $slot -eq 0 ] && wait
done < "$recipes"
wait
for f in "$out"/*.log; do echo "$(basename $f .log): $(grep -h 'eval accuracy' $f | tr '\n' ' ') $(grep -o '"train_seconds": [0-9.]*' /tmp/sweep_$(basename $f .log)/summary.json 2>/dev/null)"; done
