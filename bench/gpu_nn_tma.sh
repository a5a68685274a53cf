#!/usr/bin/env bash
# The nearest-code TMA check (issue 15) in one short GPU run: bench/gpu_check.sh narrowed to building the
# extension, the nearest-code GPU tests (tile, TMA and certified kernels, Triton and CUDA), the search benchmark's
# fast, certified and peer rows at the issue's shapes, and compute-sanitizer memcheck of the wgmma kernel.
# Every setting can still be overridden from the environment (see bench/gpu_check.sh).
set -uo pipefail
export ONLY="${ONLY:-build import gpu-tests nn_search memcheck_tma}"
export GPU_TESTS="${GPU_TESTS:-tests/ops/test_nearest_code_tma.py tests/ops/test_nearest_code.py tests/ops/test_cuda_ext.py}"
export NN_SEARCH_ARGS="${NN_SEARCH_ARGS:---only fast,flash,certified,bf16x3 --shapes 65536x16384x256,16384x131072x256,65536x16384x8,16384x1024x256}"
export NN_SEARCH_LIMIT="${NN_SEARCH_LIMIT:-240}"
exec bash "$(dirname "$0")/gpu_check.sh"
