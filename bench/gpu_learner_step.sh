#!/usr/bin/env bash
# One learner step on a CUDA machine with the learner's own DeepSpeed config (actors/learner/actor.py, actors/learner/deepspeed_config.py), as a
# GPU job runs it: examples/demo.yaml on bf16 (model.dtype auto), ZeRO 0 as the demo sets it, then ZeRO 2
# (the learner's default). For a machine with torch + transformers but without the project's other
# packages and without the model cache (no registry there): the packages come as wheels and a copied
# site-packages folder, the model as SmolLM2-135M-Instruct's config and tokenizer with random weights
# (the step's shapes, dtypes, kernels and optimizer are the model's; its numbers are not).
#   GPU_PKGS=.gpu bash bench/gpu_learner_step.sh   # .gpu/whl: wheels, .gpu/site: copied packages, .gpu/model: config + tokenizer
set -uo pipefail
cd "$(dirname "$0")/.."
pkgs=${GPU_PKGS:-.gpu}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d "$pkgs/whl" ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$pkgs"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/$pkgs/site${PYTHONPATH:+:$PYTHONPATH}
fi
model=/tmp/smollm2-135m-random
$py - "$pkgs/model" "$model" <<'PY' || exit 1
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("random-weight model:", dst, sum(p.numel() for p in model.parameters()), "parameters")
PY
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
  for zero in ${ZERO_STAGES:-0 2}; do
    echo "== examples/demo.yaml, learner.zero_stage=$zero, model.dtype=auto"
    timeout 240 $py bench/learner_step.py --rounds 2 --config examples/demo.yaml \
      --set model.path=$model --set learner.zero_stage=$zero
    echo "exit: $?"
  done
} 2>&1 | tee "$out/learner_step.log"
