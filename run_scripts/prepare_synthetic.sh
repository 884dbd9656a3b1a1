#!/usr/bin/env bash
# The synthetic world under ${BLIP2_DATA_DIR:-data}/synthetic, laid out as the real data (what preset=tiny reads):
# coco/ vg/ flickr30k/ nocaps/ annotations and images, shards/coco_karpathy_train and shards/vg_caption, and the
# two demo stand-ins: bert/ (tokenizer + tiny random BERT) and llm/ (tiny OPT trained on the captions' text and on
# text-only questions answered from a caption), and the VQA sets vqav2/ okvqa/ gqa/ on the test images.
# Idempotent: an existing, complete dataset is kept.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${BLIP2_DATA_DIR:-data}/synthetic
# (a data dir from before the VQA sets is made again: its demo LLM never learnt the question format)
if [ -f "$DATA/shards/vg_caption/manifest.json" ] && [ -f "$DATA/bert/config.json" ] && [ -f "$DATA/llm/config.json" ] \
   && [ -f "$DATA/vqav2/annotations/v2_mscoco_val2014_annotations.json" ]; then
  echo "synthetic data ready in $DATA"; exit 0
fi
$PY data_scripts/make_synthetic.py --out "$DATA" --num-train "${NUM_TRAIN:-3000}" --num-val 100 --num-test "${NUM_TEST:-200}" --seed 0
$PY data_scripts/train_tokenizer.py --annotations "$DATA/coco/annotations/coco_karpathy_train.json" --out "$DATA/bert" --tiny-bert
$PY data_scripts/build_shards.py --format karpathy --annotations "$DATA/coco/annotations/coco_karpathy_train.json" \
  --images "$DATA/coco/images" --out "$DATA/shards/coco_karpathy_train" --shard-size 250 --workers 2
$PY data_scripts/build_shards.py --format vg --annotations "$DATA/vg/annotations/vg_caption.json" \
  --images "$DATA/vg/images" --out "$DATA/shards/vg_caption" --shard-size 250 --workers 2
echo "DEMO STAND-IN for a pretrained LLM: tiny OPT trained on the captions' text only, and on questions about the"
echo "train scenes answered from their caption (the reading a real LLM brings to zero-shot VQA; never an image)"
$PY data_scripts/train_demo_llm.py --annotations "$DATA/coco/annotations/coco_karpathy_train.json" --out "$DATA/llm" \
  --qa-data-dir "$DATA" --steps 800
