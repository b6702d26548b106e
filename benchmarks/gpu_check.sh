#!/usr/bin/env bash
# The prepared run for a lent H100/H200 (its image has torch; nothing is installed from outside):
# the GPU tests, then the GPU rows of the benchmark. Run there from the repository root:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
python3 benchmarks/run.py --device cuda
