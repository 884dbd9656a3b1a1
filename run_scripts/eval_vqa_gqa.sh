#!/usr/bin/env bash
# blip2-eval experiment=vqa_gqa_eval on this machine, one process per GPU (torchrun; under srun, one per task).
# Extra arguments are Hydra overrides, e.g. paths.stage2_checkpoint=exports/stage2 paths.data_dir=/data
exec bash "$(dirname "$0")/_launch.sh" eval vqa_gqa_eval "$@"
