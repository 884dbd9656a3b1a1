#!/usr/bin/env bash
# The synthetic world under ${BLIP2_DATA_DIR:-data}/synthetic, laid out as the real data (what preset=tiny reads):
# coco/ vg/ flickr30k/ nocaps/ annotations and images (coco/annotations/scenes.json: every image's objects),
# shards/coco_karpathy_train, shards/vg_caption, shards/vqav2_train (training questions on the train images, one
# kind held out: world_vqa.DEMO_HELD_OUT) and shards/vg_qa (Visual Genome QA's layout), the VQA sets vqav2/ okvqa/ gqa/ on the test images, and the
# three demo stand-ins: bert/ (tokenizer + tiny random BERT), vit/ (the tiny ViT pretrained for seconds to name
# each cell's colour and shape on the train images: the frozen image encoder) and llm/ (tiny OPT trained on the
# captions' text, each after its scene's description (half also after caption fine-tuning's prompt), and on
# text-only questions answered from that description).
# Idempotent: an existing, complete dataset is kept.
#   bash run_scripts/prepare_synthetic.sh [all|data|llm]
# `data`: all but the LLM stand-in; `llm`: the LLM stand-in alone, on the data (make demo trains it beside stage
# 1, which does not read it); `all` (the default): both.
set -euo pipefail
PART=${1:-all}
case "$PART" in all|data|llm) ;; *) echo "usage: prepare_synthetic.sh [all|data|llm] (got '$PART')" >&2; exit 2;; esac
PY=${PY:-.venv/bin/python}
DATA=${BLIP2_DATA_DIR:-data}/synthetic
# The demo's world: one to three shapes per image, ten colours (docs/itm_at_tiny_size.md: two or more shapes and
# more colours give each image a caption of its own, rarer words for CIDEr, and ITM hard negatives that differ)
WORLD=(--num-colors 10 --min-objects 1 --max-objects 3)
# a data dir of another world (world.json: make_synthetic's version and this world), or without the ViT stand-in,
# is made again
same_world() { $PY data_scripts/make_synthetic.py "${WORLD[@]}" --matches "$DATA"; }
# The LLM stand-in's recipe (llm/recipe.txt): its arguments and a fingerprint of the code that makes its model and
# its texts; an LLM trained another way (or by other code) is trained again. The prompt is
# experiment=caption_coco_ft's model.text.prompt (its owner; a test keeps the two equal)
LLM=(--caption-context description --caption-prompt "a photo of" --steps 700)
LLM_CODE=(data_scripts/train_demo_llm.py blip2_train/demo/llm.py blip2_train/demo/world_vqa.py
  blip2_train/eval/vqa.py)
llm_recipe() { echo "${LLM[*]} code $(cat "${LLM_CODE[@]}" | sha256sum | cut -c1-16)"; }
# The ViT stand-in's recipe (vit/recipe.txt), checked the same way: a ViT pretrained another way is pretrained
# again, the data kept. 3000 steps (45-60 s on 2 cores): per patch 99% colour, 97% shape and 100% cell on train
# images it did not train on (docs/itm_at_tiny_size.md: the cell is what lets ITM re-ranking help)
VIT=(--steps 3000)
VIT_CODE=(data_scripts/pretrain_demo_vit.py blip2_train/demo/vit.py)
vit_recipe() { echo "${VIT[*]} code $(cat "${VIT_CODE[@]}" | sha256sum | cut -c1-16)"; }
vit_ready() {
  [ -f "$DATA/vit/model.safetensors" ] && [ "$(cat "$DATA/vit/recipe.txt" 2>/dev/null)" = "$(vit_recipe)" ]
}
data_ready() {
  [ -f "$DATA/shards/vg_caption/manifest.json" ] && [ -f "$DATA/shards/vqav2_train/manifest.json" ] \
    && [ -f "$DATA/shards/vg_qa/manifest.json" ] \
    && [ -f "$DATA/bert/config.json" ] \
    && [ -f "$DATA/vqav2/annotations/v2_mscoco_val2014_annotations.json" ] && same_world
}
llm_ready() {
  [ -f "$DATA/llm/config.json" ] && [ "$(cat "$DATA/llm/recipe.txt" 2>/dev/null)" = "$(llm_recipe)" ]
}

