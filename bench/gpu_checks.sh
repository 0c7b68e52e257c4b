#!/usr/bin/env bash
# GPU checks of the entropy kernels in one go (a CUDA machine with torch + triton + pytest):
# bench/entropy.py, the CUDA tests (+ the interpreter test), bench/step.py. JSON rows and logs go to
# ${OUT:-bench/results/gpu}. The anchors are read from ../shared/bench unless ANCHOR_DIR says where.
#   bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
anchors=${ANCHOR_DIR:-../shared/bench}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"
t0=$SECONDS
ANCHOR="$anchors/entropy_anchor.py" timeout 240 $py bench/entropy.py 2>"$out/entropy.err" | tee "$out/entropy.jsonl"
echo "entropy bench: $((SECONDS - t0)) s"; t0=$SECONDS
timeout 300 $py -m pytest -q -p no:cacheprovider --durations=8 tests/unit/test_entropy_cuda.py \
  tests/unit/test_triton_kernel.py tests/unit/test_grpo_arithmetic.py 2>&1 | tee "$out/pytest.txt"
echo "tests: $((SECONDS - t0)) s"; t0=$SECONDS
ANCHOR_STEP="$anchors/step_anchor.py" timeout 150 $py bench/step.py 2>"$out/step.err" | tee "$out/step.jsonl"
echo "step bench: $((SECONDS - t0)) s"
tail -n 5 "$out"/*.err
