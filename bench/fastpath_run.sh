#!/usr/bin/env bash
# GPU fast-path recipe for the lent H200, in one device call (carry .gpu-carry, filled by
# ../shared/gpu/prepare_carry.sh plus the pytest, pluggy and iniconfig wheels):
#   PART=tests   the whole suite on CUDA (bench/gpu_run.sh check)
#   PART=inproc  the in-process engine, graphs on and off, on the synthetic Llama-3-8B shape
#   PART=server  tritonserver + in-process + HF references (bench/results/serving_h200.*)
# Several parts: PART="tests inproc".
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pt \
  .gpu-carry/pytest-*.whl .gpu-carry/pluggy-*.whl .gpu-carry/iniconfig-*.whl \
  .gpu-carry/tritonclient-*.whl .gpu-carry/python_rapidjson-*.whl 2>/dev/null
export PYTHONPATH=/tmp/pt
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
for part in ${PART:-tests}; do
  case $part in
    tests)  # the whole suite now (no hand-kept list): bench/gpu_run.sh check
      bash bench/gpu_run.sh check ;;
    profile)
      timeout 240 python3 bench/profile_step.py $PROFILE_ARGS 2>&1 | grep -v -i warn | tail -60 | tee "$OUT/profile.md" ;;
    inproc)
      timeout 560 python3 bench/serving_benchmark.py --synthetic llama3-8b --systems inprocess inprocess-eager \
        --concurrency 1 64 --prompt-tokens 200 --max-tokens 180 --min-requests 8 --hf-batch \
        --out "$OUT" --name inproc --no-plot 2>&1 | tee "$OUT/inproc.log" | grep -v Warning | tail -40 ;;
    hf)  # HF generate at batch 1 and 64 beside the floor (the image's python: transformers needs it)
      timeout 300 python3 bench/serving_benchmark.py --synthetic llama3-8b --systems --concurrency 1 64 \
        --prompt-tokens 200 --max-tokens 180 --hf-batch 1 64 --out "$OUT" --name hf_h200 --no-plot 2>&1 \
        | tee "$OUT/hf_h200.log" | grep -v Warning | tail -25 ;;
    server)  # SYSTEMS, NAME, HF ("--hf-batch" skips HF generate), EXTRA (e.g. --engine-param k=v)
      source .gpu-carry/device_env.sh
      timeout 580 python3 bench/serving_benchmark.py --synthetic llama3-8b \
        --systems ${SYSTEMS:-tritonkv inprocess} --concurrency 1 16 64 --prompt-tokens 200 --max-tokens 180 \
        --min-requests 16 --hf-batch $EXTRA --out "$OUT" --name ${NAME:-serving_h200} 2>&1 \
        | tee "$OUT/${NAME:-serving_h200}.log" | grep -v Warning | tail -30 ;;
  esac
done
