#!/usr/bin/env bash
# The prepared GPU check: one command, <= 8 minutes on an H100/H200 with PyTorch (no TensorRT needed).
#   bash scripts/gpu_check.sh            # full check; the table lands in $OUT (or runs/gpu_check/)
#   bash scripts/gpu_check.sh --smoke    # tiny sizes on any device (CI runs this on the CPU)
# Extra flags go to scripts/gpu_check.py (--compile, --models, --batches, --budget-s, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
{ nvidia-smi || echo "nvidia-smi: not available"; } > "$out/nvidia-smi.txt" 2>&1
# 7 minutes of measurement leave a minute for start-up and model construction within the 8.
exec timeout 470 python scripts/gpu_check.py --out "$out" --budget-s 420 "$@"
