#!/usr/bin/env bash
# The thinking-SFT recipe on GPUs, one device call: a random Phi-3.5-mini-shaped checkpoint (no Hub there), then
# phi35_mini_lora.yaml (bf16) and phi35_mini_qlora_12gb.yaml (4-bit) for 30 steps each; with 2+ GPUs also the
# ddp and fsdp2 accelerate configs. Logs (tokens/s, peak memory per step) land in $OUT.
#   here:   ../shared/tools/device-wheels && mkdir -p .fixtures && cp -r ../shared/fixtures/phi35-tokenizer .fixtures/
#   device: run(command="bash scripts/device_recipe_checks.sh", carry=[".whl", ".fixtures"])   (kind nvidia-h200-x2 for DDP/FSDP2)
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
[ -d /tmp/site/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 scripts/make_phi35_shaped.py --tokenizer .fixtures/phi35-tokenizer --out /tmp/phi35-shaped 2>&1 | tail -1 | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/device.txt"
common=(--model_name_or_path /tmp/phi35-shaped --max_steps ${STEPS:-30} --logging_steps 5 --eval_strategy no --save_strategy no
        --eval_generation_rows 2 --eval_max_new_tokens 32 --disable_tqdm true)
for cfg in ${CONFIGS:-phi35_mini_lora phi35_mini_qlora_12gb}; do
  timeout ${RECIPE_TIMEOUT:-200} accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/thinking_sft.py \
    --config recipes/configs/$cfg.yaml --output_dir /tmp/$cfg "${common[@]}" 2>&1 | tail -40 > "$OUT/$cfg.log"
  cp /tmp/$cfg/training_log.json "$OUT/$cfg.training_log.json" 2>/dev/null
  ls /tmp/$cfg >> "$OUT/$cfg.log" 2>&1
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  for acc in ddp fsdp2; do
    timeout 200 accelerate launch --config_file recipes/accelerate/$acc.yaml recipes/thinking_sft.py \
      --config recipes/configs/phi35_mini_lora.yaml --output_dir /tmp/$acc "${common[@]}" 2>&1 | tail -40 > "$OUT/$acc.log"
  done
fi
grep -h "tokens_per_second" "$OUT"/*.log | tail -8
