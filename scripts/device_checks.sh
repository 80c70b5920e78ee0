#!/usr/bin/env bash
# Every GPU check of the project in one device call (< 10 min): GPU tests (kernels, whole model on the
# Triton backend, bf16 LoRA, QLoRA) and the attention benchmark. Results land in $OUT (copy the .md
# tables into benchmarks/results/).
#   here:   ../shared/tools/device-wheels            # trl, datasets, evaluate, bitsandbytes, liger -> .whl/
#   device: run(command="bash scripts/device_checks.sh", carry=[".whl"])
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -e so8t_hf/modeling ] || ln -sfn ../modeling so8t_hf/modeling  # the package maps modeling/ to so8t_hf.modeling
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout 330 python3 -m pytest -m gpu tests/ops/test_ops_gpu.py tests/training/test_gpu_training.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 240 python3 benchmarks/bench_attention.py --out "$OUT/attention_h100.md" 2>&1 | tee "$OUT/bench_attention.log"
