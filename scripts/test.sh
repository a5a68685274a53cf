#!/usr/bin/env bash
# Set up and run the test suite (the README's test command). Needs torch installed
# first (CPU: pip install torch==2.13.0). Builds the CUDA extension when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
# taming's VectorQuantizer2, the reference of lgvq_fast.compat.VectorQuantizer2: it needs only torch, numpy and
# einops; its declared requirements (pytorch-lightning, torchvision) would pull another torch
python3 -m pip install -q --no-deps taming-transformers-rom1504==0.0.6
python3 -m pytest -q "$@"
