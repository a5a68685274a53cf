#!/usr/bin/env bash
# One call on a lent GPU (under 8 minutes): build lgvq_fast._C, run the GPU tests, compute-sanitizer
# (memcheck + racecheck) on small nearest_code / ema_update_ cases, the three benchmarks, and print
# one short summary table last. Logs and benchmark JSON go to $OUT (default bench/results/gpu_check).
# Every stage runs under its own time limit; the script exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results/gpu_check}"
export OUT
export LGVQ_FAST_BUILD_CUDA=1
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
FAILED=()

stage() {
  local name="$1" limit="$2"
  shift 2
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ===" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

if ! stage build 240 python3 -m pip install -q -e . --no-build-isolation --no-deps; then
  echo "build failed; stopping" | tee -a "$LOG"
  exit 1
fi
stage import 60 python3 -c "from lgvq_fast import _cuda, _C; print(_cuda.info(), 'binary sm', _C.nearest_code_binary_version(0))"

stage gpu-tests 200 python3 -m pytest -q -m gpu --maxfail=25 --no-header -p no:cacheprovider tests/

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
if [ -n "$SANITIZER" ]; then
  stage memcheck 120 "$SANITIZER" --tool memcheck --error-exitcode 9 python3 -c "$SMALL_CASE"
  stage racecheck 120 "$SANITIZER" --tool racecheck --error-exitcode 9 python3 -c "$SMALL_CASE"
else
  echo "compute-sanitizer not found: memcheck skipped" | tee -a "$LOG"
fi

stage nn_search 150 python3 bench/nn_search.py
stage ema 60 python3 bench/ema.py
stage relation 60 python3 bench/relation.py
stage train_step 120 python3 bench/train_step.py

python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    with open(path) as f:
        data = json.load(f)
    for r in data.get("rows", []):
        impl = str(r.get("impl", ""))
        if "cuda" in impl or "triton" in impl or "baseline" in str(r.get("speedup", "")):
            rows.append((data.get("benchmark", "?"), str(r.get("shape", "")), str(r.get("impl", "")),
                         str(r.get("ms", "")), str(r.get("mismatch_pct", "")), str(r.get("speedup", ""))))
    device = data.get("device", "?")
print(f"summary ({device if rows else 'no benchmark JSON found'})")
head = ("bench", "shape", "impl", "ms", "mismatch", "speed-up")
widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
EOF

if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "FAILED stages: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all stages passed" | tee -a "$LOG"
