#!/usr/bin/env bash
# Build, GPU tests and benchmarks on a GPU machine, in phases that each aim to finish within 10 minutes.
#
#   bash benchmarks/run_gpu.sh                          # everything, in order (a machine without time limits)
#   PHASE=build,test bash benchmarks/run_gpu.sh         # some phases, in the order given (or: run_gpu.sh build,test)
#   PHASE=bench-attention-fwd CALL_BUDGET_S=570 bash benchmarks/run_gpu.sh
#
# Everything goes under $OUT (default ./gpu-out): every phase writes at most 3 files (listed below), plus
# environment.json and build.log once per invocation.
#
# Phase plan (estimates for one H100 with 16 CPU cores; nothing here has been measured yet):
#
#   phase                 what                                                     time        GPU memory peak
#   build                 pip install the package (CUDA extension for this GPU's   2-3 min     -
#                         arch only: sm_90a on an H100); skipped when the installed
#                         build matches the sources (hash in build/gpu-state/)
#   test                  GPU tests (-m gpu) + the Triton attention tests on the    4-6 min     ~40 GB (fp64 dense truth
#                         GPU; test.log, test.xml                                                of 2x4x10560^2 scores)
#   bench-attention-fwd   attention forward, 5 layouts x {sdpa, flex, torch,        4-5 min     ~3 GB (73,920 tokens,
#                         triton, cuda} (+ flash if importable), GEMM peak;                       24 heads x 128, bf16)
#                         10 of it are FlexAttention compiles
#   bench-attention-bwd   the same, forward+backward (flex bwd compiles: the long   6-8 min     ~6 GB
#                         part)
#   bench-ops             fused sampler / DiT ops vs eager and torch.compile        3-4 min     ~4 GB
#                         (9 torch.compile baselines)
#   bench-dit             one DiT forward: 5B on a 14,080-token window, 14B on the  2-3 min     ~35 GB (14B bf16 weights
#                         18,480-token 360P clip, vs diffusers on the same weights                28 GB, shared)
#   bench-pipeline-81     end to end at 2560x1408: 14B Stage I + 5B Stage II,       5-8 min     ~45-55 GB (weights
#                         21-frame warm-up, 81 frames, one dense 73,920-token                     ~40 GB)
#                         Stage II step vs one CSG window step
#   bench-pipeline-161    warm-up + 161 frames; ratios to 81 from build/gpu-state   5-8 min     ~45-55 GB
#   bench-pipeline-241    warm-up + 241 frames (may not fit 10 min)                 7-10 min    ~45-55 GB
#   sanitize              compute-sanitizer memcheck + racecheck, CUDA extension    3-5 min     small
#                         tests on the 200-token cases
#   test-cpu              the whole CPU suite on this torch (CUDA hidden, Triton    2-4 min     -
#                         interpreter): API drift of an older torch/Triton
#
# Aliases: all (every phase above, in order), bench-attention (fwd then bwd), bench-ops-dit, bench-pipeline
# (81, 161, 241). When GPU time is short, in priority order, invocations back to back on one machine (a fresh
# machine must rebuild): 1) build,test  2) bench-attention-fwd,bench-ops  3) bench-attention-bwd
# 4) bench-dit,bench-pipeline-81 if time is left. Set CALL_BUDGET_S (e.g. 570) so that an invocation returns
# before a 10-minute limit: phases then get the time left, a phase that runs out is stopped
# (SIGINT), the next ones are skipped, and benchmarks already finished are kept in the phase's .jsonl (one line
# per benchmark, written as each finishes).
#
# Copy the JSON into benchmarks/results/ and commit it; README tables come from those files.
set -uo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
# build/ is git-ignored, so on a machine that is kept between invocations it survives from one to the next.
STATE="${SWIFT_GPU_STATE:-$SRC/build/gpu-state}"
mkdir -p "$STATE"
PY="${PYTHON:-python}"
status=0
call_start=$(date +%s)

ALL_PHASES="build test bench-attention-fwd bench-attention-bwd bench-ops bench-dit bench-pipeline-81 bench-pipeline-161 bench-pipeline-241 sanitize test-cpu"
requested="${1:-${PHASE:-all}}"
phases=""
for p in ${requested//,/ }; do
    case "$p" in
        all) phases="$phases $ALL_PHASES" ;;
        bench-attention) phases="$phases bench-attention-fwd bench-attention-bwd" ;;
        bench-ops-dit) phases="$phases bench-ops bench-dit" ;;
        bench-pipeline) phases="$phases bench-pipeline-81 bench-pipeline-161 bench-pipeline-241" ;;
        build|test|bench-attention-fwd|bench-attention-bwd|bench-ops|bench-dit|bench-pipeline-81|bench-pipeline-161|bench-pipeline-241|sanitize|test-cpu)
            phases="$phases $p" ;;
        *) echo "unknown phase '$p' (phases: $ALL_PHASES; aliases: all bench-attention bench-ops-dit bench-pipeline)" >&2
           exit 2 ;;
    esac
