#!/usr/bin/env bash
# Everything on a GPU machine in one call: build the extension in place, run the CUDA kernels'
# self-tests, compute-sanitizer over them, the conformance suite on the GPU and the benchmarks, and
# write results and logs into RESULTS_DIR (a few files: build.log, info.txt, selftest.log,
# sanitize.log, conformance.log, bench.*). Each phase stays under 6 minutes; pass a subset of them to fit
# a machine that allows one command only so long.
#   ci/gpu.sh RESULTS_DIR [PHASES] [BENCH_FILTER]
#   PHASES: comma-separated from build,selftest,sanitize,sweep,conformance,parity,bench (default: all but sweep)
#   BENCH_FILTER: a pytest -k expression for the benchmarks
set -uo pipefail
out=${1:?usage: ci/gpu.sh RESULTS_DIR [PHASES] [BENCH_FILTER]}
phases=${2:-build,selftest,sanitize,conformance,parity,bench}
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

if has selftest || has sanitize || has sweep; then
  echo "== CUDA self-tests (csrc/**/*_selftest.cu: each kernel against a naive kernel, many shapes)"
  srcs=$(find csrc -name '*_selftest.cu' | sort)
  for src in $srcs; do  # compile in parallel, run one at a time
    # (with every other source of its folder: csrc/gemm's kernels share the heuristics)
    (nvcc -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a -Icsrc \
       $(ls "$(dirname "$src")"/*.cu | grep -v _selftest.cu) "$src" \
       -o "/tmp/$(basename "$src" .cu)" >"/tmp/$(basename "$src" .cu).build.log" 2>&1) &
  done
  wait
  cat /tmp/*_selftest.build.log >>"$out/selftest.log"
fi
if has selftest; then
  for src in $srcs; do
    exe=/tmp/$(basename "$src" .cu)
    if [ -x "$exe" ]; then
      timeout 300 "$exe" >>"$out/selftest.log" 2>&1; rc=$?  # 124: a hang (a barrier never completes)
    else
      echo "$src did not build (its log is above)" >>"$out/selftest.log"; rc=1
    fi
    echo "$src: exit $rc" | tee -a "$out/selftest.log"
    grep -E "cases failed" "$out/selftest.log" | tail -1
    [ "$rc" -eq 0 ] || status=1
  done
fi
if has sanitize; then
  # compute-sanitizer over the self-tests' small "sanitize" cases (no torch in the process): memcheck,
  # racecheck and synccheck filtered to the project's kernels (the self-tests' reference and fill kernels
  # are not checked); initcheck over every kernel, since it learns what is initialized only from the
  # kernels it instruments (filtered, it takes the fill kernels' writes for missing ones). The three
  # self-tests side by side, their four tools one after another.
  echo "== compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over the self-tests"
  sanitize_one() {  # $1: self-test executable, $2: kernel-name substring
    for tool in memcheck racecheck synccheck initcheck; do
      local start=$SECONDS log="/tmp/sanitize-$(basename "$1").log" filter=(--kernel-name "kns=$2") what=$2
      [ "$tool" = initcheck ] && { filter=(); what="(all)"; }
      echo "--- $tool (kernels matching $what)" >>"$log"
      timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 9 \
        "$1" sanitize >"$log.$tool" 2>&1
      local rc=$? summary note=""
      cat "$log.$tool" >>"$log"
      summary=$(tail -4 "$log.$tool" | grep -E "SUMMARY" | tr -s ' =' ' ' | tr '\n' ';')
      # racecheck hazards count only where they are not triaged (csrc/mla/NOTES.md: the tool's false
      # positives on named-barrier hand-offs, shown on ci/racecheck_probe.cu; every site is marked)
      if [ "$tool" = racecheck ] && [ "$rc" -eq 9 ] && python3 ci/racecheck_triage.py "$log.$tool" >>"$log"; then
        rc=0; note=" all at sites triaged as the tool's false positives (csrc/mla/NOTES.md)"
      fi
      echo "$tool $(basename "$1"): exit $rc in $((SECONDS - start)) s:${summary:- no summary line}$note" >>"$log"
      [ "$rc" -eq 0 ] || echo "$tool $(basename "$1") FAILED" >>/tmp/sanitize-failed
    done
  }
  rm -f /tmp/sanitize-*
  for src in $srcs; do
    case $src in *gemm*) kernels=fp8_gemm_kernel ;; *mla*) kernels=mla_ ;; *) kernels=quant ;; esac
    sanitize_one "/tmp/$(basename "$src" .cu)" "$kernels" &
  done
  # The evidence for the triage: the MLA kernel's barrier protocol alone, correct by construction, which
  # racecheck reports all the same (hazards expected here; they do not fail the phase).
  if nvcc -std=c++17 -O3 -lineinfo -gencode=arch=compute_90a,code=sm_90a -Icsrc ci/racecheck_probe.cu \
       -o /tmp/racecheck_probe >/tmp/sanitize-probe.log 2>&1; then
    for mode in 0 1; do
      echo "racecheck probe (ci/racecheck_probe.cu) mode $mode: $(timeout 120 compute-sanitizer --tool racecheck \
        /tmp/racecheck_probe $mode 2>&1 | grep -E "SUMMARY" | tr -s ' =' ' ')" >>/tmp/sanitize-probe.log
    done
  fi
  # The grouped GEMMs' kernels, which the dense self-test does not launch: one small call of each layout
  # from Python (ci/sanitize_grouped_gemm.py), memcheck and racecheck filtered to the GEMM kernels.
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool "$tool" --kernel-name kns=fp8_gemm_kernel --error-exitcode 9 \
      --target-processes all python3 ci/sanitize_grouped_gemm.py >"/tmp/sanitize-grouped.$tool" 2>&1
    rc=$?
    echo "$tool grouped GEMMs (ci/sanitize_grouped_gemm.py): exit $rc:$(tail -4 "/tmp/sanitize-grouped.$tool" | \
      grep -E "SUMMARY" | tr -s ' =' ' ')" >>/tmp/sanitize-probe.log
    [ "$rc" -eq 0 ] || echo "$tool grouped GEMMs FAILED" >>/tmp/sanitize-failed
  done
  wait
  cat /tmp/sanitize-*_selftest.log /tmp/sanitize-probe.log >"$out/sanitize.log"
  grep -E "^(memcheck|racecheck|synccheck|initcheck) |^racecheck (triage|probe)" "$out/sanitize.log"
  [ -e /tmp/sanitize-failed ] && status=1
fi
if has sweep; then
  echo "== FP8 GEMM config sweep (every compiled config on the DeepSeek-V3 shapes)"
  timeout 300 /tmp/fp8_gemm_selftest sweep | tee "$out/gemm_sweep.txt" | tail -5
fi

if has conformance; then
  echo "== conformance (one pytest process per file, side by side on the GPU)"
  for f in conformance/test_*.py; do
    name=$(basename "$f" .py)
    timeout 420 python3 -m pytest "$f" -v -rfE --durations=5 -p no:cacheprovider >"/tmp/$name.log" 2>&1 &
  done
  for job in $(jobs -p); do wait "$job" || status=1; done
  for f in conformance/test_*.py; do
    name=$(basename "$f" .py)
    cat "/tmp/$name.log" >>"$out/conformance.log"
    echo "$name: $(tail -1 "/tmp/$name.log")"
    grep -E "^(FAILED|ERROR) " "/tmp/$name.log" | cut -c1-300
  done
fi

if has parity; then
  # The reference model's BF16 and FP8 training on the small preset (conformance/test_model.py): the
  # DeepSeek-V3 report's 0.25 % bound, the noise floor of a second seed, a broken recipe that must fail.
  echo "== training parity (small preset, 1000 steps each)"
  DSKERNELS_PARITY=1 DSKERNELS_BENCH_OUT="$out" timeout 340 python3 -m pytest conformance/test_model.py \
    -k training_matches -s -q -p no:cacheprovider >"$out/parity.log" 2>&1 || status=1
  grep -E "training parity|passed|failed" "$out/parity.log"
fi

if has bench; then
  echo "== benchmarks"
  DSKERNELS_BENCH_OUT="$out" timeout 540 python3 -m pytest bench -q -p no:cacheprovider ${filter:+-k "$filter"} \
    --benchmark-json="$out/pytest-benchmark.json" >"$out/bench.log" 2>&1 || { tail -30 "$out/bench.log"; status=1; }
  python3 -m bench.report "$out"/nvidia-*.json | tee "$out/bench.md"
fi
exit $status
