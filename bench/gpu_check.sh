#!/usr/bin/env bash
# The engine and server tests on a CUDA machine (the lent H100), in one device call:
#   device run, carry [".gpu-carry"] (fill it with ../shared/gpu/prepare_carry.sh plus the
#   pytest/pluggy/iniconfig wheels), command: bash bench/gpu_check.sh
# 1. oracle + behaviour tests with the engine on CUDA (Triton kernels, fp32): the image's
#    python (numpy 2, transformers);
# 2. the e2e tests against a real tritonserver with KIND_GPU instances: the stub runs in the
#    carried numpy-1.26 env (device_env.sh), the test process in the image's python.
set -o pipefail
IMGPY=$(command -v python3)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pt \
  .gpu-carry/pytest-*.whl .gpu-carry/pluggy-*.whl .gpu-carry/iniconfig-*.whl \
  .gpu-carry/tritonclient-*.whl .gpu-carry/python_rapidjson-*.whl 2>/dev/null
export PYTHONPATH=/tmp/pt PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
TRITONKV_TEST_DEVICE=cuda timeout 200 $IMGPY -m pytest -q -p no:cacheprovider \
  tests/engine/test_oracle.py tests/engine/test_engine_behaviour.py 2>&1 | tee "$OUT/gpu_engine_tests.log" | tail -3
source .gpu-carry/device_env.sh
timeout 300 $IMGPY -m pytest -q -p no:cacheprovider tests/e2e/test_server_e2e.py 2>&1 | tee "$OUT/gpu_e2e.log" | tail -3
