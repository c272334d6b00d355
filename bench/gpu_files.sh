#!/usr/bin/env bash
# Diagnose failures of a GPU check on the lent machine: run the named test files (or node ids)
# with TRITONKV_TEST_DEVICE=cuda, each in a pytest process of its own (a device-side assert
# then poisons only its own file), JOBS at a time, full tracebacks in $OUT/<file>.log.
#   FILES="tests/engine/test_kv_tiers.py tests/e2e/test_openai.py" bash bench/gpu_files.sh
# Knobs: JOBS (default 6), LIMIT_S (each file's time limit, 240), TEST_TIMEOUT_S (each test's,
# 120), BLOCKING=1 (CUDA_LAUNCH_BLOCKING: a device-side assert names its kernel's caller).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tritonkv-gpu-files}
mkdir -p "$OUT"
source .gpu-carry/device_env.sh
export PYTHONPATH=$PWD/backend:$PWD/client${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TRITONKV_TEST_DEVICE=cuda OMP_NUM_THREADS=2
[ "${BLOCKING:-0}" = 1 ] && export CUDA_LAUNCH_BLOCKING=1
"$TRITONKV_TEST_PYTHON" -c "from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint as e; e()"
one() {
  local f=$1 log="$OUT/$(echo "$1" | tr '/:[]' '____').log"
  timeout -k 5 "${LIMIT_S:-240}" "$TRITONKV_TEST_PYTHON" -m pytest -q -rfE --tb=short -p no:cacheprovider \
    --timeout "${TEST_TIMEOUT_S:-120}" "$f" > "$log" 2>&1
  echo "$f: exit $? $(tail -1 "$log")"
}
running=0
for f in ${FILES:?name the test files}; do
  one "$f" &
  running=$((running + 1))
  if [ "$running" -ge "${JOBS:-6}" ]; then wait -n; running=$((running - 1)); fi
done
wait
