#!/usr/bin/env bash
# GPU check (docs/PERFORMANCE.md): on a machine with a CUDA device, in under 5 minutes (about 2 on an H200),
#  1. the golden fixture on CUDA (float32, tokens exact, logits within 1e-3): tests marked `gpu`;
#  2. a 2-layer m32-shaped bfloat16 random checkpoint, a gateway engine on the GPU and 4 expert pools
#     sharing it: decode tokens/s at batch 1 and 64 and the per-layer expert step round trip, and
#     beside them the in-process engine on the same checkpoint and GPU.
# Needs a Python with this package and a CUDA build of torch (PY, default .venv/bin/python, else
# python3) and ../shared (the fixture; YUAN_SHARED elsewhere). Output: stdout, and with OUT set, the
# bench's JSON in $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch")
PYEOF
timeout 120 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
timeout 170 "$PY" -m bench.gpu --preset m32 --layers 2 --dtype bfloat16 --pools 4 --batches 1 64 --profile 8 \
  | tee "${OUT:-/tmp}/gpu_check.log"
tail -1 "${OUT:-/tmp}/gpu_check.log" > "${OUT:-/tmp}/gpu_check.json"
