#!/usr/bin/env bash
# Nsight Compute evidence for the benchmark gaps, on a GPU machine, after ci/gpu.sh built the
# extension: per profiled kernel (bench/profile_targets.py), its duration, tensor-pipe activity, DRAM,
# L2 (and its hit rate) and SM throughput, and the top warp-stall reasons. Metrics by regex, as these
# names read on the H100's ncu (2026-11-27): sm__pipe_tensor_op_gmma_cycles_active reads n/a there,
# while sm__pipe_tensor_cycles_active counts the wgmma (HGMMA/QGMMA) cycles.
#   ci/profile.sh RESULTS_DIR [KERNEL_REGEX]   (default: the CUDA and Triton GEMM and MLA kernels)
set -uo pipefail
out=${1:?usage: ci/profile.sh RESULTS_DIR [KERNEL_REGEX]}
kernels=${2:-fp8_gemm|mla_split|quant}
cd "$(dirname "$0")/.."
mkdir -p "$out"
ncu --clock-control none --nvtx --nvtx-include 'profile/' --csv -k "regex:$kernels" \
  --metrics 'regex:sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active$,regex:smsp__warp_issue_stalled_.*_per_warp_active.pct$,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum' \
  python3 -m bench.profile_targets >"$out/ncu.csv" 2>"$out/ncu.log"
python3 - "$out/ncu.csv" <<'PY' | tee "$out/ncu.txt"
import csv, sys
from collections import defaultdict
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
metrics, names = defaultdict(dict), {}
for r in rows:
    metrics[r["ID"]][r["Metric Name"]] = float(r["Metric Value"].replace(",", "") or 0)
    names[r["ID"]] = f'{r["Kernel Name"][:60]} grid {r.get("Grid Size", "?")}'
for i, m in metrics.items():
    stalls = sorted(((v, k.split("stalled_")[1].split("_per_warp")[0]) for k, v in m.items() if "stalled" in k),
                    reverse=True)[:5]
    print(f'{i:>3} {names[i]}\n    {m.get("gpu__time_duration.sum", 0) / 1e3:.1f} us, tensor pipe '
          f'{m.get("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", 0):.1f} %, DRAM '
          f'{m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0):.1f} %, L2 '
          f'{m.get("lts__throughput.avg.pct_of_peak_sustained_elapsed", 0):.1f} % (hit rate '
          f'{m.get("lts__t_sector_hit_rate.pct", 0):.0f} %), SM '
          f'{m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0):.1f} %; stalls (% of warp cycles): '
          + ", ".join(f"{name} {v:.0f}" for v, name in stalls))
PY
