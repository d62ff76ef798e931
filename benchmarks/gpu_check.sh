#!/usr/bin/env bash
# The one device check: engine vs plain Trainer on one GPU (see benchmarks/gpu_engine.py).
# The GPU image has torch and transformers but no pydantic: install it from wheels carried along.
set -uo pipefail
python -c "import pydantic" 2>/dev/null || pip install -q --no-index --find-links benchmarks/.wheels pydantic
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
OUT=${OUT:-/tmp}
timeout "${BENCH_TIMEOUT:-500}" python benchmarks/gpu_engine.py --json "$OUT/gpu_engine.json" "$@" \
  > "$OUT/gpu_engine.log" 2>&1
echo "exit $?"
grep -vE "Warning|warnings.warn|^\s*$" "$OUT/gpu_engine.log" | tail -60
