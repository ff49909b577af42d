#!/usr/bin/env bash
# For a session lent a GPU machine (H100/H200; torch, transformers, accelerate, safetensors there,
# no network, no Ray, no datasets). Runs, in under 10 minutes (the device tool's limit a call):
#   1. the GPU-marked tests (tests/test_gpu.py)                                   <= 120 s
#   2. one decoder block at Llama-3-8B shapes, every piece of ADMM-Q (exact and
#      CG W-updates) and act-order GPTQ timed, the iterations also with TF32      <= 130 s
#   3. the same at Llama-3-70B shapes (28672-wide down_proj)                      <= 240 s
#   4. a tiny Llama quantized end to end on CUDA and on the CPU                    <=  60 s
# Results (layer_shapes_*_cuda.md/.json, tiny_cuda_run.json, gpu_check.log) go to $OUT (the
# device tool's folder) or benchmarks/results/; commit them.
#
# pytest and matplotlib (the run report) are not on that machine: carry wheels. Once, here, in
# the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 packaging==25.0 matplotlib==3.11.2 \
#     contourpy==1.3.2 cycler==0.12.1 kiwisolver==1.5.1 pyparsing==3.3.3 fonttools==4.68.0 \
#     pillow==12.2.0 python-dateutil==4.0.0 six==1.17.0          # 25 MB
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$out/gpu_check.log"
status=0
if python3 -c "import pytest" 2>/dev/null; then
  timeout 120 python3 -m pytest -q -s -m gpu tests/ 2>&1 | tee -a "$out/gpu_check.log" || status=1
else
  echo "pytest is missing: carry the wheels named at the top of this script" | tee -a "$out/gpu_check.log"
  status=1
fi
timeout 130 python3 benchmarks/layer_shapes.py --shapes 8b --tf32 --device cuda \
  --output "$out/layer_shapes_8b_cuda.md" 2>&1 | tee -a "$out/gpu_check.log" || status=1
timeout 240 python3 benchmarks/layer_shapes.py --shapes 70b --device cuda \
  --output "$out/layer_shapes_70b_cuda.md" 2>&1 | tee -a "$out/gpu_check.log" || status=1
timeout 60 python3 benchmarks/tiny_cuda_run.py --out "$out" 2>&1 | tee -a "$out/gpu_check.log" || status=1
exit $status
