#!/usr/bin/env bash
# The demo's zero-shot VQA step (called by run_scripts/demo.sh): questions about colour, shape, position, count and
# presence on the held-out synthetic images, in the official VQAv2 files (vqav2/ of the data dir), answered by the
# stage-2 export (never trained on a question) with the reference's prompt and decoding, and by the same model with
# blank images (the image-blind baseline).  [experiment=vqa_vqav2_eval]
#   bash run_scripts/demo_vqa.sh [OUT=outputs/demo] [Hydra overrides, e.g. the run's arch.num_query_tokens=16]
set -euo pipefail
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${1:-outputs/demo}
DATA=${BLIP2_DATA_DIR:-data}/synthetic
if [ ! -f "$DATA/vqav2/annotations/v2_mscoco_val2014_annotations.json" ]; then  # a data dir from before the VQA sets
  $PY -m blip2_train.demo.world_vqa --data-dir "$DATA"
fi
$BIN/blip2-eval experiment=vqa_vqav2_eval preset=tiny paths.stage2_checkpoint="$OUT/export_stage2" \
  eval.image_blind_baseline=true paths.output_dir="$OUT/eval_vqa" "${@:2}"
