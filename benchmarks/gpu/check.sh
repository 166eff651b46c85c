#!/usr/bin/env bash
# The GPU check: one prepared command for a machine with an NVIDIA GPU and no
# network, where Python has torch, triton, cmake, ninja, pybind11 and
# scikit-build-core (docs/development.md, "The GPU check").
#
#   bash benchmarks/gpu/check.sh [--quick] [--only AREAS] [--no-build]
#   bash benchmarks/gpu/check.sh --smoke      # no GPU needed: every benchmark's code path on
#                                             # CPU tensors / tiny shapes (CI runs this)
#
#   --quick        the whole check in about 4 minutes on an H100/H200, the build included
#                  (fewer shapes and repeats; the same code paths)
#   --only AREAS   comma-separated subset of: ops, forest, data, drift, infer
#   --no-build     use the fastml already installed (default: build it here, only for the
#                  GPU architecture found by nvidia-smi, with one job per CPU)
#   --smoke        no build, no gpu tests; each benchmark once on tiny inputs (CPU if no GPU)
#
# Wheels of packages the machine lacks (xgboost-cpu, lightgbm, river) travel in .whl/
# (benchmarks/gpu/fetch_wheels.sh) and are installed to /tmp/fastml-site first; without
# them the steps that need them print why they skip. Logs and JSON go to $OUT (default
# /tmp/fastml-gpu-check); the summary is printed last: each step ok/FAIL/skip with its
# seconds, the failing tests, then each benchmark's key figures.
set -uo pipefail
cd "$(dirname "$0")/../.."

quick=0 smoke=0 build=1 only="ops,forest,data,drift,infer"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --smoke) smoke=1 build=0 ;;
    --no-build) build=0 ;;
    --only) only="$2"; shift ;;
    --only=*) only="${1#--only=}" ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for a in ${only//,/ }; do
  case "$a" in ops|forest|data|drift|infer) ;; *)
    echo "check.sh: --only takes ops, forest, data, drift, infer; got '$a'" >&2; exit 2 ;;
  esac
done
wants() { [[ ",$only," == *",$1,"* ]]; }

out="${OUT:-/tmp/fastml-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
[ "$smoke" = 1 ] || export FASTML_TEST_GPU=1
declare -a summary
failed=0
t_start=$SECONDS

step() {  # step NAME COMMAND...: runs COMMAND, logs to $out/NAME.log, records ok/FAIL
  local name=$1; shift
  local t0=$SECONDS
  echo "### [$((SECONDS - t_start))s] $name"
  if "$@" >"$out/$name.log" 2>&1; then
    summary+=("$(printf '%-22s %-5s %5ss' "$name" ok $((SECONDS - t0)))")
  else
    failed=1
    summary+=("$(printf '%-22s %-5s %5ss  (%s.log)' "$name" FAIL $((SECONDS - t0)) "$name")")
  fi
  tail -n 3 "$out/$name.log"
}
skip() {  # skip NAME REASON
  summary+=("$(printf '%-22s %-5s %5s   %s' "$1" skip - "$2")")
  echo "### $1 skipped: $2"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/fastml-site .whl/*.whl
  export PYTHONPATH="/tmp/fastml-site${PYTHONPATH:+:$PYTHONPATH}"
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader \
    | tee "$out/gpu.txt"
fi

if [ "$build" = 1 ]; then
  # Only the architecture of the GPU found here (e.g. compute_cap 9.0 -> 90): a third of
  # the default build's device code. The default build (80-real;90) is unchanged.
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
  arch_flag=()
  [ -n "$cap" ] && arch_flag=(--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$cap")
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  step build python3 -m pip install --no-build-isolation --no-deps -q . \
    --config-settings=cmake.define.FASTML_CUDA=ON --config-settings=build-dir=build/gpu-check \
    "${arch_flag[@]}"
fi
step info python3 -m fastml info

# The gpu-marked tests of the chosen areas; failures are kept whole in the log.
if [ "$smoke" = 0 ]; then
  tests=()
  wants ops && tests+=(tests/test_ops_gpu.py)
  wants data && tests+=(tests/test_data_gpu.py)
  wants drift && tests+=(tests/test_drift_profile.py)
  { wants forest || wants infer; } && tests+=(tests/test_forest.py)
  step gpu-tests python3 -m pytest -m gpu -p no:cacheprovider -rfE --tb=long -q "${tests[@]}"
fi

# The benchmarks. Each writes JSON with a "key" section that the summary prints.
mode=()
[ "$quick" = 1 ] && mode=(--quick)
[ "$smoke" = 1 ] && mode=(--smoke)
have() { python3 -c "import $1" >/dev/null 2>&1; }
wants ops && step bench_ops python3 benchmarks/gpu/bench_ops.py "${mode[@]}" --json "$out/bench_ops.json"
if wants forest; then
  step bench_forest python3 benchmarks/gpu/bench_forest.py "${mode[@]}" --json "$out/bench_forest.json"
fi
wants data && step bench_data python3 benchmarks/gpu/bench_data.py "${mode[@]}" --json "$out/bench_data.json"
wants drift && step bench_drift python3 benchmarks/gpu/bench_drift.py "${mode[@]}" --json "$out/bench_drift.json"
if [ "$smoke" = 0 ]; then
  # fastml bench's components: data, drift, infer (Forest and Batcher), ops.
  comps=$(echo "${only//forest/infer}" | tr ',' '\n' | sort -u | paste -sd, -)
  step fastml-bench python3 -m fastml bench --quick --device cuda --only "$comps" \
    --out "$out/bench-gpu.json"
fi

echo
echo "== fastml GPU check summary ($((SECONDS - t_start)) s$([ "$quick" = 1 ] && echo ", --quick")$([ "$smoke" = 1 ] && echo ", --smoke"))"
printf '%s\n' "${summary[@]}"
if [ -f "$out/gpu-tests.log" ]; then
  grep -E '^(FAILED|ERROR) ' "$out/gpu-tests.log" | head -n 20
fi
python3 benchmarks/gpu/summary.py "$out" || true
exit "$failed"
