#!/usr/bin/env bash
# `make bench`: the CPU-sized benchmarks on the synthetic world; each writes its figures into docs/benchmarks.md.
# On a GPU machine run the real-size ones listed in docs/benchmarks.md instead.
set -euo pipefail
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
DATA=${BLIP2_DATA_DIR:-data}/synthetic
bash run_scripts/prepare_synthetic.sh
$BIN/blip2-bench data --shards "$DATA/shards/coco_karpathy_train" --tokenizer "$DATA/bert" --batches 20 --batch-size 32
$BIN/blip2-bench eval --arch tiny --tokenizer "$DATA/bert" --annotation "$DATA/coco/annotations/coco_karpathy_test.json" \
  --image-root "$DATA/coco/images" --images 200 --k-test 128 --image-size 32
$BIN/blip2-bench train --stage 1 --arch tiny --batch-size 64 --image-size 32 --steps 10
$BIN/blip2-bench train --stage 2 --arch tiny --llm tiny --batch-size 32 --image-size 32 --steps 10
