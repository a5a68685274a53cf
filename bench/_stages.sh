# Sourced by bench/gpu_check.sh and bench/gpu_train_step.sh: stages that share one time budget on a GPU machine.
# The sourcing script sets LOG (file), BUDGET (seconds for the whole script), and may set RESERVE (seconds kept
# back at the end, default 15), MIN_LEFT (a stage with fewer seconds left is skipped, default 20) and SKIP
# (stage names separated by spaces, left out on request) or ONLY (the stages to run, the others left out).
# FAILED collects failed and budget-skipped stages.
FAILED=()

# stage NAME LIMIT CMD...: run CMD under min(LIMIT, what is left of the budget), logged to LOG; returns its rc.
stage() {
  local name="$1" limit="$2"
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]] || [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
    echo "=== $name: skipped (on request) ===" | tee -a "$LOG"
    return 0
  fi
  local left=$((BUDGET - SECONDS - ${RESERVE:-15}))
  if [ "$left" -lt "${MIN_LEFT:-20}" ]; then
    echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left ===" | tee -a "$LOG"
    FAILED+=("$name(skipped)")
    return 124
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "=== $name (limit ${limit}s, at ${SECONDS}s) ===" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ===" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
  return "$rc"
}

# On an offline GPU machine, packages it lacks (e.g. pytest-xdist, vector-quantize-pytorch) come as wheels
# downloaded beforehand into .whl/ at the repository root: install them first, into /tmp/site.
install_carried_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# The GPU's name as a results file-name part, as bench/_common.py card_slug writes it: NVIDIA H200 -> nvidia_h200.
gpu_slug() {
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
    | sed -E 's/[^0-9a-z]+/_/g; s/^_+//; s/_+$//' | grep . || echo unknown_gpu
}
