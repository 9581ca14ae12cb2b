#!/usr/bin/env bash
# One device call: install carried wheels and the package, then run the given steps, logging to $OUT.
#   bash asv_bench/gpu_session.sh tests     # GPU test suites of triton and cupy (pytest-xdist, 8 workers)
#   bash asv_bench/gpu_session.sh properties  # Hypothesis properties against triton and cupy on the GPU
#   bash asv_bench/gpu_session.sh repro-bf16  # the bf16 slot-dot fault, with and without the candidate fix
#   bash asv_bench/gpu_session.sh state-pass  # chunk-state scan vs walk, gpu-b and gpu-a
#   bash asv_bench/gpu_session.sh bwd-dots  # bf16 operands in the backward's slot dots, checked and timed at gpu-a
#   bash asv_bench/gpu_session.sh wide      # chunk rows / warps for K = V = 128, checked and timed at gpu-c
#   bash asv_bench/gpu_session.sh decode-splits  # CuPy decode window splits, per-kernel times at the decode shape
#   bash asv_bench/gpu_session.sh decode-stages  # CuPy decode through the cp.async ring: decode tests, then timed
#   NHA_VARIANT="NAME=VALUE;..." bash asv_bench/gpu_session.sh variant-tests  # Triton GPU tests under those configs
#   NHA_TEST_BACKENDS=cupy NHA_TEST_EXAMPLES=6 bash asv_bench/gpu_session.sh properties  # one backend per call:
#     every example compiles new kernels, and both backends at 10 examples did not finish in 300 s
#   bash asv_bench/gpu_session.sh walk-pairs  # configs.STATE_WALK_PAIRS "bf16": the walk's GPU tests, then timed at gpu-a
#   bash asv_bench/gpu_session.sh cupy-gates  # cupy configs.MMA_FAST_GATES: the CuPy forward GPU tests with it off, both timed
#   bash asv_bench/gpu_session.sh cupy-state-scan  # cupy configs.MMA_STATE_PASS: the forward GPU tests under "scan", walk / scan / auto timed
#   bash asv_bench/gpu_session.sh profile   # per-kernel times at gpu-a
#   bash asv_bench/gpu_session.sh ncu-fwd   # Nsight Compute on the forward kernels at gpu-a (details, CuPy's per-SASS stalls)
#   bash asv_bench/gpu_session.sh compare   # the one-process peer benchmark (asv_bench/compare.py)
#   bash asv_bench/gpu_session.sh asv       # asv bench_gpu.Summary -> $OUT/asv_results.tar (needs .whl/repo.bundle)
set -uo pipefail
OUT=${OUT:-/tmp/nha_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1   # keep autotune results (fla's take minutes) on disk between commands
# NHA_NO_INSTALL=1: wheels and package already installed (runs started side by side must not reinstall).
# Carried wheels go into the interpreter's own environment (the GPU hosts are throwaway): asv
# starts its benchmark processes without PYTHONPATH, so a --target folder would hide fla there.
if [ -z "${NHA_NO_INSTALL:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl
fi
[ -n "${NHA_NO_INSTALL:-}" ] || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || cat "$OUT/install.log"
[ -n "${NHA_NO_INSTALL:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    tests)     # every GPU test file, 8 pytest-xdist workers (compiles dominate; a CUDA fault poisons the rest of
      # its worker's tests); -v names each result as it comes, so a log cut by the timeout still says what failed
      timeout ${NHA_TESTS_TIMEOUT_S:-420} python3 -m pytest -m gpu tests/test_triton_gpu.py tests/test_cupy_gpu.py \
        tests/test_naive_lowp.py -v --tb=short -rf -n ${NHA_TEST_WORKERS:-8} -p no:cacheprovider ${NHA_TEST_K:+-k "$NHA_TEST_K"} \
        > "$OUT/gpu_tests.log" 2>&1; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -40 ;;
    repro-bf16)   # the bf16 slot-dot fault (asv_bench/triton_tuning_notes.md), one process per setting
      # (NHA_REPRO_SETTINGS: space-separated settings, each NAME=VALUE,NAME=VALUE; "" = the defaults)
      for setting in ${NHA_REPRO_SETTINGS:-"BF16_SLOT_DOTS=True,BF16_MIN_SLOT_TILE=64"}; do
        echo "== ${setting:-default}"; timeout 90 python3 asv_bench/repro_bf16_slots.py 12 ${setting//,/ } 2>&1 | grep -E "bad|Error" | tail -2
      done | tee "$OUT/repro_bf16.log" ;;
    bwd-dots)   # which of the backward's slot kernels may take bf16 operands (configs.BWD_BF16_DOTS)
      timeout ${NHA_STEP_TIMEOUT_S:-300} python3 asv_bench/tune_gpu.py --backend triton --shape gpu-a --modes forward,backward \
        --out "$OUT" --check-all --variant default: \
        --variant slot:BWD_BF16_DOTS='("state","slot")' --variant probs-slot:BWD_BF16_DOTS='("state","q_probs","slot")' \
        --variant all:BWD_BF16_DOTS='("state","q","slot")' \
        > "$OUT/bwd_dots.log" 2>&1; grep -A6 "^variant" "$OUT/bwd_dots.log" ;;
    wide)   # K = V = 128 (gpu-c): chunk rows and forward warps (configs.CHUNK_ROWS_128, BWD_CHUNK_ROWS_128,
      # FWD_WARPS_128; BT = 32 compiles to mma.sync, 64 to wgmma), checked and timed at gpu-c
      timeout ${NHA_STEP_TIMEOUT_S:-300} python3 asv_bench/tune_gpu.py --backend triton --shape gpu-c --modes forward,backward \
        --out "$OUT" --check-all --variant default: --variant fwd-w4:FWD_WARPS_128=4 \
        --variant bt64:CHUNK_ROWS_128=64,BWD_CHUNK_ROWS_128=64 --variant bt64-w4:CHUNK_ROWS_128=64,FWD_WARPS_128=4 \
        > "$OUT/wide.log" 2>&1; grep -A6 "^variant" "$OUT/wide.log" ;;
    decode-splits)   # CuPy decode: window splits per (sequence, KV head) (configs.DECODE_SPLITS); compare the
      # per-kernel sums (decode_kernels): the whole-call times are eager, mostly Python and launches
      timeout ${NHA_STEP_TIMEOUT_S:-150} python3 asv_bench/tune_gpu.py --backend cupy --shape decode --modes decode --out "$OUT" \
        --variant default: --variant s2:DECODE_SPLITS=2 --variant s4:DECODE_SPLITS=4 --variant s6:DECODE_SPLITS=6 \
        --variant s8:DECODE_SPLITS=8 > "$OUT/decode_splits.log" 2>&1; grep -o '"variant": "[^"]*"\|"decode_kernels": {[^}]*}' "$OUT/decode_splits.log" ;;
    decode-stages)   # CuPy decode: window rows through the cp.async ring (configs.DECODE_STAGES): the CuPy decode
      # tests under it, then per-kernel times at the decode shape against the register prefetch (0)
      NHA_TEST_CUPY_CONFIG="DECODE_STAGES=${NHA_STAGES:-3}" timeout 200 python3 -m pytest -m gpu tests/test_cupy_gpu.py \
        tests/test_decode_long.py -k decode -v --tb=short -n 8 -p no:cacheprovider > "$OUT/decode_stages_tests.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$OUT/decode_stages_tests.log" | tail -20
      timeout ${NHA_STEP_TIMEOUT_S:-150} python3 asv_bench/tune_gpu.py --backend cupy --shape decode --modes decode --out "$OUT" \
        --variant st0:DECODE_STAGES=0 --variant st2:DECODE_STAGES=2 --variant st3:DECODE_STAGES=3 --variant st0-again:DECODE_STAGES=0 \
        > "$OUT/decode_stages.log" 2>&1; grep -o '"variant": "[^"]*"\|"decode_ms": [0-9.]*\|"nha_decode_window": [0-9.]*' "$OUT/decode_stages.log" ;;
    variant-tests)   # the Triton GPU tests (accuracy vs fp64 and vs the naive low-precision computation, tiny dims) under NHA_VARIANT
      NHA_TEST_TRITON_CONFIG="${NHA_VARIANT:?NHA_VARIANT=NAME=VALUE;...}" timeout ${NHA_TESTS_TIMEOUT_S:-240} \
        python3 -m pytest -m gpu tests/test_triton_gpu.py -q -rf -n 8 -p no:cacheprovider -k "${NHA_TEST_K:-low_precision or forward_backward or tiny_dims}" \
        > "$OUT/variant_tests.log" 2>&1; head -5 "$OUT/variant_tests.log"; tail -15 "$OUT/variant_tests.log" ;;
    properties)   # the Hypothesis property suite against every usable CUDA backend (triton, cupy), 8 workers;
      # every case is logged before it runs ($OUT/cases.gw*: after a CUDA fault, the line before the
      # first "CONTEXT ALREADY BROKEN" names the faulting case; launches are synchronous for that)
      NHA_TEST_CASE_LOG="$OUT/cases" CUDA_LAUNCH_BLOCKING=${CUDA_LAUNCH_BLOCKING:-1} NHA_TEST_DEVICE=cuda NHA_TEST_EXAMPLES=${NHA_TEST_EXAMPLES:-12} timeout ${NHA_TESTS_TIMEOUT_S:-420} \
        python3 -m pytest -m gpu tests/test_properties.py -q -rf -n ${NHA_TEST_WORKERS:-8} -p no:cacheprovider ${NHA_TEST_K:+-k "$NHA_TEST_K"} \
        > "$OUT/properties_gpu.log" 2>&1
      tail -30 "$OUT/properties_gpu.log"
      # a fault: replay the faulting case alone, then under compute-sanitizer (memcheck)
      for log in $(grep -l "CONTEXT ALREADY BROKEN" "$OUT"/cases.* 2>/dev/null | head -1); do
        { timeout 90 python3 -m tests.replay_case "$log"
          timeout 240 compute-sanitizer --tool memcheck --print-limit 8 python3 -m tests.replay_case "$log"; } \
          > "$OUT/replay.log" 2>&1; tail -40 "$OUT/replay.log"
      done ;;
    state-pass)   # chunk-state pass: scan vs walk at gpu-b and gpu-a (configs.STATE_PASS)
      { timeout 200 python3 asv_bench/tune_gpu.py --backend triton --shape gpu-b --modes forward,backward --out "$OUT" \
          --variant scan:STATE_PASS=scan --variant walk:STATE_PASS=walk \
          --variant scan-local64:STATE_PASS=scan,state_local_slot_tile=64
        timeout 240 python3 asv_bench/tune_gpu.py --backend triton --shape gpu-a --modes forward,backward --out "$OUT" \
          --variant scan:STATE_PASS=scan --variant walk:STATE_PASS=walk; } \
        > "$OUT/state_pass.log" 2>&1; grep -A4 "^variant" "$OUT/state_pass.log" ;;
    walk-pairs)   # the forward chunk-state walk two chunks per loop step for bf16 operands (configs.STATE_WALK_PAIRS
      # "bf16"): the walk's GPU tests under it (odd and even chunk counts, varlen), then forward and backward at gpu-a
      NHA_TEST_TRITON_CONFIG="STATE_WALK_PAIRS='bf16'" timeout 200 python3 -m pytest -m gpu tests/test_triton_gpu.py \
        -k state_walk -v --tb=short -n 4 -p no:cacheprovider > "$OUT/walk_pairs_tests.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$OUT/walk_pairs_tests.log" | tail -10
      timeout ${NHA_STEP_TIMEOUT_S:-240} python3 asv_bench/tune_gpu.py --backend triton --shape gpu-a --modes forward,backward \
        --out "$OUT" --no-check --variant default: --variant pairs:STATE_WALK_PAIRS=\'bf16\' --variant default-again: \
        > "$OUT/walk_pairs.log" 2>&1; grep -A4 "^variant" "$OUT/walk_pairs.log" ;;
    cupy-gates)   # the CuPy register-tile kernels' gate math off expm1f / exp2f (backends/cupy/configs.py
      # MMA_FAST_GATES, the default) or on them: the CuPy forward GPU tests on them, then both timed at gpu-a and gpu-c
      NHA_TEST_CUPY_CONFIG="MMA_FAST_GATES=False" timeout 200 python3 -m pytest -m gpu tests/test_cupy_gpu.py \
        -k forward -q --tb=short -n 8 -p no:cacheprovider > "$OUT/cupy_gates_tests.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$OUT/cupy_gates_tests.log" | tail -10
      for sh in gpu-a gpu-c; do
        timeout 120 python3 asv_bench/tune_gpu.py --backend cupy --shape $sh --modes forward --out /tmp/cupy_gates_$sh \
          --variant default: --variant exact:MMA_FAST_GATES=False --variant default-again: > "$OUT/cupy_gates_$sh.log" 2>&1
        grep -A4 "^variant" "$OUT/cupy_gates_$sh.log"
      done ;;
    cupy-state-scan)   # the CuPy register-tile path's chunk states in two passes (backends/cupy/configs.py
      # MMA_STATE_PASS "scan"): the CuPy forward GPU tests under it, then walk, scan and "auto" timed at gpu-a, gpu-b, gpu-c
      NHA_TEST_CUPY_CONFIG="MMA_STATE_PASS='scan'" timeout 200 python3 -m pytest -m gpu tests/test_cupy_gpu.py \
        -k forward -q --tb=short -n 8 -p no:cacheprovider > "$OUT/cupy_scan_tests.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$OUT/cupy_scan_tests.log" | tail -10
      for sh in gpu-a gpu-b gpu-c; do
        timeout 120 python3 asv_bench/tune_gpu.py --backend cupy --shape $sh --modes forward --out /tmp/cupy_scan_$sh \
          --variant walk:MMA_STATE_PASS=\'walk\' --variant scan:MMA_STATE_PASS=\'scan\' --variant auto: > "$OUT/cupy_scan_$sh.log" 2>&1
        grep -A4 "^variant" "$OUT/cupy_scan_$sh.log"
      done ;;
    profile)   # whole-call times and per-kernel split (asv_bench/tune_gpu.py)
      { timeout 150 python3 asv_bench/tune_gpu.py --backend triton --shape gpu-a --modes forward,backward --out "$OUT"
        timeout 60 python3 asv_bench/tune_gpu.py --backend triton --shape decode --modes decode --out "$OUT"; } \
        > "$OUT/profile_triton.log" 2>&1; grep -A3 "^variant" "$OUT/profile_triton.log" ;;
    ncu-fwd)   # one launch of each forward kernel at gpu-a under Nsight Compute (--set full, clocks left alone):
      # the details page of each, and the CuPy main kernel's SASS with its stall samples (source page, csv)
      for spec in cupy:nha_fwd_main_mma cupy:nha_fwd_state_mma triton:nha_fwd_kernel; do
        be=${spec%%:*}; kn=${spec#*:}
        timeout 240 ncu --clock-control none --set full --kernel-name "$kn" --launch-skip 2 --launch-count 1 \
          -f -o /tmp/ncu_$kn python3 asv_bench/one_call.py --backend $be --shape ${NHA_NCU_SHAPE:-gpu-a} --calls 3 \
          > /tmp/ncu_$kn.log 2>&1 || tail -5 /tmp/ncu_$kn.log
        ncu --import /tmp/ncu_$kn.ncu-rep --page details > "$OUT/ncu_$kn.txt" 2>&1
      done
      ncu --import /tmp/ncu_nha_fwd_main_mma.ncu-rep --page source --print-source sass --csv \
        > "$OUT/ncu_nha_fwd_main_mma_sass.csv" 2>&1
      grep -E "Duration|Achieved Occupancy|Registers Per|Issued Ipc Active|Block Limit" "$OUT"/ncu_*.txt ;;
    profile-cupy)
      { timeout 200 python3 asv_bench/tune_gpu.py --backend cupy --shape gpu-a --modes forward --out "$OUT"
        timeout 60 python3 asv_bench/tune_gpu.py --backend cupy --shape decode --modes decode --out "$OUT"; } \
        > "$OUT/profile_cupy.log" 2>&1; grep -A3 "^variant" "$OUT/profile_cupy.log" ;;
    compare)
      # NHA_COMMIT: the commit the tree was copied from (compare.py records it; a copied .git may be older)
      # NHA_TRITON_CONFIG="NAME=VALUE;...": a candidate setting timed against the peers (recorded);
      # NHA_GPU_SKIP="IMPL:MODE,...": pairs not to run (fla's backward autotunes for minutes per head size);
      # a run its timeout cuts leaves $OUT/compare_records.jsonl: compare.py --from-records rebuilds it
      NHA_GPU_RECORDS="$OUT/compare_records.jsonl" timeout ${NHA_STEP_TIMEOUT_S:-540} python3 asv_bench/compare.py --out "$OUT/cmp" --budget ${NHA_GPU_BUDGET_S:-420} ${NHA_GPU_SHAPES:+--shapes $NHA_GPU_SHAPES} ${NHA_GPU_SKIP:+--skip $NHA_GPU_SKIP} \
        ${NHA_TRITON_CONFIG:+--triton-config "$NHA_TRITON_CONFIG"} \
        > "$OUT/compare.log" 2>&1; tail -60 "$OUT/compare.log" ;;
    asv)
      # asv GPU suite, bench_gpu.Summary by default (NHA_ASV_BENCH overrides the regex). asv needs the
      # git history (commit hash, date, branch "main"); the copied tree has none, so it is recreated
      # from a bundle made where the tree was committed: `git bundle create .whl/repo.bundle HEAD`.
      # Results: asv_bench/results/<machine>/<commit8>-existing-*.json (+ machine.json, benchmarks.json),
      # packed into $OUT/asv_results.tar (extract it in asv_bench/); the log is $OUT/asv.log.
      # asv writes results only when the run ends: NHA_GPU_BUDGET_S (default 300 s of measuring)
      # must leave room inside the timeout (540 s) for discovery and the last job's overrun.
      export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'  # copied tree: other owner
      if ! command -v git >/dev/null; then echo "asv: no git on this host" | tee "$OUT/asv.log"; continue; fi
      # The commit comes from the bundle, cloned beside the tree: the tree copied to a GPU host may
      # carry a .git of an older commit (seen 2026-12-02: results filed under the session's base).
      # asv reads only hashes, dates and the branch from it (--python=same builds nothing).
      repo=$PWD
      if [ -f .whl/repo.bundle ]; then
        repo=/tmp/nha_repo
        rm -rf "$repo" && git clone -q .whl/repo.bundle "$repo" && git -C "$repo" checkout -q -B main \
          || { echo "asv: cloning .whl/repo.bundle failed" | tee "$OUT/asv.log"; continue; }
      elif [ ! -d .git ]; then
        echo "asv: no .git and no .whl/repo.bundle (git bundle create .whl/repo.bundle HEAD)" | tee "$OUT/asv.log"; continue
      fi
      sed "s#\"repo\": \"..\",#\"repo\": \"$repo\",#" asv_bench/asv.conf.json > asv_bench/asv.session.conf.json
      commit=$(git -C "$repo" rev-parse HEAD)
      [ -z "$(git --git-dir="$repo/.git" --work-tree=. status --porcelain --untracked-files=no -- nha_core backends asv_bench/benchmarks 2>/dev/null)" ] \
        || echo "asv: WARNING: the tree differs from commit ${commit:0:10} (results are filed under it)"
      # a stable, readable machine name (NVIDIA H200 -> h200) and the card in machine.json ("gpu")
      card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
      machine=${NHA_ASV_MACHINE:-$(echo "${card%%,*}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')}
      machine=${machine:-no-gpu}
      # `asv machine --yes --machine NAME` would store the name alone (asv keeps only the fields that
      # differ from its defaults), so write ~/.asv-machine.json through asv with every field. Every
      # field is a graph dimension in asv's dashboard: keep them stable across lent hosts of one kind
      # (os without the kernel release, ram in GiB, the card without the driver version).
      python3 - "$machine" "${card:-none}" > "$OUT/asv.log" 2>&1 <<'PY'
import platform, sys
from asv.machine import Machine, MachineCollection
card = [x.strip() for x in sys.argv[2].split(",")]
info = dict(Machine.get_defaults(), machine=sys.argv[1], os=platform.system(),
            gpu=card[0] + (f" ({card[1]})" if len(card) > 1 else ""))  # asv copies every key to machine.json
info["ram"] = f"{round(int(info['ram']) / 2**30)} GiB" if str(info["ram"]).isdigit() else info["ram"]
MachineCollection.save(sys.argv[1], info)
print("asv machine:", info, "| driver:", ", ".join(card[2:]))
PY
      # NHA_GPU_RECORDS: every measurement also lands in $OUT/asv_records.jsonl as it is taken
      [ $? = 0 ] && (cd asv_bench && NHA_GPU_RECORDS="$OUT/asv_records.jsonl" NHA_GPU_BUDGET_S=${NHA_GPU_BUDGET_S:-300} timeout ${NHA_ASV_TIMEOUT_S:-540} \
          python3 -m asv run --config asv.session.conf.json --python=same --set-commit-hash "$commit" --machine "$machine" \
          --bench "${NHA_ASV_BENCH:-bench_gpu.Summary}" --show-stderr >> "$OUT/asv.log" 2>&1)
      echo "asv run exit $?" >> "$OUT/asv.log"
      tail -40 "$OUT/asv.log"
      if ls asv_bench/results/"$machine"/*.json >/dev/null 2>&1; then
        tar -cf "$OUT/asv_results.tar" -C asv_bench results/"$machine" results/benchmarks.json \
          && tar -tvf "$OUT/asv_results.tar"
      fi ;;
    *) echo "gpu_session.sh: unknown step '$step' (steps: see the header of this file)" ;;
  esac
done
