# so8t_hf developer entry points. `make test` and `make demo` install what they need themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# On a machine without an NVIDIA GPU, pin the CPU build of torch (a wider range pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-gpu demo env clean check-env pretrain-test pretrain pretrain-resume chat-pretrained bench-pretrain

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(TORCH_CPU)"; fi
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -ra tests

test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu tests

DEMO_PROMPT ?= What is the boiling point of water at sea level?
demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no recipes/thinking_sft.py --config recipes/configs/tiny.yaml --output_dir outputs/demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/so8t-hf chat --model outputs/demo/final --prompt "$(DEMO_PROMPT)"

env: setup
	$(VENV)/bin/so8t-hf env

# ---- Pre-training from zero (README: Pre-training from scratch). CONFIG / OUTPUT / CHECKPOINT / BENCH_OUT override.
PRETRAIN_CONFIG ?= recipes/configs/pretrain_1p5b.yaml
PRETRAIN_OUTPUT ?= outputs/pretrain_1p5b
ACCELERATE_GPU  ?= --config_file recipes/accelerate/single_gpu.yaml
# fewer fragmentation losses: what lets 1.5B fit under 10 GiB with little to spare (the benchmark runs with it too)
export PYTORCH_CUDA_ALLOC_CONF ?= expandable_segments:True
BENCH_OUT       ?= benchmarks/results

check-env: setup
	$(VENV)/bin/so8t-hf env

pretrain-test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml --output_dir outputs/pretrain_tiny
	HF_HUB_OFFLINE=1 $(PY) -m so8t_hf.pretrain.checkpoints --output_dir outputs/pretrain_tiny --prompt "three four five" \
		--max_new_tokens 12

pretrain: setup
	$(VENV)/bin/accelerate launch $(ACCELERATE_GPU) recipes/pretrain.py --config $(PRETRAIN_CONFIG) \
		--output_dir $(PRETRAIN_OUTPUT)

pretrain-resume: setup
	@test -n "$(CHECKPOINT)" || { echo "usage: make pretrain-resume CHECKPOINT=$(PRETRAIN_OUTPUT)/checkpoint-2000"; exit 2; }
	$(VENV)/bin/accelerate launch $(ACCELERATE_GPU) recipes/pretrain.py --config $(PRETRAIN_CONFIG) \
		--output_dir $(PRETRAIN_OUTPUT) --resume_from_checkpoint $(CHECKPOINT)

chat-pretrained: setup
	$(PY) -m so8t_hf.pretrain.checkpoints --output_dir $(PRETRAIN_OUTPUT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

bench-pretrain: setup
	$(PY) benchmarks/bench_pretrain.py --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) outputs .pytest_cache
