#!/usr/bin/env bash
# GPU measurements, one call: the project's Keras-JAX train step against timm's legacy_xception (PyTorch, eager AMP)
# at 256² in FP16, batch 4 and 64, on the same card; then the real `train()` on phantoms at 256² in mixed_float16 for
# two epochs. For a machine with JAX, PyTorch and timm but no Keras and no network: put the wheels of keras, namex and
# optree (cp312, manylinux x86_64) in .whl/ at the repository root, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl keras namex optree
# Budget: XLA compiles each (model, batch) shape once, ~95 s for an Xception train step; shapes are kept fixed.
# `bench/gpu.sh throughput` or `bench/gpu.sh train` runs one half.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import keras" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
part=${1:-all}
if [ "$part" != train ]; then
  python3 bench/train_throughput.py --size 256 --batch 4 64 --precision mixed_float16 --timm --steps 20 --no-predict
fi
if [ "$part" != throughput ]; then
  python3 bench/gpu_train.py --size 256 --batch 64 --epochs 2 --precision mixed_float16
fi
