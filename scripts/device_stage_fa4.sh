#!/usr/bin/env bash
# Device, first of two calls (see scripts/fetch_fa4.sh): unpack the carried .stash/*.tar.xz (the CuTe DSL's CUDA 13
# libraries) into /dev/shm/site_fa4, which stays while the machine is warm (and, given .stash/phi35-tokenizer.tar.xz,
# builds the benchmark's checkpoint in /dev/shm/phi35-shaped); then, while this call holds the machine,
# the kernels' GPU tests (TEST_TIMEOUT_KERNELS s, 0 skips them) into $OUT/gpu_tests_kernels.log.
set -o pipefail
OUT=${OUT:-/tmp/out} SITE=/dev/shm/site_fa4
mkdir -p "$OUT" "$SITE"
for f in .stash/fa4-*.tar.xz; do xz -dc "$f" | tar xf - -C "$SITE" || exit 1; done
du -sh "$SITE" | tee "$OUT/stage.txt"; ls "$SITE" | tee -a "$OUT/stage.txt"
if [ -f .stash/phi35-tokenizer.tar.xz ] && [ ! -f /dev/shm/phi35-shaped/config.json ]; then
  # the benchmark's checkpoint too, while this call holds the machine (device_train_bench.sh keeps it)
  xz -dc .stash/phi35-tokenizer.tar.xz | tar xf - -C /dev/shm && python3 scripts/make_phi35_shaped.py \
    --tokenizer /dev/shm/phi35-tokenizer --out /dev/shm/phi35-shaped 2>&1 | tail -1 | tee -a "$OUT/stage.txt"
fi
if [ "${TEST_TIMEOUT_KERNELS:-60}" -gt 0 ]; then
  PYTHONPATH=$PWD timeout "${TEST_TIMEOUT_KERNELS:-60}" python3 -m pytest -q -rs -p no:cacheprovider --durations=5 \
    tests/ops/test_qkv_rope.py tests/ops/test_so8_exp.py tests/ops/test_fast_lora.py \
    tests/integrations/test_attention_varlen.py > "$OUT/gpu_tests_kernels.log" 2>&1  # none of these needs trl
  tail -3 "$OUT/gpu_tests_kernels.log"
fi
