#!/usr/bin/env bash
# Shared by the workflow scripts. Training: Lightning's launcher starts one process per GPU (or srun started one
# task per GPU). Evaluation: torchrun starts one process per GPU (or srun did); blip2-eval joins the process
# group from the environment and each rank takes its share of the images.
# Usage: _launch.sh <train|eval> <experiment> [Hydra overrides]
set -euo pipefail
TOOL=$1; EXPERIMENT=$2; shift 2
GPUS=${GPUS:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)}
NODES=${NODES:-${SLURM_NNODES:-1}}
BIN=${BIN:-$(dirname "$(command -v blip2-train || echo .venv/bin/blip2-train)")}
PYTHON=${PYTHON:-$([ -x "$BIN/python" ] && echo "$BIN/python" || echo python3)}
if [ "$TOOL" = train ]; then
  exec "$BIN/blip2-train" experiment="$EXPERIMENT" trainer.devices="$GPUS" trainer.num_nodes="$NODES" "$@"
elif [ -n "${SLURM_PROCID:-}" ] || [ "$GPUS" -le 1 ]; then
  exec "$BIN/blip2-eval" experiment="$EXPERIMENT" "$@"
else
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m blip2_train.cli.evaluate \
    experiment="$EXPERIMENT" "$@"
fi
