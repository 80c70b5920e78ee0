#!/usr/bin/env bash
# Here (in the project root, with pip's registry): fetch flash-attn 4 (CuTe DSL) and what it needs for the device,
# which has none of it. Its CUDA 13 library wheel (92 MB) is larger than one device call may carry (64 MiB), so it
# travels alone, repacked as .stash/*.tar.xz (61 MiB), in a first call that unpacks it into /dev/shm/site_fa4
# (scripts/device_stage_fa4.sh); the next call, on the still-warm machine, carries the small wheels in .whl_fa4/,
# which scripts/device_train_bench.sh unpacks beside it. Both folders are ignored by git.
#   ../shared/tools/device-wheels && bash scripts/fetch_fa4.sh
#   run(command="bash scripts/device_stage_fa4.sh", carry=[".stash"])
#   run(command="... bash scripts/device_train_bench.sh", carry=[".whl", ".whl_fa4", ".fixtures"])  # within 30 s
set -euo pipefail
FA4=${FA4:-4.0.0b40} DSL=${DSL:-4.8.1}
for d in /.stash/ /.whl_fa4/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
mkdir -p .whl_fa4 .stash
get() { python3 -m pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any "$@"; }
get -d .whl_fa4 "flash-attn-4==$FA4" "nvidia-cutlass-dsl-libs-base==$DSL" "nvidia-cutlass-dsl-libs-core==$DSL" \
  "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext "quack-kernels>=0.5.3"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
get -d "$tmp" "nvidia-cutlass-dsl-libs-cu13==$DSL"
mkdir "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/x"
tar cf - -C "$tmp/x" . | xz -T0 -9 > ".stash/fa4-cutlass-dsl-libs-cu13-$DSL.tar.xz"
# the tokenizer fixture fits beside it (0.5 MiB packed), so the first call also builds the benchmark's checkpoint
[ -d .fixtures/phi35-tokenizer ] && tar cf - -C .fixtures phi35-tokenizer | xz -9 > .stash/phi35-tokenizer.tar.xz
du -sh .whl_fa4 .stash; ls .whl_fa4 .stash
