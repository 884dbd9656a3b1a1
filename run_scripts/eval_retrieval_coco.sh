#!/usr/bin/env bash
# blip2-eval experiment=retrieval_coco_eval on this machine, one process per GPU (torchrun; under srun, one per task).
# Extra arguments are Hydra overrides, e.g. paths.stage1_checkpoint=exports/stage1 paths.data_dir=/data
exec bash "$(dirname "$0")/_launch.sh" eval retrieval_coco_eval "$@"
