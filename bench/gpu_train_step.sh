#!/usr/bin/env bash
# Train-step study on a lent GPU (one device call): build, bench/train_step.py at the paper shape with all arms
# and "ours" in channels_last (fused norm), eager and captured in a CUDA graph; the trainer's (eager and
# CUDA-graph), the fused GroupNorm's and LPIPS' GPU tests, their benchmarks; the train step again (a repeat);
# "ours" in NCHW with PyTorch's and with the fused norm; a profiler table of channels_last; "ours" with torch.compile of each VQGAN block, then of the
# whole model, both channels_last. Results and logs go to $OUT.
# Budget: TRAIN_STEP_BUDGET seconds (default 540, inside a 570 s device call); the compile variants come last.
# ONLY="build train_step_cl" (stage names) runs just those stages, SKIP="..." leaves some out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results/gpu_train_step}"
export OUT PYTHONUNBUFFERED=1 LGVQ_FAST_BUILD_CUDA=1
BUDGET="${TRAIN_STEP_BUDGET:-540}"
mkdir -p "$OUT"
LOG="$OUT/log_train_step.txt"
: >"$LOG"
RESERVE=5
MIN_LEFT=15
source bench/_stages.sh
install_carried_wheels
stage build 120 python3 -m pip install -q -e . --no-build-isolation --no-deps
# all arms, "ours" in channels_last with the fused norm, eager and captured in a CUDA graph (each arm times ~3 s
# after its warm-up; cuDNN autotuning makes the first steps slow)
stage train_step_cl 140 python3 bench/train_step.py --channels-last --cuda-graph --tag channels_last
XDIST=()
if python3 -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
stage tests 120 python3 -m pytest -q --no-header -p no:cacheprovider "${XDIST[@]}" \
  "tests/test_train.py::test_tiny_run_on_gpu_with_bf16_autocast" "tests/test_train.py::test_tiny_run_on_gpu_with_cuda_graph" \
  tests/test_train_graph.py tests/test_group_norm.py tests/test_lpips.py tests/test_models.py -m gpu
stage train_step_cl_repeat 150 python3 bench/train_step.py --channels-last --cuda-graph --tag channels_last_repeat
# "ours" in NCHW, eager and captured (PyTorch's norm)
stage train_step_nchw_graph 90 python3 bench/train_step.py --skip-reference --cuda-graph --tag nchw_graph
# the fused GroupNorm + SiLU and LPIPS distance against PyTorch's, both memory formats, at the paper shape
stage group_norm 60 python3 bench/group_norm.py
stage lpips 45 python3 bench/lpips.py
# "ours" in NCHW, eager: PyTorch's norm, then the fused one
stage train_step_nchw 45 python3 bench/train_step.py --skip-reference --tag nchw
stage train_step_nchw_triton 45 python3 bench/train_step.py --skip-reference --norm-impl triton --tag nchw_triton_norm
# "ours" in channels_last without the one-op weight cast (autocast's per-call casts instead)
stage train_step_cl_noprecast 45 python3 bench/train_step.py --skip-reference --channels-last --no-precast \
  --tag channels_last_noprecast
stage train_step_profile 60 python3 bench/train_step.py --skip-reference --channels-last --tag profiled --profile "$OUT"
# Compiling the whole generator (forward, backward and the adaptive weight's second differentiation) took over
# 136 s on an H200. Each VQGAN block on its own compiled in about half the time on CPU: that one first, then the
# whole model with what is left.
stage train_step_compile_blocks 240 python3 bench/train_step.py --skip-reference --compile blocks --channels-last \
  --tag compile_blocks_channels_last
stage train_step_compile 600 python3 bench/train_step.py --skip-reference --compile model --channels-last \
  --tag compile_channels_last
grep -h "^ours\|^reference\|^official\|triton\|native" "$LOG" | grep -v "^==="
