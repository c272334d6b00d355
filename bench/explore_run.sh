#!/usr/bin/env bash
# One device call: decode config exploration (bench/decode_explore.py) + ncu of chosen configs.
export PYTHONPATH=backend PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
timeout 400 python3 bench/decode_explore.py --out $OUT ${ONLY:+--only $ONLY} 2>&1 | tee $OUT/explore.log | tail -60
NCU="ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats --section SchedulerStats"
timeout 60 $NCU -k regex:_decode -c 2 python3 bench/decode_explore.py --profile 16x8k_fp8 > $OUT/ncu_fp8.txt 2>&1
timeout 60 $NCU -k regex:_decode -c 2 python3 bench/decode_explore.py --profile 16x8k_fp8 \
  --cfg '{"block_n": 128, "num_warps": 4, "num_stages": 3, "num_splits": 1, "gather_ids": true, "v_pages": true}' > $OUT/ncu_fp8_pages.txt 2>&1
grep -E "^  [_a-zA-Z].*\(|Duration|DRAM Throughput|Registers Per|Issued Warp|Executed Instructions  " $OUT/ncu_*.txt | head -60
