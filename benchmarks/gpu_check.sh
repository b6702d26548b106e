#!/usr/bin/env bash
# The prepared run for a lent H100/H200 (its image has torch, numpy, pandas, typer, rich,
# matplotlib and pytest; nothing is installed from outside): the GPU tests; where the target
# case's time goes, which also picks the fastest of the GPU's adjoint plans
# (engine.GPU_PLANS); then the GPU rows of the benchmark with that plan, so that one call
# measures the targets with the plan that should become the default. Run there from the
# repository root (add --trace to gpu_parts.py for torch.profiler's busiest ops):
#   bash benchmarks/gpu_check.sh
# Each part has its own time limit, so that the whole stays inside about 8 minutes of one
# device call; the log also goes to $OUT/gpu_check.log where the device tool provides $OUT.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
pick="$(mktemp)"
{
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider --durations=8 tests/test_gpu.py
  timeout 150 python3 benchmarks/gpu_parts.py --pick "$pick"
  adjoint="$(cat "$pick")"
  # without a pick (gpu_parts.py stopped first), run.py keeps engine.GPU_ADJOINT, the default
  timeout 180 python3 benchmarks/run.py --device cuda --no-memory ${adjoint:+--gpu-adjoint "$adjoint"}
} 2>&1 | tee "$log"
rm -f "$pick"