done
echo "phases:$phases"

# Seconds a phase may still run: the rest of CALL_BUDGET_S (0 = no limit). A phase that would get under a minute
# is skipped.
remaining() {
    if [ -z "${CALL_BUDGET_S:-}" ]; then echo 0; return; fi
    echo $(( CALL_BUDGET_S - ($(date +%s) - call_start) ))
}

# Run a command under the time left, interrupting it (SIGINT, then SIGKILL 30 s later) when the budget runs out.
budgeted() {
    if [ -z "${CALL_BUDGET_S:-}" ]; then
        "$@"
        return
    fi
    local left
    left=$(remaining)
    if [ "$left" -lt 1 ]; then
        echo "(not started: CALL_BUDGET_S=$CALL_BUDGET_S is spent) $*" >&2
        return 124
    fi
    timeout --signal=INT --kill-after=30 "$left" "$@"
}

# -- environment -------------------------------------------------------------------------------------------------
"$PY" - <<'PY' > "$OUT/environment.json"
import json, platform, subprocess, torch
try:
    import triton; tv = triton.__version__
except Exception:
    tv = None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    smi = None
import importlib, shutil, sys
# What the phases import besides torch: a machine without network cannot pip-install a missing one, so say
# which are missing up front (pytest-benchmark for every bench phase, diffusers for bench-dit/bench-pipeline and
# the DiT parity test, ninja and nvcc for the build).
mods = {}
for name in ("flash_attn", "pytest", "pytest_benchmark", "hypothesis", "diffusers", "transformers", "safetensors",
             "imageio", "PIL", "numpy", "setuptools", "ninja"):
    try:
        mods[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception:
        mods[name] = None
missing = [n for n, v in mods.items() if v is None and n != "flash_attn"]
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "capability": torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
                  "nvidia_smi": smi, "python": platform.python_version(), "modules": mods,
                  "missing_modules": missing, "nvcc": shutil.which("nvcc"),
                  "compute_sanitizer": shutil.which("compute-sanitizer")}, indent=2))
PY
cat "$OUT/environment.json"

# -- build (reused while the sources do not change) --------------------------------------------------------------
source_hash() {
    find setup.py pyproject.toml csrc swift_kernels swift_model -type f \
        \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.toml' \) \
        -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
}

# The installed package (imported from outside the source tree) with its extension; prints its location.
installed_extension() {
    (cd "$OUT" && "$PY" -c "import swift_kernels, swift_kernels._C; print(swift_kernels.__file__)" 2>/dev/null)
}

ensure_build() {
    local want have loc
    want=$(source_hash)
    have=$(cat "$STATE/build.sha256" 2>/dev/null || true)
    loc=$(installed_extension)
    if [ "$want" = "$have" ] && [ -n "$loc" ] && [ "${loc#"$SRC"/}" = "$loc" ]; then
        echo "== build: installed package matches the sources ($loc), not rebuilt" | tee -a "$OUT/build.log"
        return 0
    fi
    if [ -z "${SWIFT_KERNELS_CUDA_ARCHS:-}" ]; then
        # Only this GPU's architecture: half the compile time of the default "80;90a". sm_90 gets the "a" variant.
        SWIFT_KERNELS_CUDA_ARCHS=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if (M, m) == (9, 0) else ''))" 2>/dev/null || echo "80;90a")
        export SWIFT_KERNELS_CUDA_ARCHS
    fi
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    echo "== build (sm_$SWIFT_KERNELS_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)" | tee -a "$OUT/build.log"
    local start; start=$(date +%s)
    if "$PY" -m pip install --no-build-isolation --no-deps . >> "$OUT/build.log" 2>&1; then
        loc=$(installed_extension)
        if [ -n "$loc" ]; then
            echo "$want" > "$STATE/build.sha256"
        else
            echo "build finished but swift_kernels._C does not import from the installed package" | tee -a "$OUT/build.log"
            (cd "$OUT" && "$PY" -c "import swift_kernels._C") >> "$OUT/build.log" 2>&1
            status=1
        fi
    else
        echo "build failed"; tail -50 "$OUT/build.log"; status=1
    fi
    echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/build.log"
    (cd "$OUT" && "$PY" -c "import swift_kernels as s; print('extension available:', s.extension_available())") 2>&1 | tee -a "$OUT/build.log"
}

