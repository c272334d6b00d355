#!/usr/bin/env bash
# One device call (H100), run 18: GPU tests of the block-table padding rule, then the bf16
# gap to SDPA by block placement and config (bench/decode_explore.py PLAN), and ncu of SDPA's
# and our kernel at 16x4k. Carry .gpu-carry (pytest wheels).
python3 -m pip install -q --no-index --no-deps --target /tmp/pt .gpu-carry/pytest-*.whl \
  .gpu-carry/pluggy-*.whl .gpu-carry/iniconfig-*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/pt:backend PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
  tests/kernels/test_extend_attention.py -k "${TESTK:-padding or minor or gather}" 2>&1 | tail -4 \
  | tee $OUT/gpu_tests.log
timeout ${EXPLORE_S:-300} python3 bench/decode_explore.py --out $OUT --sdpa \
  --only ${ONLY:-16x4k,64x1k,128x2k,1x32k} --blocks ${BLOCKS:-random,sequential,local} 2>&1 \
  | tee $OUT/explore.log | tail -90
[ -n "$NO_NCU" ] && exit 0
NCU="ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats"
timeout 60 $NCU -k regex:"flash|fmha|attn|sdp" -c 1 python3 bench/decode_explore.py --profile 16x4k --sdpa \
  > $OUT/ncu_sdpa16x4k.txt 2>&1
timeout 60 $NCU -k regex:_decode -c 1 python3 bench/decode_explore.py --profile 16x4k \
  > $OUT/ncu_16x4k.txt 2>&1
grep -E "^  [_a-zA-Z].*\(|Duration|DRAM Throughput|Registers Per|Grid Size|Block Size|Dynamic Shared|Achieved Occ|Mem Busy|L2 Hit" $OUT/ncu_*.txt | cut -c1-220 | head -40
