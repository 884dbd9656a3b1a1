#!/usr/bin/env bash
# `make demo`: synthetic data -> stage-1 pretraining (tiny Q-Former over a tiny frozen ViT) -> export ->
# retrieval evaluation of the export with plain transformers-format weights. CPU, a few minutes.
set -euo pipefail
export WANDB_MODE=${WANDB_MODE:-offline}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=outputs/demo
bash run_scripts/prepare_synthetic.sh
rm -rf "$OUT/stage1" "$OUT/export_stage1"
$BIN/blip2-train experiment=demo_stage1 paths.output_dir="$OUT/stage1" "$@"
$BIN/blip2-export "$OUT/stage1/checkpoints/last.ckpt" --out "$OUT/export_stage1"
$BIN/blip2-eval experiment=demo_retrieval_eval model.stage1_checkpoint="$OUT/export_stage1" paths.output_dir="$OUT/eval_retrieval"
$PY run_scripts/demo_summary.py "$OUT"
