#!/usr/bin/env bash
# Download the wheels jaxserve needs that the lent GPU machines' image lacks (Python 3.12,
# x86-64), into .whl/ (git-ignored), so a device run can carry them. See docs/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-dir)/info/exclude"; mkdir -p "$(dirname "$exclude")"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
mkdir -p .whl
# llguidance (structured outputs) is a binary abi3 wheel (~3 MB); its newest builds are
# manylinux_2_31, and pip matches --platform tags exactly, so list that one too.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl gguf starlette uvicorn "llguidance>=1.9"
ls -la .whl
