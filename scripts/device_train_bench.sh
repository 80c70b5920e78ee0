#!/usr/bin/env bash
# Issues 16 / 21 in one device call: GPU tests (`pytest -m gpu` + the kernels' own tests on CUDA), then the end-to-end
# training benchmark (benchmarks/bench_train.py: TRL + PEFT stock, + Liger, our recipe; LoRA 4x2048, QLoRA 1x2048,
# LoRA 1x8192; the ladders; torch.profiler traces). BENCH_ARGS="--only ..." picks runs; TEST_TIMEOUT=0 skips tests. At most 8 files come back in $OUT: the .md / .json results, the
# logs, and every run's JSON / log / profile in bench_runs.tar.gz.
#   here:   ../shared/tools/device-wheels && cp -r ../shared/fixtures/phi35-tokenizer .fixtures/
#   device: run(command="bash scripts/device_train_bench.sh", carry=[".whl", ".fixtures"])
#   flash-attn 4: scripts/fetch_fa4.sh (carry .whl_fa4 too, after scripts/device_stage_fa4.sh on the same warm machine)
#   unsloth: scripts/fetch_unsloth.sh (carry .stash_unsloth and .whl: Unsloth imports bitsandbytes; the checkpoint
#           kept from device_stage_fa4.sh spares .fixtures, so .whl + .whl_fa4 + .stash_unsloth fit in 64 MiB)
#   knobs:  WHL, FIXTURES (folders), TEST_TIMEOUT_KERNELS (0 skips; KERNEL_TESTS: their paths), TEST_TIMEOUT, BENCH_TIMEOUT (s), BENCH_ARGS (bench flags),
#           TEST_FILES (GPU test paths instead of the default set), MEMORY_ARGS (bench flags of an extra pass with
#           --memory_trace: what is live at each run's peak), MEMORY_TIMEOUT (s), OPS_BENCH=1 (benchmarks/bench_packed_ops.py
#           first, OPS_TIMEOUT s)
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl} FIXTURES=${FIXTURES:-.fixtures}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
if [ -d .whl_fa4 ] && [ -d /dev/shm/site_fa4 ]; then  # flash-attn 4, staged by scripts/device_stage_fa4.sh
  for w in .whl_fa4/*.whl; do python3 -m zipfile -e "$w" /dev/shm/site_fa4 || exit 1; done
  export PYTHONPATH=$PYTHONPATH:/dev/shm/site_fa4:/dev/shm/site_fa4/nvidia_cutlass_dsl/dsl_packages
elif [ -d .whl_fa4 ]; then echo "flash-attn 4: .whl_fa4 carried but /dev/shm/site_fa4 not staged (machine not warm?)"; fi
if [ -f .stash_unsloth/unsloth-site.tar.xz ]; then  # Unsloth's pinned stack (scripts/fetch_unsloth.sh), for its runs only
  rm -rf /dev/shm/site_unsloth && mkdir -p /dev/shm/site_unsloth && xz -dc .stash_unsloth/unsloth-site.tar.xz | tar xf - -C /dev/shm/site_unsloth || exit 1
  PYTHONPATH=/dev/shm/site_unsloth:$PYTHONPATH UNSLOTH_DISABLE_STATISTICS=1 timeout 120 python3 -c \
    "import unsloth, trl, transformers; print('unsloth', unsloth.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__)" \
    > "$OUT/unsloth_import.log" 2>&1; tail -3 "$OUT/unsloth_import.log"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, transformers, triton, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
  python3 -c "from so8t_hf.integrations.flash_backends import flash_build_status as s; from transformers.utils import is_flash_attn_4_available as a; print('flash_attn_4:', s('flash_attn_4'), '| transformers is_flash_attn_4_available:', a())"
} 2>&1 | tee "$OUT/device.txt"
stamp "checkpoint"
[ -f /dev/shm/phi35-shaped/config.json ] && echo "checkpoint kept from an earlier call" | tee -a "$OUT/device.txt" || \
  python3 scripts/make_phi35_shaped.py --tokenizer "$FIXTURES/phi35-tokenizer" --out /dev/shm/phi35-shaped 2>&1 | tail -1 | tee -a "$OUT/device.txt"
if [ "${TEST_TIMEOUT_KERNELS:-60}" -gt 0 ]; then  # the kernels' own tests, on CUDA
  stamp "kernel tests"
  timeout "${TEST_TIMEOUT_KERNELS:-60}" python3 -m pytest -q -rs -p no:cacheprovider --durations=8 \
    ${KERNEL_TESTS:-tests/ops/test_qkv_rope.py tests/ops/test_so8_exp.py tests/integrations/test_step_rotations.py \
    tests/integrations/test_attention_varlen.py tests/ops/test_fast_lora.py tests/training/test_fused_lora.py \
    tests/integrations/test_flash_builds.py} > "$OUT/gpu_tests.log" 2>&1
  tail -2 "$OUT/gpu_tests.log"
fi
if [ "${TEST_TIMEOUT:-150}" -gt 0 ]; then  # every test marked gpu
  stamp "gpu tests"
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q -rs -p no:cacheprovider --durations=8 -s \
    ${TEST_FILES:-tests/ops tests/training tests/integrations} >> "$OUT/gpu_tests.log" 2>&1
  tail -4 "$OUT/gpu_tests.log"
fi
if [ -n "${OPS_BENCH:-}" ]; then  # the per-layer ops (q/k/v split + RoPE, attention backends), fwd + bwd
  stamp "ops bench"
  timeout "${OPS_TIMEOUT:-150}" python3 benchmarks/bench_packed_ops.py --out "$OUT/packed_ops_h100.md" > /tmp/ops.log 2>&1
  tail -25 /tmp/ops.log
fi
if [ -n "${MEMORY_ARGS:-}" ]; then  # a second pass that records allocations (slow steps: memory, not speed)
  stamp "memory trace"
  timeout "${MEMORY_TIMEOUT:-240}" python3 benchmarks/bench_train.py --checkpoint /dev/shm/phi35-shaped --out /tmp/bench_mem \
    --timeout $(( ${MEMORY_TIMEOUT:-240} - 60 )) --memory_trace $MEMORY_ARGS 2>&1 | grep -v "^$" > "$OUT/memory.log"
  tar czf "$OUT/memory_runs.tar.gz" -C /tmp/bench_mem runs 2>/dev/null
  for f in /tmp/bench_mem/runs/*.memory.txt; do echo "== $f"; head -14 "$f"; done
fi
stamp "bench"
( while sleep 15; do cp /tmp/bench/train_h100.md /tmp/bench/train_h100.json "$OUT/" 2>/dev/null; done ) &  # a call cut at its limit keeps the tables so far
timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_train.py --checkpoint /dev/shm/phi35-shaped --out /tmp/bench \
  --timeout $(( ${BENCH_TIMEOUT:-400} - 100 )) ${BENCH_ARGS:-} 2>&1 | grep -v "^$" > "$OUT/bench.log"
cp /tmp/bench/train_h100.md /tmp/bench/train_h100.json "$OUT/" 2>/dev/null
tar czf "$OUT/bench_runs.tar.gz" -C /tmp/bench runs 2>/dev/null
stamp "done"
grep -E "tokens/s|FAILED|killed|skipped" "$OUT/bench.log" | tail -20
