#!/usr/bin/env bash
# Nsight Compute evidence for the benchmark gaps, on a GPU machine, after ci/gpu.sh built the
# extension: per kernel, the tensor-pipe and DRAM utilization, achieved occupancy and time.
#   ci/profile.sh RESULTS_DIR
set -uo pipefail
out=${1:?usage: ci/profile.sh RESULTS_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
metrics=gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct
ncu --clock-control none --nvtx --nvtx-include 'profile/' --metrics "$metrics" --csv -k regex:'fp8_gemm|mla|quant' \
  python3 -m bench.profile_targets >"$out/ncu.csv" 2>"$out/ncu.log"
python3 -c "
import csv, sys
rows = list(csv.DictReader(l for l in open('$out/ncu.csv') if l.startswith('\"')))
for r in rows:
    print(r['Kernel Name'][:60].ljust(60), r['Metric Name'][:50].ljust(50), r['Metric Value'])
" | tee "$out/ncu.txt"
