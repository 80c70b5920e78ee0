#!/usr/bin/env bash
# Here (in the project root, with pip's registry): build Unsloth's pinned stack for the device's Python 3.12 as one
# site, packed as .stash_unsloth/unsloth-site.tar.xz (about 6 MB). Its pins (transformers <= 5.17, trl <= 1.15,
# datasets < 5) clash with the stock stack's (trl 1.16, datasets 5), so the unsloth runs of benchmarks/bench_train.py
# put this site first on their PYTHONPATH (--unsloth_site) and the other runs never see it. Left out: Unsloth's web
# app (`studio`, 82 MB, not imported by training) and hf_transfer (downloads only; the device is offline);
# bitsandbytes comes from .whl (../shared/tools/device-wheels), which the benchmark call carries anyway; and
# transformers is the device image's own (5.17.0, inside Unsloth's pin; WITH_TRANSFORMERS=1 packs 5.17.0 as well, 5 MB
# more, for which .whl + .whl_fa4 beside it leave no room in one call's 64 MiB).
#   bash scripts/fetch_unsloth.sh
#   run(command="... bash scripts/device_train_bench.sh", carry=[".whl", ".whl_fa4", ".stash_unsloth"])
set -euo pipefail
UNSLOTH=${UNSLOTH:-2026.10.9}
grep -qx "/.stash_unsloth/" .git/info/exclude || echo "/.stash_unsloth/" >> .git/info/exclude
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$tmp/w" "unsloth==$UNSLOTH" "unsloth_zoo==$UNSLOTH" \
  ${WITH_TRANSFORMERS:+"transformers==5.17.0" "huggingface_hub>=1.5,<2"} "trl==1.15.0" "datasets>=4.6,<5" "torchao>=0.13" \
  cut_cross_entropy tyro docstring_parser typeguard shtab msgspec einops structlog json5 nest_asyncio
python3 -m pip install -q --no-deps --no-index --no-compile --target "$tmp/site" --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: \
  "$tmp"/w/*.whl
rm -rf "$tmp/site/studio" "$tmp/site/unsloth_cli" "$tmp/site/bin" "$tmp/site/test"  # web app, CLI, scripts, torchao's tests
mkdir -p .stash_unsloth
tar cf - -C "$tmp/site" . | xz -T0 -9 > .stash_unsloth/unsloth-site.tar.xz
ls "$tmp/w" > .stash_unsloth/wheels.txt
du -sh .stash_unsloth/unsloth-site.tar.xz; cat .stash_unsloth/wheels.txt
