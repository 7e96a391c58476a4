#!/usr/bin/env bash
# GPU throughput, one call: Keras-JAX train/predict at 256², fp16 and bf16, batch 4 and 64, and timm's
# legacy_xception as the reference point. For a machine with JAX, PyTorch and timm but no Keras and no network:
# put the wheels of keras, namex and optree (cp312, manylinux x86_64) in .whl/ at the repository root, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl keras namex optree
# Budget: ~95 s of XLA compile per (batch, precision) shape; three shapes + timm stay under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import keras" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 bench/train_throughput.py --size 256 --batch 4 64 --precision mixed_float16 --timm --steps 20
python3 bench/train_throughput.py --size 256 --batch 64 --precision mixed_bfloat16 --steps 20 --lr-scale
