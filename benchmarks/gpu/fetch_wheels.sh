#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels the GPU machine lacks, into .whl/
# (ignored by git, carried to the GPU machine; check.sh installs them first).
# The GPU machine runs Python 3.12 on x86-64 and has numpy, scipy, scikit-learn,
# pyarrow and pandas already; it lacks xgboost, lightgbm and river, and Liger
# Kernel (pure Python, the optional peer of benchmarks/ops; installed without
# its dependencies, which the machine's torch and triton provide).
#   bash benchmarks/gpu/fetch_wheels.sh
# xgboost-cpu is XGBoost without its CUDA build (5.6 MB): the CPU peer, and the
# trainer of bench_forest's model. The CUDA build (126 MB) does not fit a carry
# (64 MiB in all), so XGBoost's GPU predictor is not measured there.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
for pkg in "xgboost-cpu==3.2.0" "lightgbm==4.7.0" "river==0.26.1" "liger-kernel==0.8.5"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
ls -la .whl
du -sh .whl