# -- phases (run from $OUT so that the installed package, with its extension, is what gets imported) -------------
run_tests() {
    cd "$OUT"
    echo "== GPU tests"
    budgeted "$PY" -m pytest "$SRC/tests" -m gpu -q -p no:cacheprovider -rs --junitxml="$OUT/test.xml" \
        > "$OUT/test.log" 2>&1 || status=1
    tail -30 "$OUT/test.log"
    # The Triton attention tests pick the GPU when there is one: odd block sizes, empty rows, strides, fp16/fp32,
    # on the real compiler (the CPU only runs them in the interpreter). The sm_90 ahead-of-time compile test is
    # for machines without a GPU.
    echo "== Triton attention tests on the GPU"
    budgeted "$PY" -m pytest "$SRC/tests/test_attention_triton.py" -m "not gpu" -k "not compile_for_sm90" -q \
        -p no:cacheprovider >> "$OUT/test.log" 2>&1 || status=1
    tail -5 "$OUT/test.log"
    cd "$SRC"
}

run_test_cpu() {
    cd "$OUT"
    echo "== CPU test suite on this torch (CUDA hidden, Triton interpreter)"
    CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 budgeted "$PY" -m pytest "$SRC/tests" -q -p no:cacheprovider -rs \
        > "$OUT/test-cpu.log" 2>&1 || status=1
    tail -15 "$OUT/test-cpu.log"
    cd "$SRC"
}

run_sanitize() {
    cd "$OUT"
    if ! command -v compute-sanitizer > /dev/null; then
        echo "== sanitize: compute-sanitizer not found, skipped" | tee "$OUT/sanitize.log"
        cd "$SRC"; return
    fi
    : > "$OUT/sanitize.log"
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool (CUDA extension tests, 200-token blocks)" | tee -a "$OUT/sanitize.log"
        budgeted compute-sanitizer --tool "$tool" --print-limit 20 "$PY" -m pytest "$SRC/tests/test_cuda_extension.py" \
            -m gpu -k "P200" -q -x -p no:cacheprovider >> "$OUT/sanitize.log" 2>&1 || status=1
        tail -5 "$OUT/sanitize.log"
    done
    cd "$SRC"
}

# run_bench NAME FILE K-EXPR: pytest-benchmark JSON (NAME.json), the log (NAME.log) and the per-benchmark lines
# written as each one finishes (NAME.jsonl, kept when the phase is cut short). BENCH_FILTER narrows K-EXPR
# (pytest keeps only the last -k, so the two are joined here).
run_bench() {
    local name=$1 file=$2 kexpr=$3
    if [ -n "${BENCH_FILTER:-}" ]; then
        kexpr="${kexpr:+($kexpr) and }(${BENCH_FILTER})"
    fi
    cd "$OUT"
    echo "== $name${kexpr:+ (-k \"$kexpr\")}"
    rm -f "$OUT/$name.jsonl"
    SWIFT_BENCH_PARTIAL="$OUT/$name.jsonl" SWIFT_BENCH_STATE_DIR="$STATE" budgeted "$PY" -m pytest "$file" \
        ${kexpr:+-k "$kexpr"} --benchmark-only -q -p no:cacheprovider -rs \
        --benchmark-json="$OUT/$name.json" > "$OUT/$name.log" 2>&1 || status=1
    tail -25 "$OUT/$name.log"
    cd "$SRC"
}

for phase in $phases; do
    left=$(remaining)
    if [ -n "${CALL_BUDGET_S:-}" ] && [ "$left" -lt 60 ]; then
        echo "== $phase: skipped, ${left}s left of CALL_BUDGET_S=$CALL_BUDGET_S"
        status=1
        continue
    fi
    phase_start=$(date +%s)
    case "$phase" in
        build) ensure_build ;;
        test) ensure_build; run_tests ;;
        test-cpu) ensure_build; run_test_cpu ;;
        sanitize) ensure_build; run_sanitize ;;
        bench-attention-fwd)
            ensure_build
            run_bench "$phase" "$SRC/benchmarks/test_bench_attention.py" "gemm or (fwd and not bwd)" ;;
        bench-attention-bwd)
            ensure_build
            run_bench "$phase" "$SRC/benchmarks/test_bench_attention.py" "gemm or bwd" ;;
        bench-ops) ensure_build; run_bench "$phase" "$SRC/benchmarks/test_bench_ops.py" "" ;;
        bench-dit) ensure_build; run_bench "$phase" "$SRC/benchmarks/test_bench_dit.py" "" ;;
        bench-pipeline-*)
            ensure_build
            # The 81-frame result is saved under $STATE for the ratios of a later 161/241-frame call.
            run_bench "$phase" "$SRC/benchmarks/test_bench_pipeline.py" "full_size and ${phase#bench-pipeline-}" ;;
    esac
    echo "== $phase: $(( $(date +%s) - phase_start )) s"
done
exit $status
