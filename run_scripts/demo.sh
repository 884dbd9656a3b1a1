#!/usr/bin/env bash
# `make demo`: the whole BLIP-2 method on the embedded synthetic world, CPU, minutes, through the REAL experiment
# files (conf/experiment/*.yaml) with only the size/data overlay preset=tiny, and the same commands a user runs:
#   stage 1 -> export -> COCO retrieval fine-tuning -> export -> retrieval evaluation
#           -> stage 2 -> export -> COCO caption fine-tuning -> export -> captioning evaluation (+ image-blind)
#                             -> zero-shot VQA; instruction tuning -> export -> VQA evaluation (+ image-blind)
#   -> captions from plain transformers -> summary table, metrics.json, report.md (PNG curves and grid)
# Jobs that do not read each other's output run two at a time (logs in outputs/demo/logs/): the LLM stand-in's
# training beside stage 1, the retrieval branch (steps 3-5) beside stage 2, instruction tuning (7b-d) beside caption
# fine-tuning and the evaluations.
# Extra arguments are Hydra overrides for every training run (e.g. trainer.max_steps=200 for a quicker look).
set -euo pipefail
export WANDB_MODE=${WANDB_MODE:-offline}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=outputs/demo
DATA=${BLIP2_DATA_DIR:-data}/synthetic
# 16 queries for every run (an evaluation builds the model it loads the export into from the same overrides)
ARCH=(arch.num_query_tokens=16)
# Retrieval re-ranks with the two heads' log-probabilities (eval.rerank_score=product: log p_ITM(match) + ITC
# cosine / temperature) instead of the reference's ITM logit + cosine, which at this size lets a raw ITM logit
# overrule ITC wherever the two disagree (docs/itm_at_tiny_size.md); every evaluation reports both
RERANK=(eval.rerank_score=product)
TINY=(preset=tiny trainer=cpu logger=csv "${ARCH[@]}" "${RERANK[@]}")  # training runs
EVAL=(preset=tiny "${ARCH[@]}" "${RERANK[@]}")                         # evaluation runs (blip2-eval has no trainer)
# Stage 1 and retrieval fine-tuning at tiny size (docs/itm_at_tiny_size.md: what makes ITM learn here): ITC
# weighted 0.1 and no Q-Former dropout (batch 32 is preset=tiny's); stage 1 starts from the pretrained ViT
# stand-in, frozen (retrieval fine-tuning takes the ViT from the stage-1 export, unfrozen)
ITM_TINY=(loss_weights=tiny arch.qformer.hidden_dropout_prob=0 arch.qformer.attention_probs_dropout_prob=0)
START=$(date +%s); export DEMO_START=$START  # demo_summary.py records the time against its 10-min target
step() { echo; echo "== $* ==  [$(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s]"; }
source run_scripts/demo_jobs.sh  # background / check / finish

step "0/10 synthetic world in the real data layout, with the demo stand-ins for BERT and the ViT"
# alone on the machine, on every thread (the ViT stand-in's pretraining takes about a minute)
bash run_scripts/prepare_synthetic.sh data
# Two jobs at a time, one thread each, where one does not read the other's output: at these sizes a second
# thread speeds a process up by almost nothing (300 stage-1 steps: 68 s on 2 threads, 69 s on 1), and the
# import and start-up seconds of one job overlap the other's work (docs/itm_at_tiny_size.md: what it saves).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$OUT"; mkdir -p "$OUT/logs"
# the LLM stand-in: stage 2 is the first to read it
background llm_stand_in bash run_scripts/prepare_synthetic.sh llm
step "1/10 stage 1: Q-Former (ITC + ITM + LM) over the frozen ViT stand-in  [experiment=stage1_pretrain]"
$BIN/blip2-train experiment=stage1_pretrain "${TINY[@]}" "${ITM_TINY[@]}" paths.vision_checkpoint="$DATA/vit" \
  trainer.max_steps=1400 paths.output_dir="$OUT/stage1" "$@"
step "2/10 export stage 1 (Blip2ForImageTextRetrieval format)"
$BIN/blip2-export "$OUT/stage1/checkpoints/last.ckpt" --out "$OUT/export_stage1"

