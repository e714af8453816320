#!/usr/bin/env bash
# Everything on a GPU machine in one call: build the extension in place, run the CUDA kernels'
# self-tests, the conformance suite on the GPU and the benchmarks, and write results and logs into
# RESULTS_DIR. A device call has 10 minutes: pass a subset of the phases to split the work.
#   ci/gpu.sh RESULTS_DIR [PHASES] [BENCH_FILTER]
#   PHASES: comma-separated from build,selftest,conformance,bench (default: all four)
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

if has selftest; then
  echo "== CUDA self-tests (csrc/**/*_selftest.cu: each kernel against a naive kernel, many shapes)"
  for src in $(find csrc -name '*_selftest.cu' | sort); do
    exe=/tmp/$(basename "$src" .cu)
    if nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc "${src%_selftest.cu}.cu" "$src" \
         -o "$exe" >>"$out/selftest.log" 2>&1; then
      timeout 120 "$exe" >>"$out/selftest.log" 2>&1; rc=$?  # 124: a hang (a barrier never completes)
    else
      rc=1
    fi
    echo "$src: exit $rc" | tee -a "$out/selftest.log"
    [ "$rc" -eq 0 ] || status=1
  done
fi

if has conformance; then
  echo "== conformance"
  timeout 420 python3 -m pytest conformance -q -p no:cacheprovider 2>&1 | tee "$out/conformance.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has bench; then
  echo "== benchmarks"
  DSKERNELS_BENCH_OUT="$out" timeout 540 python3 -m pytest bench -q -p no:cacheprovider ${filter:+-k "$filter"} \
    --benchmark-json="$out/pytest-benchmark.json" >"$out/bench.log" 2>&1 || { tail -30 "$out/bench.log"; status=1; }
  python3 -m bench.report "$out"/nvidia-*.json | tee "$out/bench.md"
fi
exit $status
