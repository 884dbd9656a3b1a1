#!/usr/bin/env bash
# Synthetic captioned shapes -> tokenizer -> train/test shards, under ${BLIP2_DATA_DIR:-data}/synthetic.
# Idempotent: an existing, complete dataset is kept.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${BLIP2_DATA_DIR:-data}/synthetic
if [ -f "$DATA/shards/train/manifest.json" ] && [ -f "$DATA/tokenizer/tokenizer.json" ]; then
  echo "synthetic data ready in $DATA"; exit 0
fi
$PY data_scripts/make_synthetic.py --out "$DATA" --num-train "${NUM_TRAIN:-3000}" --num-val 100 --num-test "${NUM_TEST:-200}" --seed 0
$PY data_scripts/train_tokenizer.py --annotations "$DATA/annotations/coco_karpathy_train.json" --out "$DATA/tokenizer"
for split in train test; do
  $PY data_scripts/build_shards.py --format karpathy --annotations "$DATA/annotations/coco_karpathy_$split.json" \
    --images "$DATA" --out "$DATA/shards/$split" --shard-size 250 --workers 2
done
