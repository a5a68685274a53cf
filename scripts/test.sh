#!/usr/bin/env bash
# Set up and run the test suite (the README's test command). Needs torch installed
# first (CPU: pip install torch==2.13.0). Builds the CUDA extension when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q "$@"
