#!/usr/bin/env bash
# Everything on a GPU machine in one call: build the extension in place, run the CUDA kernels'
# self-tests, the conformance suite on the GPU and the benchmarks, and write results and logs into
# RESULTS_DIR. A device call has 10 minutes: pass a subset of the phases to split the work.
#   ci/gpu.sh RESULTS_DIR [PHASES] [BENCH_FILTER]
#   PHASES: comma-separated from build,selftest,sweep,conformance,bench (default: all but sweep)
#   BENCH_FILTER: a pytest -k expression for the benchmarks
set -uo pipefail
out=${1:?usage: ci/gpu.sh RESULTS_DIR [PHASES] [BENCH_FILTER]}
phases=${2:-build,selftest,conformance,bench}
filter=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
has() { [[ ",$phases," == *",$1,"* ]]; }

if has build; then
  echo "== build"
  if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log"; exit 1
  fi
  python3 -m dskernels info | tee "$out/info.txt"
  so=$(ls dskernels/_C*.so)
  echo "SASS: $(cuobjdump -sass "$so" | grep -c QGMMA) QGMMA, $(cuobjdump -sass "$so" | grep -c HGMMA) HGMMA" | tee -a "$out/info.txt"
fi

if has selftest || has sweep; then
  echo "== CUDA self-tests (csrc/**/*_selftest.cu: each kernel against a naive kernel, many shapes)"
  srcs=$(find csrc -name '*_selftest.cu' | sort)
  for src in $srcs; do  # compile in parallel, run one at a time
    (nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc "${src%_selftest.cu}.cu" "$src" \
       -o "/tmp/$(basename "$src" .cu)" >"$out/$(basename "$src" .cu).build.log" 2>&1) &
  done
  wait
fi
if has selftest; then
  for src in $srcs; do
    exe=/tmp/$(basename "$src" .cu)
    if [ -x "$exe" ]; then
      timeout 300 "$exe" >>"$out/selftest.log" 2>&1; rc=$?  # 124: a hang (a barrier never completes)
    else
      cat "$out/$(basename "$src" .cu).build.log" >>"$out/selftest.log"; rc=1
    fi
    echo "$src: exit $rc" | tee -a "$out/selftest.log"
    grep -E "cases failed" "$out/selftest.log" | tail -1
    [ "$rc" -eq 0 ] || status=1
  done
fi
if has sweep; then
  echo "== FP8 GEMM config sweep (every compiled config on the DeepSeek-V3 shapes)"
  timeout 300 /tmp/fp8_gemm_selftest sweep | tee "$out/gemm_sweep.txt" | tail -5
fi

if has conformance; then
  echo "== conformance (one pytest process per file, side by side on the GPU)"
  for f in conformance/test_*.py; do
    name=$(basename "$f" .py)
    timeout 420 python3 -m pytest "$f" -v -rfE --durations=5 -p no:cacheprovider >"$out/$name.log" 2>&1 &
  done
  for job in $(jobs -p); do wait "$job" || status=1; done
  for f in conformance/test_*.py; do
    name=$(basename "$f" .py)
    echo "$name: $(tail -1 "$out/$name.log")"
    grep -E "^(FAILED|ERROR) " "$out/$name.log" | cut -c1-300
  done
fi

if has bench; then
  echo "== benchmarks"
  DSKERNELS_BENCH_OUT="$out" timeout 540 python3 -m pytest bench -q -p no:cacheprovider ${filter:+-k "$filter"} \
    --benchmark-json="$out/pytest-benchmark.json" >"$out/bench.log" 2>&1 || { tail -30 "$out/bench.log"; status=1; }
  python3 -m bench.report "$out"/nvidia-*.json | tee "$out/bench.md"
fi
exit $status
