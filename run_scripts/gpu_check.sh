#!/usr/bin/env bash
# The GPU check: every GPU figure and GPU-only test of this framework in ONE call on a lent GPU machine (no package
# registry there, ~15 min of device time in all, its start included). Build the kit here first (`make gpu-kit`),
# then on the machine, from the repository root, carrying .gpu-kit:
#
#     OUT=/some/dir bash run_scripts/gpu_check.sh        # -> $OUT/gpu_check.json, gpu_check.md, gpu_check.log
#
# Steps, each under its own `timeout`, its figures kept whatever a later step does (the report is rewritten
# after every step), the most valuable figures first (run_scripts/gpu_check.py STEPS):
#   install  env  bench_stage1  bench_stage2_opt  bench_stage2_llama7b  qlora_7b  gpu_tests  eval_bench  levers
#
# Environment:
#   GPU_CHECK_DEVICE=cuda|cpu   cpu: the dry run (tiny sizes, on the CPU; `make test` runs it, under 2 minutes)
#   GPU_CHECK_SKIP_INSTALL=1    use this Python as it is instead of installing .gpu-kit into it
#   GPU_CHECK_PYTHON=python3    the interpreter (the GPU machine's python3 holds its torch)
#   GPU_CHECK_BUDGET_S          the whole check's time (default 470 s on CUDA, 300 s on CPU): a step never runs past
#                               it; one that cannot start in time is recorded as skipped
#   GPU_CHECK_EVAL_IMAGES       the retrieval slice (default 1000 on CUDA, 12 on CPU; 5000 = the whole COCO 5k shape)
#   GPU_CHECK_TEST_WORKERS      pytest-xdist workers for the gpu tests (default 4 on CUDA where xdist is there, 0 on CPU)
#   GPU_CHECK_TEST_TIMEOUT      seconds a gpu test may take (default 120 on CUDA, 300 on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${GPU_CHECK_PYTHON:-python3}
KIT=${GPU_CHECK_KIT:-$REPO/.gpu-kit}
OUT=${OUT:-$REPO/outputs/gpu_check}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
# nothing can be fetched there: fail at once instead of waiting on a hub or W&B
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GPU_CHECK_DEVICE=$DEVICE
if [[ $DEVICE == cpu ]]; then
  # one thread a process: the dry run shares 2 cores with whatever else runs (threads spinning against each other
  # cost more than they bring at tiny size)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BUDGET=${GPU_CHECK_BUDGET_S:-300}
  EVAL_IMAGES=${GPU_CHECK_EVAL_IMAGES:-12}
else
  BUDGET=${GPU_CHECK_BUDGET_S:-470}
  EVAL_IMAGES=${GPU_CHECK_EVAL_IMAGES:-1000}
fi
START=$SECONDS
echo "{\"device_mode\": \"$DEVICE\", \"started\": \"$(date '+%Y-%m-%d %H:%M:%S %z')\", \"budget_s\": $BUDGET, \"python\": \"$PY\", \"repo\": \"$REPO\"}" >"$WORK/meta.json"

report() { "$PY" run_scripts/gpu_check.py report --work "$WORK" --out "$OUT" >>"$LOG" 2>&1 || echo "report failed" >>"$LOG"; }

# step NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, what is left of the budget), log it, record it, report
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    "$PY" run_scripts/gpu_check.py done --work "$WORK" --name "$name" --skipped "out of the check's ${BUDGET} s budget" \
      --command "$*" >>"$LOG" 2>&1
    report
    return 0
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=15 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  tail -n 400 "$WORK/$name.log" >>"$LOG"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  "$PY" run_scripts/gpu_check.py done --work "$WORK" --name "$name" --rc "$rc" --seconds "$((SECONDS - t0))" \
    --limit "$limit" --command "$*" >>"$LOG" 2>&1
  report
}

# 1. the kit, offline, into this Python (or a --target folder on PYTHONPATH if pip cannot resolve in place)
if [[ ${GPU_CHECK_SKIP_INSTALL:-0} == 1 ]]; then
  "$PY" run_scripts/gpu_check.py done --work "$WORK" --name install \
    --skipped "GPU_CHECK_SKIP_INSTALL=1: this Python as it is ($PY)" >>"$LOG" 2>&1
  report
