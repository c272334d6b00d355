#!/usr/bin/env bash
# Device calls (H100) that produced the committed decode tables (run 21). Carry .gpu-carry
# (pytest wheels). PART=tests: a hand-kept list of GPU tests, kept for the record of runs 13-23
# (the whole suite is bench/gpu_run.sh check); PART=bench: the decode table with blocks in random order (both peers), then
# in sequential and interleaved order (SDPA only): bench/results/decode_attention*.md.
python3 -m pip install -q --no-index --no-deps --target /tmp/pt .gpu-carry/pytest-*.whl \
  .gpu-carry/pluggy-*.whl .gpu-carry/iniconfig-*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/pt:backend PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
if [ "${PART:-tests}" = tests ]; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
    tests/kernels/test_extend_attention.py tests/kernels/test_kv_write.py \
    -k "${TESTK:-decode or padding or minor or quant or kv}" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
  TRITONKV_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_oracle.py tests/engine/test_engine_behaviour.py tests/engine/test_quantized_kv.py \
    tests/cache/test_layout.py 2>&1 | tail -3 | tee -a $OUT/gpu_tests.log
else
  timeout 260 python3 bench/decode_attention.py --out $OUT 2>&1 | tail -16
  for b in sequential interleaved; do
    timeout 120 python3 bench/decode_attention.py --out $OUT --blocks $b --tag _$b --no-flex \
      --only 1x32k,16x4k,64x1k,128x2k,16x8k,"16x8k fp8" 2>&1 | tail -12
  done
fi
