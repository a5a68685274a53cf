#!/usr/bin/env bash
# One run on a GPU machine: build lgvq_fast._C, run the GPU tests, the benchmarks (train step first),
# compute-sanitizer (memcheck + racecheck) on small nearest_code / ema_update_ cases, and print one short summary
# table last.
# Benchmark JSON goes to bench/results/<bench>/<card>.json and the same under $OUT; the log to
# $OUT/gpu_check/<card>.log. $OUT defaults to bench/results.
# The whole script keeps to GPU_CHECK_BUDGET seconds (default 540, for a time limit of 600 s per run): each stage
# runs under min(its own limit, what is left of the budget), a stage with under 20 s left is skipped and
# reported, and the summary always prints. Exits non-zero if any stage failed or was skipped.
# On an offline GPU machine, wheels downloaded beforehand into .whl/ are installed first (bench/_stages.sh).
# GPU_CHECK_SKIP="train_step" (names separated by spaces) leaves those stages out, e.g. one another script covers;
# ONLY="build import gpu-tests nn_search" runs just those (bench/_stages.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results}"
export OUT PYTHONUNBUFFERED=1
export LGVQ_FAST_BUILD_CUDA=1
BUDGET="${GPU_CHECK_BUDGET:-540}"
# the summary reads the benchmark JSON written from here on
START=$(date +%s)
RESERVE=15  # for the summary
MIN_LEFT=20
SKIP="${GPU_CHECK_SKIP:-}"
source bench/_stages.sh
install_carried_wheels
LOG="$OUT/gpu_check/$(gpu_slug).log"
mkdir -p "$(dirname "$LOG")"
: >"$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

CUDA_EXT=1
if stage build 240 python3 -m pip install -q -e . --no-build-isolation --no-deps; then
  stage import 45 python3 -c "from lgvq_fast import _cuda, _C; print(_cuda.info(), 'binary sm', _C.nearest_code_binary_version(0))"
else
  # Without the CUDA extension the Triton kernels, the GPU tests of everything else and the train step still
  # run: install the pure-Python package and go on (the failed build stays in FAILED).
  echo "CUDA extension build failed; continuing without it" | tee -a "$LOG"
  CUDA_EXT=0
  LGVQ_FAST_BUILD_CUDA=0 stage build-without-cuda 120 python3 -m pip install -q -e . --no-build-isolation --no-deps \
    || { echo "install failed; stopping" | tee -a "$LOG"; exit 1; }
fi

# Kernel compiles dominate the first GPU test run: spread them over 4 pytest-xdist workers when it is there.
XDIST=()
if python3 -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
# GPU_TESTS narrows the GPU tests for a short session, e.g. "tests/ops/test_nearest_code_tma.py tests/ops/test_nearest_code.py"
# shellcheck disable=SC2086
stage gpu-tests 180 python3 -m pytest -q -m gpu "${XDIST[@]}" --maxfail=25 --no-header -p no:cacheprovider ${GPU_TESTS:-tests/}
stage train_step 90 python3 bench/train_step.py
# NN_SEARCH_ARGS narrows it for a short session, e.g. "--only fast,flash --shapes 65536x16384x256,16384x131072x256";
# NN_SEARCH_LIMIT (seconds, default 120) bounds it (first calls autotune: about 18 TMA configs per (K, D))
# shellcheck disable=SC2086
stage nn_search "${NN_SEARCH_LIMIT:-120}" python3 bench/nn_search.py ${NN_SEARCH_ARGS:-}
stage ema 45 python3 bench/ema.py
stage ema_skew 30 python3 bench/ema.py --skew
stage quantizer 60 python3 bench/quantizer.py
stage relation 45 python3 bench/relation.py
# the paper's batch of 8, and CLIP's context of 77 words (fused since the word tiles; before, the reference ran)
stage relation_b8 30 python3 bench/relation.py --shape 8x30x256x512
stage relation_l77 30 python3 bench/relation.py --shape 64x77x256x512
stage group_norm 60 python3 bench/group_norm.py
stage lpips 60 python3 bench/lpips.py
# the quantizer benchmark's other settings (issue 16): bf16 inputs, the paper's codebook, D = 8; last, so that
# a tight budget drops these first
stage quantizer_bf16 45 python3 bench/quantizer.py --dtype bf16
stage quantizer_paper 30 python3 bench/quantizer.py --shape 16384x1024x256
stage quantizer_d8 30 python3 bench/quantizer.py --shape 65536x16384x8

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
SMALL_CASE='
import torch
from lgvq_fast import _cuda
z = torch.randn(333, 77, device="cuda")
cb = torch.randn(130, 77, device="cuda")
for metric in ("l2", "cos"):
    for precision in ("exact", "fast", "scalar"):
        _cuda.nearest_code(z, cb, metric, precision)
