#!/usr/bin/env bash
# blip2-eval experiment=caption_coco_eval on this machine (one process; the evaluation shards itself under torchrun:
#   torchrun --nproc_per_node=8 -m blip2_train.cli.evaluate experiment=caption_coco_eval ...).
# Extra arguments are Hydra overrides, e.g. model.stage1_checkpoint=exports/stage1 paths.data_dir=/data
exec bash "$(dirname "$0")/_launch.sh" eval caption_coco_eval "$@"
