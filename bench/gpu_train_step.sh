#!/usr/bin/env bash
# Train-step study on a GPU machine (one run): build, bench/train_step.py at the paper shape with all arms and
# "ours" in channels_last (fused norm), eager and captured in a CUDA graph; every GPU test; the fused GroupNorm's
# and LPIPS' benchmarks; the train step again; "ours" in NCHW with PyTorch's and with the fused norm; a profiler
# table of channels_last; "ours" with torch.compile of each VQGAN block, then of the whole model, both
# channels_last. Benchmark JSON goes to bench/results/<bench>/<card>[_<tag>].json and the same under $OUT, the
# profile to $OUT/train_step/<card>_profile.txt, the log to $OUT/gpu_train_step/<card>.log ($OUT defaults to
# bench/results).
# Budget: TRAIN_STEP_BUDGET seconds (default 540, for a time limit of 570 s per run); the compile variants come last.
# ONLY="build train_step_cl" (stage names) runs just those stages, SKIP="..." leaves some out.
# On an offline GPU machine, wheels downloaded beforehand into .whl/ are installed first (bench/_stages.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results}"
export OUT PYTHONUNBUFFERED=1 LGVQ_FAST_BUILD_CUDA=1
BUDGET="${TRAIN_STEP_BUDGET:-540}"
RESERVE=5
MIN_LEFT=15
source bench/_stages.sh
install_carried_wheels
LOG="$OUT/gpu_train_step/$(gpu_slug).log"
mkdir -p "$(dirname "$LOG")"
: >"$LOG"
stage build 120 python3 -m pip install -q -e . --no-build-isolation --no-deps
# all arms, "ours" in channels_last with the fused norm, eager and captured in a CUDA graph (each arm times ~3 s
# after its warm-up; cuDNN autotuning makes the first steps slow)
stage train_step_cl 140 python3 bench/train_step.py --channels-last --cuda-graph --tag channels_last
XDIST=()
if python3 -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
# every GPU test (the marker selects them from the whole tree)
stage tests 120 python3 -m pytest -q --no-header -p no:cacheprovider "${XDIST[@]}" -m gpu tests/
stage train_step_cl_repeat 150 python3 bench/train_step.py --channels-last --cuda-graph --tag channels_last_replicate
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
