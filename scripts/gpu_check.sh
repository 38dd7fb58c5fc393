#!/usr/bin/env bash
# The prepared GPU check: one command, <= 8 minutes on an H100/H200 with PyTorch (no TensorRT needed).
#   bash scripts/gpu_check.sh            # full check; the table lands in $OUT (or runs/gpu_check/)
#   bash scripts/gpu_check.sh --smoke    # tiny sizes on any device (CI runs this on the CPU)
# Extra flags go to `python -m bench.gpu` (bench/gpu.py: --compile, --models, --checkpoint, --batches,
# --budget-s, --iters, --out; `python -m bench.gpu --help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
{ nvidia-smi || echo "nvidia-smi: not available"; } > "$out/nvidia-smi.txt" 2>&1
# 7 minutes of measurement leave a minute for start-up and model construction within the 8.
exec timeout 470 python -m bench.gpu --out "$out" --budget-s 420 "$@"
