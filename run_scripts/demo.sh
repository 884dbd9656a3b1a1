#!/usr/bin/env bash
# `make demo`: the whole BLIP-2 method on embedded synthetic data, CPU, minutes.
#   data -> demo LLM stand-in -> stage 1 -> export -> retrieval eval -> stage 2 -> export -> captioning eval
#   -> a caption from plain transformers -> summary table, metrics.json, report.md (PNG curves and grid)
set -euo pipefail
export WANDB_MODE=${WANDB_MODE:-offline}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=outputs/demo
DATA=${BLIP2_DATA_DIR:-data}/synthetic
step() { echo; echo "== $* =="; }

step "0/7 synthetic captioned shapes -> tokenizer -> WebDataset shards"
bash run_scripts/prepare_synthetic.sh
if [ ! -f "$DATA/llm/config.json" ]; then
  step "0/7 DEMO STAND-IN for a pretrained LLM: tiny OPT trained on the captions' text only"
  $PY data_scripts/train_demo_llm.py --annotations "$DATA/annotations/coco_karpathy_train.json" --out "$DATA/llm"
fi
rm -rf "$OUT"
step "1/7 stage 1: Q-Former (ITC + ITM + LM) over a frozen tiny ViT"
$BIN/blip2-train experiment=demo_stage1 paths.output_dir="$OUT/stage1" final_eval.enabled=false "$@"
step "2/7 export stage 1 (Blip2ForImageTextRetrieval format)"
$BIN/blip2-export "$OUT/stage1/checkpoints/last.ckpt" --out "$OUT/export_stage1"
step "3/7 retrieval evaluation of the export (ITC top-k + ITM re-ranking)"
$BIN/blip2-eval experiment=demo_retrieval_eval model.stage1_checkpoint="$OUT/export_stage1" paths.output_dir="$OUT/eval_retrieval"
step "4/7 stage 2: stage-1 Q-Former -> frozen demo LLM"
$BIN/blip2-train experiment=demo_stage2 paths.stage1_checkpoint="$OUT/export_stage1" paths.output_dir="$OUT/stage2" final_eval.enabled=false
step "5/7 export stage 2 (Blip2ForConditionalGeneration + Blip2Processor)"
$BIN/blip2-export "$OUT/stage2/checkpoints/last.ckpt" --out "$OUT/export_stage2"
step "6/7 captioning evaluation of the export, with the image-blind baseline"
$BIN/blip2-eval experiment=demo_caption_eval paths.stage2_checkpoint="$OUT/export_stage2" paths.output_dir="$OUT/eval_caption"
step "7/7 captions from plain transformers, then the summary"
$PY run_scripts/demo_transformers_caption.py "$OUT/export_stage2" "$DATA" 4
$PY run_scripts/demo_summary.py "$OUT" "$DATA"
