#!/usr/bin/env bash
# The Python packages sdbatch and its GPU checks need that the device machine's image lacks (its
# list: the device tool's KINDS.md), as Python 3.12 wheels in .whl/ (git-ignored), to carry there.
# Run here, once per session, before the device call in bench/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 dynamicprompts==0.31.0 torchsde==0.2.6 \
  trampoline==0.1.2 "k-diffusion==0.1.1.post1"
du -sh .whl
