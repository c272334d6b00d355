#!/usr/bin/env bash
# The GPU calls, from the project root on the lent machine (carry [".gpu-carry"], filled on the
# CPU machine by `bash bench/gpu_carry.sh`, which also records the commit: the device gets the
# tree without .git; .gpu-carry/device_env.sh exports it as TRITONKV_COMMIT):
#
#   bash bench/gpu_run.sh check     # whole suite (TRITONKV_TEST_DEVICE=cuda) + GPU benchmark
#                                   # smoke runs -> $OUT/gpu_check.md (+ junit.xml, pytest.log,
#                                   # smoke.log); <= ~9 min on 16 cores; copy gpu_check.md to
#                                   # bench/results/ and commit it with the change it checks
#   bash bench/gpu_run.sh serving   # Llama-3-8B shape, 200 in / 180 out, c=1/64/128/256: served,
#                                   # 2x2, in-process, HF static-cache peer -> $OUT/serving_<h100|h200>.*
#   bash bench/gpu_run.sh benches   # batch-1 step profile, skinny GEMM table, sampling / n / bad_words
#                                   # costs, KV tiers -> $OUT/benches.tgz (BUDGET_S bounds the call)
#   FILES="tests/a.py tests/b.py" bash bench/gpu_run.sh files
#                                   # a check's failing files, one pytest process each -> $OUT/<file>.log
#                                   # (JOBS, default 6; LIMIT_S per file, 240; TEST_TIMEOUT_S, 120; BLOCKING=1)
#
# If one call cannot hold every serving system (each system's results are written as it ends),
# copy $OUT's serving_<gpu>.json and .tokens.json into bench/results/ and run the rest with
#   SYSTEMS="tritonkv-2x2 hf-static" SERVING_ARGS="--merge bench/results/serving_<gpu>.json" \
#     bash bench/gpu_run.sh serving
# TINY=1: the same steps shrunk to prove the script on a CPU (the local venv, the demo model,
# a few tests): `TINY=1 OUT=/tmp/x bash bench/gpu_run.sh check` / `... serving` / `... benches`.
# Knobs: WORKERS (pytest-xdist processes, default 8), SUITE_S (the suite's time limit, 360),
# BUDGET_S (the whole call, 540: smoke runs that would pass it are listed as not run),
# PYTEST_ARGS (extra pytest arguments), SYSTEMS / LEVELS (serving), TIER_PARTS (kv_tiers.py --parts), ONLY (the smoke / bench steps
# to run, by name, e.g. ONLY="profile-step kv-tiers"; default all), TRITONKV_COMMIT.
# Everything goes to $OUT as it is written, so a run cut short still returns what it had.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bash bench/gpu_run.sh check|serving|benches|files}
OUT=${OUT:-/tmp/tritonkv-gpu-run}
mkdir -p "$OUT"
t0=$(date +%s)
if [ "${TINY:-0}" = 1 ]; then
  IMGPY=$(command -v python3)
  export PYTHONPATH=$PWD/backend:$PWD/client${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
else
  source .gpu-carry/device_env.sh || { echo "gpu_run.sh: the device environment is not ready (above); nothing run" >&2; exit 1; }  # bench/gpu_device_env.sh
  IMGPY=$TRITONKV_TEST_PYTHON      # the tests' venv (numpy 2 for the HF oracles); the stub's is first on PATH
  # tritonkv is not installed there: subprocesses (`-m tritonkv.server.cli`, the OpenAI
  # frontend) find it through PYTHONPATH
  export PYTHONPATH=$PWD/backend:$PWD/client${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  export TRITONKV_TEST_DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
fi
commit=${TRITONKV_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
grep -qx dirty .gpu-carry/commit 2>/dev/null && commit="$commit (with uncommitted changes)"
# NVLink multicast stays off (the machines' rule), in every process started from here
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

deadline=$(( t0 + ${BUDGET_S:-540} ))  # the whole call stays inside the device tool's 10 minutes
smoke() {  # name, seconds, command...: one line of $OUT/smoke.tsv; skipped (said so) past the budget
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$*" "-" "0" "not run: not in ONLY" >> "$OUT/smoke.tsv"
    return
  fi
  local s=$(date +%s) shown="$*"
  shown=${shown//$IMGPY/python3}
  local left=$(( deadline - s - 20 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$shown" "-" "0" "not run: the call's time budget was spent" >> "$OUT/smoke.tsv"
    return
  fi
  echo "== smoke $name: $shown" | tee -a "$OUT/smoke.log"
  timeout -k 5 "$limit" "$@" > "$OUT/smoke_one.log" 2>&1
  local rc=$?
  cat "$OUT/smoke_one.log" >> "$OUT/smoke.log"
  local last=$(grep -v -i warn "$OUT/smoke_one.log" | grep -v '^\s*$' | tail -1 | tr '\t' ' ')
  [ "$rc" = 124 ] && last="killed after $limit s: $last"
  rm -f "$OUT/smoke_one.log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$shown" "$rc" "$(( $(date +%s) - s ))" "$last" >> "$OUT/smoke.tsv"
}

# the shared e2e servers' logs (tests/e2e/shared_server.py copies them at the end of each pytest
# process, one folder per process) -> $OUT/server_logs.tgz
keep_server_logs() {
  export TRITONKV_TEST_LOG_DIR=$OUT/server_logs
  rm -rf "$TRITONKV_TEST_LOG_DIR"
}
pack_server_logs() {
  [ -d "$OUT/server_logs" ] && tar czf "$OUT/server_logs.tgz" -C "$OUT" server_logs && rm -rf "$OUT/server_logs"
}

case $mode in
check)
  rm -f "$OUT"/junit*.xml "$OUT/smoke.tsv" "$OUT/smoke.log"
  "$IMGPY" -c "from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint as e; print('demo model', e())"
  par=() tmo=()
  if [ "${TINY:-0}" != 1 ] && "$IMGPY" -c "import xdist" 2>/dev/null; then
    par=(-n "${WORKERS:-8}" --dist loadfile)  # a file's tests (and its module fixtures) on one worker
    # the HF oracles run on the CPU: 2 threads per worker, not 16 each on 16 cores
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  fi
  "$IMGPY" -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout "${TEST_TIMEOUT_S:-120}")
  sel=()
  [ "${TINY:-0}" = 1 ] && sel=(tests/kernels/test_decode_tiles.py -k "any_size or refused")
  # the optional imports of the stub's venv (python3: the server and its engine cores) and the tests'
  for py in python3 "$IMGPY"; do
    "$py" -c "import sys, xgrammar, importlib.metadata as m; print(sys.executable, 'imports xgrammar', m.version('xgrammar'))" 2>&1 | tail -3
  done | tee "$OUT/pytest.log"
  suite_s=${SUITE_S:-360}
  s=$(date +%s)
  rm -f "$OUT/record.tsv"
  keep_server_logs
  TRITONKV_TEST_RECORD="$OUT/record.tsv" timeout -k 10 "$suite_s" "$IMGPY" -m pytest -q -rfEs --tb=short --durations=30 -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" "${par[@]}" "${tmo[@]}" ${PYTEST_ARGS:-} "${sel[@]}" 2>&1 | tee -a "$OUT/pytest.log" | tail -60
  wall=$(( $(date +%s) - s ))
  # what failed in parallel runs again alone (an interaction of workers is then named, not hidden)
  "$IMGPY" bench/gpu_report.py --failed "$OUT/junit.xml" > "$OUT/failed.txt" 2>/dev/null
  n=$(wc -l < "$OUT/failed.txt")
  if [ "$n" -gt 0 ] && [ "$n" -le 40 ] && [ ${#par[@]} -gt 0 ]; then
    echo "== re-running $n failures alone" | tee -a "$OUT/pytest.log"
    # CUDA_LAUNCH_BLOCKING: a device-side assert is reported by the call that launched it
    mapfile -t failed < "$OUT/failed.txt"  # node ids hold spaces ([param ids])
    CUDA_LAUNCH_BLOCKING=1 timeout -k 10 "${RERUN_S:-90}" "$IMGPY" -m pytest -q -rfEs --tb=short -p no:cacheprovider \
      --junitxml="$OUT/junit_rerun.xml" \
      "${tmo[@]}" "${failed[@]}" 2>&1 | tee -a "$OUT/pytest.log" | tail -15
  fi
  if [ "${TINY:-0}" = 1 ]; then
    smoke serving-tiny 600 "$IMGPY" bench/serving_benchmark.py --tiny --systems tritonkv inprocess --out "$OUT/smoke" --no-plot
  else
    smoke decode-attention 60 "$IMGPY" bench/decode_attention.py --out "$OUT/smoke" --no-flex --only 16x4k
    smoke extend-attention 60 "$IMGPY" bench/extend_attention.py --out "$OUT/smoke"
    smoke serving-tiny 150 "$IMGPY" bench/serving_benchmark.py --tiny --systems tritonkv inprocess hf-static \
      --out "$OUT/smoke" --no-plot
  fi
  rm -rf "$OUT/smoke" "$OUT/failed.txt"
  pack_server_logs
  "$IMGPY" bench/gpu_report.py --junit "$OUT/junit.xml" --rerun "$OUT/junit_rerun.xml" --record "$OUT/record.tsv" \
    --smoke "$OUT/smoke.tsv" \
    --commit "$commit" --command "${PYTEST_ARGS:+PYTEST_ARGS=\"$PYTEST_ARGS\" }${ONLY:+ONLY=\"$ONLY\" }bash bench/gpu_run.sh check" --wall-s "$wall" --out "$OUT/gpu_check.md" | tail -25
  rc=${PIPESTATUS[0]}
  rm -f "$OUT/smoke.tsv"
  ;;
serving)
  gpu=$("$IMGPY" -c "import torch; n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'cpu')")
  if [ "${TINY:-0}" = 1 ]; then
    args=(--tiny)
  else
    args=(--synthetic llama3-8b --concurrency ${LEVELS:-1 64 128 256} --prompt-tokens 200 --max-tokens 180)
  fi
  "$IMGPY" bench/serving_benchmark.py "${args[@]}" --systems ${SYSTEMS:-tritonkv inprocess tritonkv-2x2 hf-static} \
    --out "$OUT" --name "serving_$gpu" ${SERVING_ARGS:-} 2>&1 | grep --line-buffered -v -i warning | tee "$OUT/serving_$gpu.log" | tail -40
  rc=${PIPESTATUS[0]}
  ;;
benches)
  # the GPU-only results files of issues 23 (batch-1 step; sender threads, is_cancelled, the
  # frontends with no model and the engine's host work per step on that host), 24 (sampling costs) and 25 (KV tiers),
  # each bounded by the call's budget, packed into $OUT/benches.tgz (the device tool returns at
  # most 8 files): unpack it here with `tar xzf benches.tgz -C bench/results` (and
  # kernels/skinny_gemm_table.py from skinny_gemm_table.py); commit what it holds
  r="$OUT/benches"; mkdir -p "$r"; rm -f "$OUT/smoke.tsv" "$OUT/smoke.log"
  if [ "${TINY:-0}" = 1 ]; then  # the same steps on the CPU, shrunk: proves the script, measures nothing
    gpu=cpu dev=cpu
    p8b=(--max-tokens 8 --prompt-tokens 32) prof=(--device cpu --batch 1 4 --serve-steps 10)
    tiers=(--shape tiny --history 256 --turn-history 64 --turns 2 --repeats 1 --decode-tokens 16)
    nsamp=(--samples-prompt-tokens 64 --samples-max-tokens 4 --samples-repeats 1) conc=4
    bad=(--rows 4 --vocab 1000 --steps 10 --repeats 1) send=(--total 800 --repeats 1) asks=(--calls 500 --repeats 1)
    fload=(--concurrency 8 --step-ms 10 --max-tokens 16 --client-procs 2) hstep=(--concurrency 8 --repeats 1)
    grow=(--turn-history 32 --new 32 --concurrency 2)
  else
    gpu=$("$IMGPY" -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
    dev=cuda
    p8b=(--synthetic llama3-8b --engine-param dtype=bfloat16 --engine-param kv_cache_memory_mb=40000
         --engine-param max_num_batched_tokens=8192)
    prof=(--batch 1 64) tiers=(--shape llama3-8b) nsamp=() conc=64 bad=(--rows 64 --vocab 128256) send=(--repeats 5) asks=()
    fload=(--concurrency 64 256 --step-ms 7 --instances 1 2) hstep=()
    grow=(--turn-history 512 --new 512)
  fi
  # in the order of what the issues need first; a step that would pass the budget is listed as not run
  smoke profile-step 120 bash -o pipefail -c "'$IMGPY' bench/profile_step.py ${prof[*]} 2>&1 | grep -v -i warn > '$r/profile_step_$gpu.md'"
  smoke response-send 60 "$IMGPY" bench/response_send_cost.py "${send[@]}" --out "$r/response_send_cost_$gpu.md"
  smoke is-cancelled 40 "$IMGPY" bench/is_cancelled_cost.py "${asks[@]}" --out "$r/is_cancelled_cost_$gpu.md"
  smoke frontend-load 200 "$IMGPY" bench/frontend_load.py "${fload[@]}" --out "$r/frontend_load_$gpu.md"
  smoke host-step 60 "$IMGPY" bench/host_step_cost.py "${hstep[@]}" --out "$r/host_step_cost_$gpu.md"
  smoke gc-pause 60 "$IMGPY" bench/gc_pause.py --device $dev --out "$r/gc_pause_$gpu.md"
  smoke kv-tiers 300 "$IMGPY" bench/kv_tiers.py --device $dev "${tiers[@]}" --dir /tmp/tritonkv-synthetic \
    --parts ${TIER_PARTS:-1,3,4,2} --out "$r/kv_tiers_$gpu.md"
  # part 2 with growing histories (512-token turns, ~2.1k at the 4th): each returning turn
  # recomputes its whole history with the tier off, prefills only its new tokens with it on
  smoke kv-tiers-growing 150 "$IMGPY" bench/kv_tiers.py --device $dev "${tiers[@]}" --dir /tmp/tritonkv-synthetic \
    --parts 2 "${grow[@]}" --out "$r/kv_tiers_growing_$gpu.md"
  smoke sampling-n 100 "$IMGPY" bench/sampling_cost.py --device $dev "${p8b[@]}" "${nsamp[@]}" --only-samples \
    --out "$r/sampling_n_$gpu.md"
  smoke sampling 120 "$IMGPY" bench/sampling_cost.py --device $dev "${p8b[@]}" --concurrency $conc \
    --engine-param max_num_seqs=128 --out "$r/sampling_$gpu.md"
  smoke bad-words 60 bash -o pipefail -c "'$IMGPY' bench/bad_words_cost.py --device $dev ${bad[*]} > '$r/bad_words_cost_$gpu.md' 2>&1"
  if [ $dev = cuda ]; then  # CUDA events and cuBLASLt: nothing to prove on the CPU
    smoke skinny-gemm 150 "$IMGPY" bench/skinny_gemm.py --out "$r/skinny_gemm_$gpu" --write-table
    cp backend/tritonkv/kernels/skinny_gemm_table.py "$r/" 2>/dev/null
    smoke profile-step-skinny 100 bash -o pipefail -c "'$IMGPY' bench/profile_step.py --batch 1 --skinny 2>&1 | grep -v -i warn > '$r/profile_step_${gpu}_skinny.md'"
  fi
  # the device image has no column(1): the steps as a markdown table
  awk -F'\t' 'BEGIN { print "| step | exit | s | last line |"; print "|---|---:|---:|---|" }
               { printf "| %s | %s | %s | %s |\n", $1, $3, $4, $5 }' "$OUT/smoke.tsv" | tee "$r/benches_run.txt"
  tar czf "$OUT/benches.tgz" -C "$r" . && rm -rf "$r"
  rc=0
  ;;
files)
  # failing test files (or node ids) of a check, each in a pytest process of its own (a
  # device-side assert then poisons only its own file), JOBS at a time, full tracebacks in
  # $OUT/<file>.log; BLOCKING=1 sets CUDA_LAUNCH_BLOCKING (an assert names its kernel's caller)
  [ "${BLOCKING:-0}" = 1 ] && export CUDA_LAUNCH_BLOCKING=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  keep_server_logs
  "$IMGPY" -c "from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint as e; e()"
  one() {
    local f=$1 log="$OUT/$(echo "$1" | tr '/:[]' '____').log"
    timeout -k 5 "${LIMIT_S:-240}" "$IMGPY" -m pytest -q -rfE --tb=short -p no:cacheprovider \
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
  pack_server_logs
  rc=0
  ;;
*)
  echo "unknown mode $mode (check | serving | benches | files)" >&2; exit 2 ;;
esac
echo "gpu_run.sh $mode: exit $rc after $(( $(date +%s) - t0 )) s; files in $OUT:"; ls -la "$OUT"
exit "$rc"
