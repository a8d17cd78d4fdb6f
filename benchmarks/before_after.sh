#!/bin/bash
# The planted full-size Qwen-Image run, the package before and after, side by side in one call,
# each with empty compile caches of its own (RESULTS.md, "Time to an answer").
#
#   git archive 22249cb layerscan | tar -x -C .before     # the code before, beside this checkout
#   rm -rf .before/layerscan/demo/pipeline                 # the demo's weights: not needed here
#   bash benchmarks/before_after.sh .before "before (22249cb)" OUT_DIR
#
# Writes OUT_DIR/fullsize_planted_before.json and OUT_DIR/fullsize_planted_after.json.
set -u
before_code=$1 before_label=$2 out=$3
mkdir -p "$out"
python3 -c "import torch; torch.zeros(1, device='cuda'); import diffusers, transformers"  # warm imports
common=(--mode compiled --plant --steps 20 --prompts 3 --size 1024 --strategy auto --max-trials 8
        --criterion-mean "floor - 8" --criterion-worst "floor - 12")
for which in before after; do
  code=.; label=after
  if [ "$which" = before ]; then code=$before_code; label=$before_label; fi
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$which TRITON_CACHE_DIR=/tmp/triton-$which timeout 290 \
    python benchmarks/bench_fullsize_run.py --code "$code" --label "$label" "${common[@]}" \
    --out "$out/fullsize_planted_$which.json" > "$out/planted_$which.log" 2>&1
  echo "$which: exit $?"
done
