#!/bin/sh
# Run on a lent GPU machine (the `device` tool), from the repository root, in one call of under ~8 min:
# the gpu-marked tests, then the engine's GPU figures on a random Llama-3.2-1B-shaped model in bf16.
# The GPU machine lacks pydantic: carry its wheels (../shared/ENVIRONMENT.md) in .whl/ and this installs
# them with the checkout's packages into .site/. Results: one table on stdout, JSON in $OUT (or .).
set -eu
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --target .site .
  export PYTHONPATH="$PWD/.site:$PWD"
fi
python3 scripts/gpu_check.py --base "${BASE:-random:llama-1b}" --device cuda --dtype bfloat16 \
    --json "${OUT:-.}/gpu-check.json" "$@"
