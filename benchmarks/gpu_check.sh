#!/usr/bin/env bash
# swift-i2v GPU check: correctness of every GPU path at real sizes first, then speed; fits 9 minutes, build included.
#
#   bash benchmarks/gpu_check.sh              # on an H100/H200 (torch 2.11 / Triton 3.6 / Python 3.12); results in $OUT
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every step on tiny sizes, in well under a minute (CI runs it)
#
# Give the command a 570 s limit: the script starts no step it cannot finish before BUDGET_S (default 510 s) is
# spent, cuts each step at its own limit (`timeout`, one process per step, so a crash or a hang costs one step),
# and always writes the summary. It writes 7 files under $OUT (default ./gpu-out; ./gpu-out-dry for a dry run):
#   env.json      device, versions, modules          checks.jsonl  one line per correctness case
#   steps.jsonl   one line per step (rc, seconds)    bench.jsonl   one line per measurement, as it finishes
#   run.log       every step's output                kernels.jsonl registers/spills/shared memory of the Triton
#   results.json  all of it: device, versions, date, kernels that ran (GPU only)
#                 per op/backend pass or fail
# Commit results.json as benchmarks/results/<device>-<date>.json, then record the kernels it verifies:
#   python -m swift_kernels.verified update benchmarks/results/<device>-<date>.json
#   python -m swift_kernels.verified readme README.md
#
# Optional inputs carried from a CPU machine in the git-ignored build/gpu-carry/:
#   _C.cpython-312-x86_64-linux-gnu.so  the extension built for sm_90a against torch 2.11.0+cu130 / Python 3.12
#   src.sha256                          `find setup.py csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`
#                                       of the sources it was built from (used only when it matches this tree)
#   *.whl                               pure-Python wheels installed to a temporary folder (diffusers, for the VAE
#                                       step: `pip download diffusers==0.42.1 --no-deps -d build/gpu-carry`)
#
# Steps, most valuable first (limits in seconds; estimates for an H200 with 16 CPU cores, not measurements). The
# order is the value: what the automatic choice runs by default, then the memory plan, then our kernels, then speed
# (tests/benchmarks/test_gpu_check.py sums the estimates: the memory step always starts within the budget).
#   env         versions, GPU, modules                                                       60   ~10
#   ext         the carried extension, or an in-place build for this GPU's architecture      240  ~90
#   c-torch     PyTorch's kernels the automatic choice takes where none of ours is verified:
#               SDPA on the dense window, FlexAttention on the clip (bf16)                    180  ~75
#   mem         the memory plan: Wan2.2-TI2V-5B's Stage II (random weights) at 1280x704x33
#               under balanced and 24gb (blocks streamed: pinned buffers, side stream,
#               events): Stage II latents bitwise equal, each phase's max_memory_reserved
#               within 15% of swift-i2v plan's estimate (benchmarks/gpu_memory_check.py)      150  ~60
#   multi       two or more GPUs only: Ulysses and FSDP2 (prefetched) over NCCL equal one
#               process (benchmarks/multi_gpu_check.py)                                      90   ~30
#   c-cuda      CUDA extension (mma.sync) attention, window 14,080 + clip 73,920 tokens x 24
#               heads x 128, bf16 + fp16, fwd + bwd, vs the fp32 reference (2x SDPA's error)  150  ~40
#   c-sm90      the Hopper TMA + wgmma forward, same cases, forward only (a hang costs 90 s)  90   ~20
#   c-triton    Triton attention, same cases                                                  200  ~80
#   c-ops       Triton sampler step and DiT ops at 2K sizes vs their references              120  ~30
#   t-gpu       pytest -m gpu: extension edge cases, sync-free plans, > 2^31-element tensors  150  ~60
#   b-fwd       forward TFLOP/s on the window, clip and packed windows: ours vs SDPA flash /
#               cuDNN (each window gathered) vs FlexAttention vs the automatic choice; an
#               8192^3 bf16 matmul as the ceiling                                             180  ~100
#   b-ops       fused-op GB/s vs a device-to-device copy, vs the reference                   90   ~25
#   b-bwd       forward+backward, the same implementations                                   150  ~80
#   vae         2K Wan2.2 VAE decode, 3 latent frames, bf16, random weights (needs diffusers) 120  ~40
#   t-mem       pytest -m gpu: the memory estimate vs max_memory_allocated, VAE encode,      150  ~70
#               24gb from files (page-locked buffers, LoRA on the GPU), encoders read onto it
#   e2e         the whole generation at 2560x1408x17 (E2E_FRAMES), random-weight             300  ~90
#               presets, --memory auto: seconds and achieved TFLOP/s per phase (the
#               plan's FLOPs over the time) beside a bf16 GEMM (benchmarks/e2e.py)
#   summary     results.json and the short table printed last                                60   ~5
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d swift_kernels ] || { echo "run from the swift-i2v repository" >&2; exit 2; }
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ]; then
    OUT="${OUT:-$PWD/gpu-out-dry}"
    BUDGET_S="${BUDGET_S:-58}"
    MIN_STEP=3 RESERVE=3
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
else
    OUT="${OUT:-$PWD/gpu-out}"
    BUDGET_S="${BUDGET_S:-510}"
    MIN_STEP=20 RESERVE=15
    unset TRITON_INTERPRET
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
        echo "no CUDA GPU visible: run with --dry-run on a CPU" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"