for dtype in (torch.bfloat16, torch.float16):
    _cuda.nearest_code(z.to(dtype), cb, "l2", "exact")
_cuda.nearest_code(torch.randn(100, 256, device="cuda"), torch.randn(70, 256, device="cuda"), "l2", "exact")
K, D = 130, 77
_cuda.ema_update_(torch.rand(K, device="cuda"), torch.randn(K, D, device="cuda"), torch.empty(K, D, device="cuda"),
                  z, torch.randint(0, K, (333,), device="cuda"), 0.99, 1e-5)
torch.cuda.synchronize()
print("sanitizer case done")
'
# the TMA + wgmma search (compute capability 9.0 only): tails of N and K, D padded from 77 and exactly 512
TMA_CASE='
import torch
from lgvq_fast import _cuda
if torch.cuda.get_device_capability() == (9, 0):
    for d in (77, 512):
        z = torch.randn(333, d, device="cuda")
        cb = torch.randn(130, d, device="cuda")
        for metric in ("l2", "cos"):
            _cuda.nearest_code(z, cb, metric, "fast_tma")
        _cuda.nearest_code(z.to(torch.bfloat16), cb, "l2", "fast_tma")
    torch.cuda.synchronize()
print("sanitizer TMA case done")
'
if [ "$CUDA_EXT" = 0 ]; then
  echo "no CUDA extension: sanitizer skipped" | tee -a "$LOG"
elif [ -n "$SANITIZER" ]; then
  stage memcheck 60 "$SANITIZER" --tool memcheck --error-exitcode 9 python3 -c "$SMALL_CASE"
  stage memcheck_tma 45 "$SANITIZER" --tool memcheck --error-exitcode 9 python3 -c "$TMA_CASE"
  stage racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 9 python3 -c "$SMALL_CASE"
else
  echo "compute-sanitizer not found: memcheck skipped" | tee -a "$LOG"
fi

python3 - "$OUT" "$START" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "*.json"))):
    # a result of an earlier run
    if os.path.getmtime(path) < int(sys.argv[2]):
        continue
    with open(path) as f:
        data = json.load(f)
    bench = data.get("benchmark", "?") + (f" {data['tag']}" if data.get("tag") else "")
    for r in data.get("rows", []):
        if "variant" in r:  # train_step: one shape for the file, images/s in the mismatch column's place
            sh = data.get("shape", {})
            vs = ("" if "speedup_vs_official_style" not in r else
                  f"{r['speedup_vs_official_style']}x vs official-style, {r.get('speedup_vs_reference')}x vs reference")
            rows.append((bench, f"b{sh.get('batch')} {sh.get('resolution')}px K{sh.get('codebook_size')}",
                         r["variant"], str(r.get("ms", r.get("error", "")))[:60], f"{r.get('images_per_s')} img/s", vs))
            continue
        impl = str(r.get("impl", ""))
        speedup = r.get("speedup", r.get("x_vs_native", r.get("x_vs_vectorised", r.get("speedup_vs_onehot", ""))))
        if "cuda" in impl or "triton" in impl or "baseline" in str(speedup):
            shape = " ".join(str(r.get(k, "")) for k in ("shape", "layout") if k in r)
            if not shape and isinstance(data.get("shape"), dict):  # one shape for the whole file (ema, relation)
                shape = "x".join(str(v) for v in data["shape"].values())
            rows.append((bench, shape, impl, str(r.get("ms", r.get("fwd_bwd_ms", ""))),
                         str(r.get("mismatch_pct", "")), str(speedup)))
    device = data.get("device", "?")
print(f"summary ({device if rows else 'no benchmark JSON found'})")
head = ("bench", "shape", "impl", "ms", "mismatch / img/s", "speed-up")
widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
EOF

if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "FAILED stages: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all stages passed" | tee -a "$LOG"