retrieval() {  # steps 3-5, beside stage 2
  # what ITM and the Q-Former LM learnt, on held-out images through plain transformers' Blip2ForImageTextRetrieval
  $PY run_scripts/demo_stage1_check.py "$OUT/export_stage1" "$DATA" "$OUT/stage1_check.json" "${EVAL[@]}"
  step "3/10 COCO retrieval fine-tuning: ViT unfrozen, layer-wise lr decay  [experiment=retrieval_coco_ft]"
  $BIN/blip2-train experiment=retrieval_coco_ft "${TINY[@]}" "${ITM_TINY[@]}" \
    paths.stage1_checkpoint="$OUT/export_stage1" module.lr=1e-4 trainer.max_steps=300 eval.enabled=false \
    paths.output_dir="$OUT/retrieval_ft" "$@"
  step "4/10 export the retrieval model"
  $BIN/blip2-export "$OUT/retrieval_ft/checkpoints/last.ckpt" --out "$OUT/export_retrieval"
  $PY run_scripts/demo_stage1_check.py "$OUT/export_retrieval" "$DATA" "$OUT/retrieval_check.json" "${EVAL[@]}"
  step "5/10 retrieval evaluation of the export (ITC top-k + ITM re-ranking)  [experiment=retrieval_coco_eval]"
  $BIN/blip2-eval experiment=retrieval_coco_eval "${EVAL[@]}" paths.stage1_checkpoint="$OUT/export_retrieval" \
    paths.output_dir="$OUT/eval_retrieval"
}
step "3-5/10 retrieval: stage-1 checks, COCO retrieval fine-tuning, export, evaluation  [retrieval_coco_ft, _eval]"
background retrieval retrieval "$@"
finish llm_stand_in
step "6/10 stage 2: stage-1 Q-Former -> frozen demo LLM  [experiment=stage2_pretrain]"
$BIN/blip2-train experiment=stage2_pretrain "${TINY[@]}" paths.stage1_checkpoint="$OUT/export_stage1" paths.llm_dir="$DATA/llm" \
  trainer.max_steps=800 callbacks.periodic_eval.every_n_steps=200 paths.output_dir="$OUT/stage2" "$@"
step "7/10 export stage 2 (Blip2ForConditionalGeneration + Blip2Processor)"
$BIN/blip2-export "$OUT/stage2/checkpoints/last.ckpt" --out "$OUT/export_stage2"
instruct() {  # steps 7b-7d, beside caption fine-tuning and the evaluations of steps 9-10
  step "7b/10 instruction tuning of the stage-2 export: captions + questions of four kinds, one kind held out  [experiment=instruct_tune]"
  # model=instruct_opt: the LLM stand-in is an OPT. Its Q-Former's text parts come from the stage-1 export (the
  # demo's BERT is random: a real run takes them from bert-base-uncased). The demo's instruction templates are its
  # question kinds, in the one answer format the LLM stand-in reads ("Question: {} Short answer:"; the paper's
  # ten phrasings are for LLMs that read them all), and 20% of the batches are captions ("describe")
  $BIN/blip2-train experiment=instruct_tune model=instruct_opt "${TINY[@]}" paths.stage2_checkpoint="$OUT/export_stage2" \
    paths.llm_dir="$DATA/llm" model.stage1_checkpoint="$OUT/export_stage1" 'data.templates.vqa=["Question: {} Short answer:"]' \
    data.train_sources.0.weight=20 trainer.max_steps=1800 eval.enabled=false paths.output_dir="$OUT/instruct" "$@"
  step "7c/10 export it (InstructBlipForConditionalGeneration + InstructBlipProcessor)"
  $BIN/blip2-export "$OUT/instruct/checkpoints/last.ckpt" --out "$OUT/export_instruct"
  step "7d/10 VQA evaluation of the instruction-tuned export, with the image-blind baseline  [experiment=vqa_vqav2_eval]"
  $BIN/blip2-eval experiment=vqa_vqav2_eval "${EVAL[@]}" paths.stage2_checkpoint="$OUT/export_instruct" \
    eval.image_blind_baseline=true paths.output_dir="$OUT/eval_instruct_vqa"
}
# instruction tuning from the stage-2 export, and its VQA evaluation
background instruct instruct "$@"
check retrieval
step "8/10 COCO caption fine-tuning: prompt \"a photo of\", ViT unfrozen  [experiment=caption_coco_ft]"
$BIN/blip2-train experiment=caption_coco_ft "${TINY[@]}" paths.stage2_checkpoint="$OUT/export_stage2" \
  module.lr=1e-4 trainer.max_steps=300 eval.enabled=false paths.output_dir="$OUT/caption_ft" "$@"
$BIN/blip2-export "$OUT/caption_ft/checkpoints/last.ckpt" --out "$OUT/export_caption"
check retrieval; check instruct
step "9/10 captioning evaluation of the export, with the image-blind baseline  [experiment=caption_coco_eval]"
$BIN/blip2-eval experiment=caption_coco_eval "${EVAL[@]}" paths.stage2_checkpoint="$OUT/export_caption" \
  eval.image_blind_baseline=true paths.output_dir="$OUT/eval_caption"
step "9b/10 zero-shot VQA of the stage-2 export, with the image-blind baseline  [experiment=vqa_vqav2_eval]"
env PY="$PY" bash run_scripts/demo_vqa.sh "$OUT" "${ARCH[@]}"
step "10/10 captions from plain transformers, then the summary"
$PY run_scripts/demo_transformers_caption.py "$OUT/export_caption" "$DATA" 4
finish retrieval
finish instruct
$PY run_scripts/demo_summary.py "$OUT" "$DATA"
echo "make demo: $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s"
