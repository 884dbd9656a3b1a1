#!/usr/bin/env bash
# Shared by the workflow scripts: single-node launch through Lightning's launcher (it starts one process per
# GPU), or under srun (one task per GPU, started by SLURM). Usage: _launch.sh <train|eval> <experiment> [overrides]
set -euo pipefail
TOOL=$1; EXPERIMENT=$2; shift 2
GPUS=${GPUS:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)}
NODES=${NODES:-${SLURM_NNODES:-1}}
BIN=${BIN:-$(dirname "$(command -v blip2-train || echo .venv/bin/blip2-train)")}
if [ "$TOOL" = train ]; then
  exec "$BIN/blip2-train" experiment="$EXPERIMENT" trainer.devices="$GPUS" trainer.num_nodes="$NODES" "$@"
else
  exec "$BIN/blip2-eval" experiment="$EXPERIMENT" "$@"
fi
