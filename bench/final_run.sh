#!/usr/bin/env bash
# One device call (H100): GPU kernel + engine tests for the token-minor V change, then the
# committed decode / extend benches and the exploration rows. Carry .gpu-carry (pytest wheels).
python3 -m pip install -q --no-index --no-deps --target /tmp/pt .gpu-carry/pytest-*.whl \
  .gpu-carry/pluggy-*.whl .gpu-carry/iniconfig-*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/pt:backend PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
  tests/kernels/test_extend_attention.py tests/kernels/test_kv_write.py \
  -k "quant or minor or gather or variants or kv" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
TRITONKV_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider \
  tests/test_quantized_kv.py tests/test_cache_layout.py 2>&1 | tail -3 | tee -a $OUT/gpu_tests.log
timeout 200 python3 bench/decode_attention.py --out $OUT --variants 2>&1 | tail -25
timeout 90 python3 bench/decode_explore.py --out $OUT 2>&1 | tee $OUT/explore.log | tail -20
