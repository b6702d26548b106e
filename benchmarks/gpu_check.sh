#!/usr/bin/env bash
# The prepared run for a lent H100/H200 (its image has torch, numpy, pandas, typer, rich,
# matplotlib and pytest; nothing is installed from outside): the GPU tests, the GPU rows of
# the benchmark, then where the target case's time goes (add --trace there for torch.profiler's
# busiest ops). Run there from the repository root:
#   bash benchmarks/gpu_check.sh
# Each part has its own time limit, so that the whole stays inside about 8 minutes of one
# device call; the log also goes to $OUT/gpu_check.log where the device tool provides $OUT.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
{
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
  timeout 180 python3 benchmarks/run.py --device cuda --no-memory
  timeout 150 python3 benchmarks/gpu_parts.py
} 2>&1 | tee "$log"