export OUT DRY BUDGET_S PYTHONUNBUFFERED=1
unset SWIFT_KERNELS_BACKEND SWIFT_KERNELS_HOPPER SWIFT_KERNELS_UNVERIFIED
T0=$(date +%s)
LOG="$OUT/run.log"
for f in env.json steps.jsonl run.log checks.jsonl bench.jsonl kernels.jsonl results.json; do : > "$OUT/$f"; done

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# step NAME MAX_SECONDS CMD...: CMD under the smaller of MAX_SECONDS and the budget left (less the summary's
# reserve), in its own process; one line in steps.jsonl. A step that cannot get MIN_STEP seconds is skipped.
step() {
    local name=$1 max=$2 l s rc n sum; shift 2
    l=$(( $(left) - $( [ "$name" = summary ] && echo 0 || echo "$RESERVE" ) ))
    if [ "$l" -lt "$MIN_STEP" ] && [ "$name" != summary ]; then
        echo "{\"step\":\"$name\",\"skipped\":\"budget\"}" | tee -a "$OUT/steps.jsonl"; return 99
    fi
    [ "$l" -lt 10 ] && l=10
    [ "$max" -gt "$l" ] && max=$l
    echo "===== $name (limit ${max}s, at $(( $(date +%s) - T0 ))s)" >> "$LOG"
    s=$(date +%s); n=$(wc -l < "$LOG")
    DEADLINE=$(( s + max - 5 )) timeout -k 10 "$max" "$@" >> "$LOG" 2>&1; rc=$?
    sum=$(tail -n +"$((n + 1))" "$LOG" | grep -E "(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" | tail -n 1 | tr -d '"=')
    echo "{\"step\":\"$name\",\"rc\":$rc,\"secs\":$(( $(date +%s) - s )),\"end_at\":$(( $(date +%s) - T0 )),\"pytest\":\"${sum# }\"}" \
        | tee -a "$OUT/steps.jsonl"
    return $rc
}
skip() { echo "{\"step\":\"$1\",\"skipped\":\"$2\"}" | tee -a "$OUT/steps.jsonl"; }
export DEADLINE
CHECK=("$PY" benchmarks/gpu_check.py)

# ---- carried pure-Python wheels (diffusers for the VAE step) -----------------------------------------------------
if [ "$DRY" = 0 ] && ls build/gpu-carry/*.whl > /dev/null 2>&1; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" build/gpu-carry/*.whl >> "$LOG" 2>&1 \
        && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step env 60 "${CHECK[@]}" env

# ---- the CUDA extension: carried, else built here for this GPU only ------------------------------------------------
EXT=1
SM90=1
if [ "$DRY" = 1 ]; then
    skip ext "dry run: no GPU to build for"
else
    SO=swift_kernels/_C.cpython-312-x86_64-linux-gnu.so
    src_hash() { find setup.py csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64; }
    EXT_OK=(-c "import swift_kernels._C as C; print('extension:', C.CUDA_ARCHS, 'sm90:', C.HAS_SM90, 'bwd:', C.HAS_BACKWARD)")
    if [ -f "build/gpu-carry/${SO##*/}" ] && [ "$(cat build/gpu-carry/src.sha256 2> /dev/null)" = "$(src_hash)" ]; then
        cp "build/gpu-carry/${SO##*/}" "$SO"
        step ext-carried 60 "$PY" "${EXT_OK[@]}" && EXT=0 || rm -f "$SO"
    fi
    if [ "$EXT" != 0 ]; then
        CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ')
        step ext-build 240 env SWIFT_KERNELS_CUDA_ARCHS="${CC:-9.0}" MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace \
            && step ext-check 60 "$PY" "${EXT_OK[@]}" && EXT=0
    fi
    "$PY" -c "import torch, swift_kernels._C as C, sys; sys.exit(0 if C.HAS_SM90 and torch.cuda.get_device_capability() == (9, 0) else 1)" \
        2> /dev/null && SM90=0
