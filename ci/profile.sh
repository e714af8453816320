#!/usr/bin/env bash
# Nsight Compute evidence for the benchmark gaps, on a GPU machine, after ci/gpu.sh built the
# extension: per kernel, the speed-of-light figures, pipe utilization (the tensor pipes included),
# occupancy and warp stall reasons. Sections rather than raw metric names, whose spelling changes
# between ncu versions (sm__pipe_tensor_op_gmma_cycles_active read n/a on the H100's ncu).
#   ci/profile.sh RESULTS_DIR
set -uo pipefail
out=${1:?usage: ci/profile.sh RESULTS_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
ncu --clock-control none --nvtx --nvtx-include 'profile/' --csv -k regex:'fp8_gemm|mla|quant' \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats \
  python3 -m bench.profile_targets >"$out/ncu.csv" 2>"$out/ncu.log"
python3 - "$out/ncu.csv" <<'PY' | tee "$out/ncu.txt"
import csv, sys
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
keep = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput", "Achieved Occupancy",
        "Registers Per Thread", "Executed Ipc Active", "Warp Cycles Per Issued Instruction")
for r in rows:
    name = r["Metric Name"]
    if name in keep or "Pipe" in r.get("Section Name", "") or "Tensor" in name:
        print(r["ID"].rjust(3), r["Kernel Name"][:56].ljust(56), name[:44].ljust(44), r["Metric Value"],
              r.get("Metric Unit", ""))
PY
