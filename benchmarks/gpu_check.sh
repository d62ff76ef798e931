#!/usr/bin/env bash
# The one device check: engine vs plain Trainer on one GPU and each lever on its own
# (benchmarks/gpu_engine.py; `--shape llama-3.1-8b` for the 8B row), then the family matrix on the
# GPU path (benchmarks/gpu_families.py).
# The GPU image has torch and transformers but no pydantic or deepspeed: install them from wheels
# carried along (run tool: carry benchmarks/.wheels), filled on a machine with the package index:
#   pip download --no-deps -d benchmarks/.wheels pydantic pydantic-core annotated-types \
#       typing-inspection hjson msgpack ninja py-cpuinfo einops
#   pip wheel --no-deps -w benchmarks/.wheels deepspeed==0.19.8   # the 8B row's zero3_offload
set -uo pipefail
python -c "import pydantic" 2>/dev/null || pip install -q --no-index --find-links benchmarks/.wheels pydantic
if [[ " $* " == *" --shape llama-3.1-8b "* ]]; then
  python -c "import deepspeed" 2>/dev/null || pip install -q --no-index --find-links benchmarks/.wheels deepspeed
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
OUT=${OUT:-/tmp}
timeout "${BENCH_TIMEOUT:-500}" python benchmarks/gpu_engine.py --json "$OUT/gpu_engine.json" "$@" \
  > "$OUT/gpu_engine.log" 2>&1
echo "exit $?"
grep -vE "Warning|warnings.warn|^\s*$" "$OUT/gpu_engine.log" | tail -60
# The family matrix on the GPU path (flex attention, compiled layers, fp32 and bf16) against each
# model's own forward: one table row per family and precision
timeout "${FAMILIES_TIMEOUT:-240}" python benchmarks/gpu_families.py --json "$OUT/gpu_families.json" \
  > "$OUT/gpu_families.log" 2>&1
echo "families exit $?"
grep -E "^\|" "$OUT/gpu_families.log"