else
  step install 120 "$PY" run_scripts/gpu_kit.py install --kit "$KIT" --work "$WORK" --json "$WORK/install.json"
  [[ -f $WORK/pythonpath ]] && export PYTHONPATH=$(cat "$WORK/pythonpath")${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. what runs where
step env 60 "$PY" run_scripts/gpu_check.py env --json "$WORK/env.json"

# 3. training steps at real size (random weights, synthetic tensors); the dry run takes the same code paths tiny
BENCH=("$PY" -m blip2_train.cli.bench train --doc "$WORK/bench.md")
if [[ $DEVICE == cpu ]]; then
  SIZE=(--arch tiny --image-size 32 --batch-size 4 --steps 1 --warmup 0 --device cpu)
  OPT=tiny LLAMA=tiny-llama B2=4 B7=4
else
  SIZE=(--arch vitg --image-size 224 --steps 10 --warmup 3 --device cuda)
  OPT=opt-2.7b LLAMA=llama-7b B2=64 B7=16
fi
step bench_stage1 100 "${BENCH[@]}" --stage 1 "${SIZE[@]}" $([[ $DEVICE == cpu ]] || echo --batch-size 100) \
  --json "$WORK/bench_stage1.json"
step bench_stage2_opt 100 "${BENCH[@]}" --stage 2 --llm "$OPT" "${SIZE[@]}" --batch-size "$B2" \
  --json "$WORK/bench_stage2_opt.json"
step bench_stage2_llama7b 120 "${BENCH[@]}" --stage 2 --llm "$LLAMA" "${SIZE[@]}" --batch-size "$B7" \
  --json "$WORK/bench_stage2_llama7b.json"
# QLoRA: the 7B-shaped LLM in NF4 + LoRA through the real builder (weights made and saved here first), its measured
# peak beside blip2-bench memory's prediction
if [[ $DEVICE == cpu ]]; then
  QLORA=(--llm tiny-llama --arch tiny --image-size 32 --batch-size 2 --steps 1)
else
  QLORA=(--llm llama-7b --arch vitg --image-size 224 --batch-size 8 --steps 3)
fi
step qlora_7b 200 "$PY" -m blip2_train.cli.bench memory "${QLORA[@]}" --adapter lora --quant nf4 --measure \
  --doc "$WORK/bench.md" --json "$WORK/qlora_7b.json"

# 4. the gpu-marked tests (they fail without CUDA unless GPU_CHECK_DEVICE=cpu)
WORKERS=${GPU_CHECK_TEST_WORKERS:-$([[ $DEVICE == cpu ]] && echo 0 || echo 4)}
# per test (pytest-timeout): a hung test fails alone and the others still report
export GPU_CHECK_TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-$([[ $DEVICE == cpu ]] && echo 300 || echo 120)}
XDIST=()
if ((WORKERS > 0)) && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); fi
step gpu_tests 240 env GPU_CHECK_RECORD="$WORK/gpu_tests_records.jsonl" "$PY" -m pytest tests/gpu -m gpu -q -rA \
  -p no:cacheprovider --basetemp "$WORK/pytest" --junitxml "$WORK/gpu_tests.xml" "${XDIST[@]}"

# 5. retrieval evaluation at COCO-5k shape, a slice sized to what is left: an image brings 6 x k_test ITM pairs of
#    ~30 GFLOP each (ViT-g tokens at 364 px), re-ranked by the batched protocol twice (its warm-up) and the baseline once
if [[ $DEVICE == cpu ]]; then
  EVAL=(--device cpu --arch tiny --image-size 32 --k-test 8 --source-px 48 --images "$EVAL_IMAGES")
else
  left=$((BUDGET - (SECONDS - START)))
  if [[ -z ${GPU_CHECK_EVAL_IMAGES:-} ]] && ((left < 200)); then EVAL_IMAGES=500; fi
  EVAL=(--device cuda --arch vitg --image-size 364 --k-test 128 --images "$EVAL_IMAGES")
fi
step eval_bench 300 "$PY" run_scripts/gpu_check.py eval-bench --work "$WORK" --json "$WORK/eval_bench.json" "${EVAL[@]}"

# 6. the Q-Former's speed levers at the paper's stage-1 size: eager vs SDPA vs SDPA + torch.compile, each checked to
#    give eager's losses and gradients; last, as compiling alone takes a minute or two
if [[ $DEVICE == cpu ]]; then
  LEVERS=(--size tiny --rounds 1 --steps 1 --device cpu)
else
  LEVERS=(--size real --rounds 2 --steps 3 --device cuda)
fi
step levers 180 "$PY" -m blip2_train.cli.bench levers "${LEVERS[@]}" --doc "$WORK/bench.md" --json "$WORK/levers.json"

echo "=== done in $((SECONDS - START)) s: $OUT/gpu_check.md" | tee -a "$LOG"
cat "$OUT/gpu_check.md"
# exit status 0 only when no step failed or ran out of time (gpu_check.json's "overall")
"$PY" -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['overall'] != 'passed')" "$OUT/gpu_check.json"
