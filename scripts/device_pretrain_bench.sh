#!/usr/bin/env bash
# The pre-training speed runs in one device call (benchmarks/bench_pretrain.py --only ...), one after another alone on
# the GPU, each killed at its own limit so the whole call ends within ~510 s: the 1.5B recipe as configured
# (optimizer-in-backward at 16 x 1024, torch.profiler over one step) and at 8 x 1024, the earlier accumulation setting
# (so8t_hf_acc16: 1 x 1024 x 16, profiled) and 4 x 4, then plain transformers.Trainer uncapped (with the NaN probe) and
# capped (expected OOM); all so8t_hf runs under a 10 GiB cap. The results merge into the earlier
# benchmarks/results/pretrain_h100.json (old rows stay, new rows added; the headline becomes this call's so8t_hf).
# At most 8 files come back in $OUT: device.txt, bench.log, pretrain_h100.json / .md, pretrain_runs.tar.gz (every
# run's JSON and log).
#   here:   ../shared/tools/device-wheels && mkdir -p .fixtures && cp -r ../shared/fixtures/phi35-tokenizer .fixtures/
#   device: run(command="bash scripts/device_pretrain_bench.sh", carry=[".whl", ".fixtures"])
#   knobs:  WHL, FIXTURES (folders), STEPS, WARMUP, RUNS (bench --only list), LIMITS (bench --run_timeout), BUDGET (s),
#           MERGE (results JSON to merge into; empty: none), HEADLINE (run; so8t_hf), EXTRA (more bench flags; EXTRA=--smoke: tiny shapes, CPU check)
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl} FIXTURES=${FIXTURES:-.fixtures}
RUNS=${RUNS:-"so8t_hf so8t_hf_oib8 so8t_hf_acc16 so8t_hf_b4x4 hf_trainer_uncapped hf_trainer_capped"}
LIMITS=${LIMITS:-"75 so8t_hf=95 so8t_hf_acc16=95 hf_trainer_uncapped=85 hf_trainer_capped=45"}
MERGE=${MERGE-benchmarks/results/pretrain_h100.json}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, transformers, triton, trl, bitsandbytes, liger_kernel, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/device.txt"
stamp "bench"
# shellcheck disable=SC2086  # RUNS and LIMITS are word lists
timeout $(( ${BUDGET:-480} + 20 )) python3 benchmarks/bench_pretrain.py --tokenizer "$FIXTURES/phi35-tokenizer" --cap_gib 10 \
  --steps "${STEPS:-4}" --warmup "${WARMUP:-2}" --only $RUNS --run_timeout $LIMITS --profile so8t_hf so8t_hf_acc16 \
  --profile_steps 1 --nan_probe --budget_s "${BUDGET:-480}" ${MERGE:+--merge_into "$MERGE"} --headline "${HEADLINE:-so8t_hf}" \
  ${EXTRA:-} --out /tmp/res 2>&1 \
  | grep -v "^$" > "$OUT/bench.log"
stamp "done" | tee -a "$OUT/bench.log"
cp /tmp/res/pretrain_h100.json /tmp/res/pretrain_h100.md "$OUT/" 2>/dev/null
tar czf "$OUT/pretrain_runs.tar.gz" -C /tmp/res runs 2>/dev/null
grep -E "^\[|killed|Error|error" "$OUT/bench.log" | tail -20
grep -E "^\| [0-9]+ \| (so8t|HF)" /tmp/res/pretrain_h100.md | tail -8
