#!/usr/bin/env bash
# The GPU measurements in one script, on a machine with an NVIDIA GPU and its driver,
# within 8 minutes, writing one results file:
#   1. the node's virtualenv with the `gpu` extra (make install-gpu: TensorFlow with
#      CUDA in place of tensorflow-cpu, and nvidia-ml-py; from PyPI, or from a folder
#      of wheels: WHEELS=/path/to/wheels for a machine without network);
#   2. bench/gpu.py: the engine in fp32, fp16 and bf16 at batch 1 to 128, XLA on and
#      off, the automatic batch, training throughput at 300 px;
#   3. bench/e2e.py --quick: the node end to end, its model on the GPU.
# Usage: bench/gpu.sh [--cpu-check] [RESULTS_FILE]   (default: gpu-results.txt)
# --cpu-check: no GPU needed; skips the install of the extra and runs both benches on
# the CPU at small sizes, to check this script where no GPU is (its figures mean
# nothing). Each step has its own time limit, so a hung step cannot eat the rest.
set -euo pipefail

CHECK=""
if [ "${1:-}" = "--cpu-check" ]; then
  CHECK="--cpu-check"
  shift
fi
RESULTS=$(realpath -m "${1:-gpu-results.txt}")
cd "$(dirname "$0")/.."
# TensorFlow in the bench processes takes GPU memory as it needs it, leaving the node
# (bench/e2e.py) and the engine's batch measurement the rest.
export TF_FORCE_GPU_ALLOW_GROWTH=true
PY=.venv/bin/python
started=$(date +%s)

say() { printf '%s\n' "$*" | tee -a "$RESULTS"; }
# On a GPU the whole script keeps to 8 minutes: each step's limit is cut to what is left.
BUDGET=$([ -n "$CHECK" ] && echo 1800 || echo 480)
step() {  # step SECONDS TITLE COMMAND...: run with a time limit, output into the results
  local limit=$1 title=$2 left
  shift 2
  left=$(( BUDGET - ($(date +%s) - started) ))
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$left" -le 5 ] && { say "!! $title skipped: the ${BUDGET} s budget is spent"; return 1; }
  say "== $title (limit ${limit} s, at $(( $(date +%s) - started )) s)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -e '^WARNING: All log messages' \
    -e '^I0000' -e '^E0000' -e '^W0000' | tee -a "$RESULTS" || rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then say "!! $title failed (exit $rc)"; return "$rc"; fi
}
quiet_step() {  # as step, but the output goes to the results only if the command fails
  local log
  log=$(mktemp)
  if step "$1" "$2" bash -c '"$@" >"$0" 2>&1 || { s=$?; tail -40 "$0"; exit $s; }' "$log" "${@:3}"; then
    rm -f "$log"
  else
    local rc=$?
    rm -f "$log"
    return "$rc"
  fi
}

: >"$RESULTS"
say "dicom-node GPU bench $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname), $(date -u +%FT%TZ)${CHECK:+ (CPU check: figures mean nothing)}"
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
if [ -z "$CHECK" ]; then
  command -v nvidia-smi >/dev/null || { say "!! no nvidia-smi: this needs an NVIDIA GPU and its driver (or --cpu-check)"; exit 2; }
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
fi

# 1. The node's virtualenv and, on a GPU, the extra.
quiet_step 120 "install" make --no-print-directory install
if [ -z "$CHECK" ]; then
  quiet_step 180 "gpu extra (make install-gpu: TensorFlow with CUDA, nvidia-ml-py)" \
    make --no-print-directory install-gpu
  step 60 "TensorFlow sees" $PY -c 'import tensorflow as tf; print(tf.config.list_physical_devices("GPU"))'
fi

# 2. The engine and training.
rc=0
step 240 "engine and training (bench/gpu.py)" $PY bench/gpu.py $CHECK --quick || rc=1

# 3. The node end to end (its model on the GPU: inference_device = auto).
if [ -n "$CHECK" ]; then
  step 420 "node end to end (bench/e2e.py --quick, 512 px images)" \
    $PY bench/e2e.py --quick --image-size 512 || rc=1
else
  step 240 "node end to end (bench/e2e.py --quick)" $PY bench/e2e.py --quick || rc=1
fi
say "== done in $(( $(date +%s) - started )) s; results in $RESULTS"
exit $rc