if [ "$PART" != llm ]; then
  if data_ready; then
    echo "synthetic data ready in $DATA"
  else
    if [ -e "$DATA" ]; then echo "$DATA is incomplete or of another world (world.json): making it again"; fi
    rm -rf "$DATA"  # generated; a partial dir or another world's is made again whole
    $PY data_scripts/make_synthetic.py "${WORLD[@]}" --out "$DATA" --num-train "${NUM_TRAIN:-3000}" --num-val 100 \
      --num-test "${NUM_TEST:-200}" --seed 0
    $PY data_scripts/train_tokenizer.py --annotations "$DATA/coco/annotations/coco_karpathy_train.json" \
      --out "$DATA/bert" --tiny-bert
    $PY data_scripts/build_shards.py --format karpathy --annotations "$DATA/coco/annotations/coco_karpathy_train.json" \
      --images "$DATA/coco/images" --out "$DATA/shards/coco_karpathy_train" --shard-size 250 --workers 2
    $PY data_scripts/build_shards.py --format vg --annotations "$DATA/vg/annotations/vg_caption.json" \
      --images "$DATA/vg/images" --out "$DATA/shards/vg_caption" --shard-size 250 --workers 2
    VQA_TRAIN="$DATA/vqav2/annotations/v2_OpenEnded_mscoco_train2014_questions.json"
    VQA_TRAIN+=",$DATA/vqav2/annotations/v2_mscoco_train2014_annotations.json"
    $PY data_scripts/build_shards.py --format vqa --annotations "$VQA_TRAIN" --images "$DATA/vqav2/images" \
      --out "$DATA/shards/vqav2_train" --shard-size 250 --workers 2
    $PY data_scripts/build_shards.py --format vg_qa --annotations "$DATA/vg/annotations/question_answers.json" \
      --images "$DATA/vg/qa_images" --out "$DATA/shards/vg_qa" --shard-size 250 --workers 2
  fi
  if vit_ready; then
    echo "ViT stand-in ready in $DATA/vit"
  else
    if [ -e "$DATA/vit" ]; then echo "$DATA/vit was pretrained another way (vit/recipe.txt): pretraining it again"; fi
    rm -rf "$DATA/vit"
    echo "DEMO STAND-IN for a pretrained image encoder (opt-in: paths.vision_checkpoint=$DATA/vit): the tiny ViT,"
    echo "pretrained on the train images to name each cell's colour and shape, and which cell each patch lies in"
    echo "(no caption, no held-out image)"
    $PY data_scripts/pretrain_demo_vit.py --data-dir "$DATA" --out "$DATA/vit" "${VIT[@]}"
    vit_recipe > "$DATA/vit/recipe.txt"
  fi
fi
if [ "$PART" != data ]; then
  if ! data_ready || ! vit_ready; then echo "no synthetic data in $DATA for the LLM stand-in: run prepare_synthetic.sh data first" >&2; exit 2; fi
  if llm_ready; then
    echo "LLM stand-in ready in $DATA/llm"
  else
    if [ -e "$DATA/llm" ]; then echo "$DATA/llm was trained another way (llm/recipe.txt): training it again"; fi
    rm -rf "$DATA/llm"
    echo "DEMO STAND-IN for a pretrained LLM: tiny OPT trained on text only: the captions, each after its scene's"
    echo "description (half of them also after caption fine-tuning's prompt), and questions about the train scenes"
    echo "answered from it (the reading a real LLM brings to the soft prompt and to zero-shot VQA; never an image)"
    $PY data_scripts/train_demo_llm.py --annotations "$DATA/coco/annotations/coco_karpathy_train.json" --out "$DATA/llm" \
      --qa-data-dir "$DATA" "${LLM[@]}"
    llm_recipe > "$DATA/llm/recipe.txt"
  fi
fi
