# Sourced by bench/gpu_check.sh and bench/gpu_train_step.sh: stages that share one time budget on a lent GPU.
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

# Wheels missing on the machine can travel in .whl/ (see the device notes): install them first.
install_carried_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}
