#!/usr/bin/env bash
# For a session lent a GPU machine (H100/H200; torch, transformers, accelerate, safetensors there,
# no network). Runs the GPU-marked tests, then ADMM-Q against act-order GPTQ on Llama-7B-shaped
# layers. Budget: under 8 minutes. Results go to $OUT (the device tool's folder) or results/.
#
# pytest is not on that machine: carry wheels. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 packaging==25.0
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$out/gpu_check.log"
status=0
if python3 -c "import pytest" 2>/dev/null; then
  timeout 180 python3 -m pytest -q -m gpu tests/ 2>&1 | tee -a "$out/gpu_check.log" || status=1
else
  echo "pytest is missing: carry the wheels named at the top of this script" | tee -a "$out/gpu_check.log"
  status=1
fi
timeout 300 python3 benchmarks/gpu_layers.py --out "$out/gpu_layers.md" 2>&1 | tee -a "$out/gpu_check.log" || status=1
exit $status
