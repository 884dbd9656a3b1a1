#!/usr/bin/env bash
# The synthetic world under ${BLIP2_DATA_DIR:-data}/synthetic, laid out as the real data (what preset=tiny reads):
# coco/ vg/ flickr30k/ nocaps/ annotations and images (coco/annotations/scenes.json: every image's objects),
# shards/coco_karpathy_train and shards/vg_caption, the VQA sets vqav2/ okvqa/ gqa/ on the test images, and the
# three demo stand-ins: bert/ (tokenizer + tiny random BERT), vit/ (the tiny ViT pretrained for seconds to name
# each cell's colour and shape on the train images: the frozen image encoder) and llm/ (tiny OPT trained on the
# captions' text and on text-only questions answered from the scene's description).
# Idempotent: an existing, complete dataset is kept.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${BLIP2_DATA_DIR:-data}/synthetic
# (a data dir of a former world, world.json's world_version, or without the ViT stand-in is made again)
VERSION=$($PY -c "from blip2_train.data.synthetic import WORLD_VERSION; print(WORLD_VERSION)")
if [ -f "$DATA/shards/vg_caption/manifest.json" ] && [ -f "$DATA/bert/config.json" ] && [ -f "$DATA/llm/config.json" ] \
   && [ -f "$DATA/vqav2/annotations/v2_mscoco_val2014_annotations.json" ] && [ -f "$DATA/vit/model.safetensors" ] \
   && grep -q "\"world_version\": $VERSION," "$DATA/world.json" 2>/dev/null; then
  echo "synthetic data ready in $DATA"; exit 0
fi
rm -rf "$DATA"  # generated; a partial or former world is made again whole
$PY data_scripts/make_synthetic.py --out "$DATA" --num-train "${NUM_TRAIN:-3000}" --num-val 100 --num-test "${NUM_TEST:-200}" --seed 0
$PY data_scripts/train_tokenizer.py --annotations "$DATA/coco/annotations/coco_karpathy_train.json" --out "$DATA/bert" --tiny-bert
$PY data_scripts/build_shards.py --format karpathy --annotations "$DATA/coco/annotations/coco_karpathy_train.json" \
  --images "$DATA/coco/images" --out "$DATA/shards/coco_karpathy_train" --shard-size 250 --workers 2
$PY data_scripts/build_shards.py --format vg --annotations "$DATA/vg/annotations/vg_caption.json" \
  --images "$DATA/vg/images" --out "$DATA/shards/vg_caption" --shard-size 250 --workers 2
echo "DEMO STAND-IN for a pretrained image encoder (opt-in: paths.vision_checkpoint=$DATA/vit): the tiny ViT,"
echo "pretrained on the train images to name each cell's colour and shape (no caption, no held-out image)"
$PY data_scripts/pretrain_demo_vit.py --data-dir "$DATA" --out "$DATA/vit"
echo "DEMO STAND-IN for a pretrained LLM: tiny OPT trained on the captions' text only, and on questions about the"
echo "train scenes answered from the scene's description (the reading a real LLM brings to zero-shot VQA; never an image)"
$PY data_scripts/train_demo_llm.py --annotations "$DATA/coco/annotations/coco_karpathy_train.json" --out "$DATA/llm" \
  --qa-data-dir "$DATA" --steps 800
