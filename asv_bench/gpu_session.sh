#!/usr/bin/env bash
# One device call: install carried wheels and the package, then run the given steps, logging to $OUT.
#   bash asv_bench/gpu_session.sh tests     # GPU test suites of triton and cupy
#   bash asv_bench/gpu_session.sh profile   # per-kernel times at gpu-a
#   bash asv_bench/gpu_session.sh compare   # the one-process peer benchmark (asv_bench/compare.py)
set -uo pipefail
OUT=${OUT:-/tmp/nha_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    tests)
      timeout 200 python3 -m pytest -m gpu tests/test_triton_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/triton_gpu.log"
      timeout 120 python3 -m pytest -m gpu tests/test_cupy_gpu.py -q -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/cupy_gpu.log" ;;
    properties)
      NHA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -m gpu tests/test_properties.py -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/properties_gpu.log" ;;
    profile)
      timeout 150 python3 asv_bench/profile_gpu.py --backend triton --shape gpu-a 2>&1 | tee "$OUT/profile_triton.log" ;;
    profile-cupy)
      timeout 200 python3 asv_bench/profile_gpu.py --backend cupy --shape gpu-a 2>&1 | tee "$OUT/profile_cupy.log" ;;
    compare)
      timeout 540 python3 asv_bench/compare.py --out "$OUT/cmp" 2>&1 | tail -80 | tee "$OUT/compare.log" ;;
  esac
done