fi

# ---- what runs by default, and the memory plan -------------------------------------------------------------------------
step c-torch 180 env DTYPES="$([ "$DRY" = 0 ] && echo bf16)" "${CHECK[@]}" attention sdpa,flex
step mem 150 "${CHECK[@]}" memory
NGPU=0
[ "$DRY" = 0 ] && NGPU=$(nvidia-smi -L 2> /dev/null | grep -c "^GPU")
if [ "${NGPU:-0}" -ge 2 ]; then
    step multi 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/multi_gpu_check.py
else
    skip multi "fewer than two GPUs"
fi

# ---- our kernels -------------------------------------------------------------------------------------------------------
CUDA_RC=99; SM90_RC=99
if [ "$EXT" = 0 ]; then
    step c-cuda 150 "${CHECK[@]}" attention cuda; CUDA_RC=$?
    if [ "$SM90" = 0 ]; then step c-sm90 90 "${CHECK[@]}" attention cuda-sm90; SM90_RC=$?; else skip c-sm90 "no sm_90a build or not a 9.0 GPU"; fi
else
    skip c-cuda "no CUDA extension"; skip c-sm90 "no CUDA extension"
fi
step c-triton 200 "${CHECK[@]}" attention triton
step c-ops 120 "${CHECK[@]}" ops
if [ "$DRY" = 0 ]; then
    step t-gpu 150 "$PY" -m pytest -q -p no:cacheprovider -rfEs -m gpu tests/kernels/test_cuda_extension.py \
        tests/kernels/attention/test_attention_plan.py tests/kernels/test_large_tensors.py
else
    skip t-gpu "dry run: no GPU"
fi
# a kernel that failed or hung in its check is not timed
export BENCH_CUDA=$([ "$CUDA_RC" = 0 ] && echo 1 || echo 0) BENCH_SM90=$([ "$SM90_RC" = 0 ] && echo 1 || echo 0)

# ---- speed, then the rest while time is left -------------------------------------------------------------------------
step b-fwd 180 "${CHECK[@]}" bench-fwd
step b-ops 90 "${CHECK[@]}" bench-ops
step b-bwd 150 "${CHECK[@]}" bench-bwd
step vae 120 "${CHECK[@]}" vae
if [ "$DRY" = 0 ]; then
    # the memory plan against the device: measured peak vs swift-i2v plan's estimate; VAE encode of a CPU clip
    step t-mem 150 "$PY" -m pytest -q -p no:cacheprovider -rfEs -m gpu tests/model/planning/test_planner.py \
        tests/model/generation/test_pipeline.py tests/model/generation/test_host_memory.py \
        tests/model/nets/test_encoder_readers.py
else
    skip t-mem "dry run: no GPU"
fi
# the end-to-end run, last: whatever time the budget has left (the benchmark skips, with its reason, a variant or
# a timed run that would not finish within the step)
step e2e 300 "${CHECK[@]}" e2e
step summary 60 "${CHECK[@]}" summary

echo "===== total $(( $(date +%s) - T0 )) s (rc 124: cut by its limit); results in $OUT"
cat "$OUT/steps.jsonl"
grep -E "^(FAILED|ERROR) " "$LOG" | cut -c1-200 | head -n 20
sed -n '/^===== summary/,$p' "$LOG" | tail -n +2  # the summary's table
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
[ "$n" -le 8 ] || echo "warning: $n files in $OUT (this check writes 7; others were there before)"
