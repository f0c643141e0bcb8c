#!/usr/bin/env bash
# GPU benchmark in one command (< 10 minutes on a GPU machine): engine img/s per batch size, float32 and float16 side
# by side with the worker's fidelity check (probe faces: cosine to float32, pair decisions changed) and what
# ARCFACE_PRECISION=auto chooses; then the end-to-end benchmark (Redis + producer + one worker at auto and at
# float32: RATIO auto / float32) and the plumbing benchmark (a near-free model).
# Prints nvidia-smi's GPU model first.
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: is this a GPU machine?"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q -e ".[worker,test]" "tensorflow[and-cuda]>=2.16,<2.22"
fi
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
.venv/bin/python -c "import tensorflow as tf; print('TensorFlow', tf.__version__, 'GPUs:', tf.config.list_physical_devices('GPU'))"
timeout 150 .venv/bin/python bench/engine.py --sizes 1,8,32,64,128 --seconds 3
timeout 240 .venv/bin/python bench/e2e.py --jobs 1024 --plain-jobs 256 --load-seconds 15 --max-batch-size 64
timeout 200 .venv/bin/python bench/plumbing.py --jobs 4000 --batch-jobs 100 --plain-jobs 400
