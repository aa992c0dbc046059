#!/usr/bin/env bash
# storygen on a machine with an NVIDIA GPU: installs storygen with TensorFlow's CUDA libraries
# into .venv-gpu, then runs the tiny and the default pipeline and the training and decoding
# benchmarks on the GPU and prints one table (benchmarks/gpu_check.py; its flags pass through,
# e.g. --quick). Not part of the test suite.
#
#   bash benchmarks/gpu_check.sh [--quick] [--work_dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi > /dev/null; then
  echo "gpu_check: nvidia-smi is not here: run this on a machine with an NVIDIA GPU and its driver." >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e '.[gpu,bench]'
exec .venv-gpu/bin/python -m benchmarks.gpu_check "$@"
