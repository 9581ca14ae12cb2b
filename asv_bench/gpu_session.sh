#!/usr/bin/env bash
# One device call: install carried wheels and the package, then run the given steps, logging to $OUT.
#   bash asv_bench/gpu_session.sh tests     # GPU test suites of triton and cupy
#   bash asv_bench/gpu_session.sh profile   # per-kernel times at gpu-a
#   bash asv_bench/gpu_session.sh compare   # the one-process peer benchmark (asv_bench/compare.py)
set -uo pipefail
OUT=${OUT:-/tmp/nha_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1   # keep autotune results (fla's take minutes) on disk between commands
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
    tests-quick)
      timeout 80 python3 -m pytest -m gpu tests/test_cupy_gpu.py -q -p no:cacheprovider > "$OUT/cupy_gpu.log" 2>&1; tail -3 "$OUT/cupy_gpu.log"
      NHA_TEST_DEVICE=cuda NHA_TEST_DTYPES=bfloat16,float32 NHA_TEST_EXAMPLES=6 timeout 100 \
        python3 -m pytest -m gpu tests/test_properties.py -q -p no:cacheprovider > "$OUT/properties_gpu.log" 2>&1
      tail -15 "$OUT/properties_gpu.log" ;;
    properties)
      NHA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -m gpu tests/test_properties.py -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/properties_gpu.log" ;;
    profile)
      timeout 150 python3 asv_bench/profile_gpu.py --backend triton --shape gpu-a 2>&1 | tee "$OUT/profile_triton.log" ;;
    profile-cupy)
      timeout 200 python3 asv_bench/profile_gpu.py --backend cupy --shape gpu-a 2>&1 | tee "$OUT/profile_cupy.log" ;;
    compare)
      timeout 540 python3 asv_bench/compare.py --out "$OUT/cmp" --budget ${NHA_GPU_BUDGET_S:-420} ${NHA_GPU_SHAPES:+--shapes $NHA_GPU_SHAPES} \
        > "$OUT/compare.log" 2>&1; tail -60 "$OUT/compare.log" ;;
    asv)
      # asv needs the git history: recreate it from a carried bundle (git bundle create .whl/repo.bundle HEAD)
      if [ ! -d .git ]; then git init -q -b main && git fetch -q .whl/repo.bundle HEAD && git update-ref HEAD FETCH_HEAD; fi
      git config --global --add safe.directory "$PWD"
      machine=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9-')
      (cd asv_bench && python3 -m asv machine --yes --machine "$machine" > "$OUT/asv.log" 2>&1 &&
        timeout 560 python3 -m asv run --python=same --set-commit-hash "$(git rev-parse HEAD)" --machine "$machine" \
          --bench "bench_gpu.Summary" --show-stderr >> "$OUT/asv.log" 2>&1)
      tail -30 "$OUT/asv.log"
      mkdir -p "$OUT/asv" && cp asv_bench/results/"$machine"/*.json "$OUT/asv/" ;;
  esac
done
