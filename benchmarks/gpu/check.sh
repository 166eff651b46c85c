#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU and no network, where
# Python has torch, triton, cmake, ninja, pybind11 and scikit-build-core.
#   bash benchmarks/gpu/check.sh            (from the repository root)
# Builds fastml without build isolation, runs the gpu-marked tests and the GPU
# benchmarks, and prints a summary table last. Writes logs to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/fastml-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FASTML_TEST_GPU=1
declare -a summary

step() {  # step NAME COMMAND...
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then
    summary+=("$(printf '%-28s %-6s %5ss' "$name" ok $((SECONDS - t0)))")
  else
    summary+=("$(printf '%-28s %-6s %5ss  (see %s.log)' "$name" FAIL $((SECONDS - t0)) "$name")")
  fi
  tail -n 5 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step build python3 -m pip install --no-build-isolation --no-deps -q -v . \
  --config-settings=cmake.define.FASTML_CUDA=ON
step info python3 -m fastml info
step gpu-tests python3 -m pytest -q -m gpu -p no:cacheprovider tests
for b in benchmarks/gpu/bench_*.py; do
  [ -e "$b" ] || continue
  step "$(basename "$b" .py)" python3 "$b" --json "$out/$(basename "$b" .py).json"
done
step fastml-bench python3 -m fastml bench --quick --device cuda --out "$out/bench-gpu.json"

echo
echo "== fastml GPU check summary"
printf '%s\n' "${summary[@]}"
for f in "$out"/bench_*.log; do
  [ -e "$f" ] || continue
  echo "-- $(basename "$f" .log)"
  grep -E '^(candidate|[A-Za-z])' "$f" | tail -n 12
done
