#!/usr/bin/env bash
# The whole test suite on the lent GPU (TRITONKV_TEST_DEVICE=cuda) + the GPU benchmarks' smoke
# runs -> $OUT/gpu_check.md: `bash bench/gpu_run.sh check`, which says how (carry .gpu-carry,
# filled by bench/gpu_carry.sh). Run it after every change to engine/, model/, ops/ or kernels/
# and commit bench/results/gpu_check.md with that change.
exec bash "$(dirname "$0")/gpu_run.sh" check "$@"
