#!/usr/bin/env bash
# stage1_pretrain on one node, all visible GPUs (GPUS=N to choose). Extra arguments are Hydra overrides, e.g.
#   bash run_scripts/stage1_pretrain.sh paths.data_dir=/data strategy=deepspeed_zero2
# Resumes automatically from this run directory's last checkpoint when paths.output_dir is reused
# (ckpt_path=auto).
exec bash "$(dirname "$0")/_launch.sh" train stage1_pretrain ckpt_path=auto "$@"
