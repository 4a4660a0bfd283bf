#!/usr/bin/env bash
# One call on a GPU machine: build the extension against the installed torch, run the GPU tests, run the
# benchmarks at real sizes, and write everything as JSON/text under $OUT (default: ./gpu-out).
#
#   bash benchmarks/run_gpu.sh                 # everything
#   SKIP_SANITIZER=1 bash benchmarks/run_gpu.sh
#   BENCH_FILTER="attention" bash benchmarks/run_gpu.sh   # only the benchmarks matching -k
#
# Copy the JSON it writes into benchmarks/results/ and commit it; README tables come from those files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
status=0

python - <<'PY' > "$OUT/environment.json"
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
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "capability": torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
                  "nvidia_smi": smi, "python": platform.python_version()}, indent=2))
PY
cat "$OUT/environment.json"

echo "== build"
start=$(date +%s)
pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; status=1; }
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/build.log"
python -c "import swift_kernels as s; print('extension available:', s.extension_available())" | tee -a "$OUT/build.log"

# Run from outside the source tree so the installed package (with its compiled extension) is tested.
cd "$OUT"
SRC="$OLDPWD"
echo "== GPU tests"
python -m pytest "$SRC/tests" -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
    > "$OUT/gpu-tests.log" 2>&1 || status=1
tail -30 "$OUT/gpu-tests.log"

if [ "${SKIP_SANITIZER:-0}" = "0" ] && command -v compute-sanitizer > /dev/null; then
    echo "== compute-sanitizer (memcheck, racecheck) on the CUDA extension tests"
    for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --print-limit 20 python -m pytest "$SRC/tests/test_cuda_extension.py" \
            -m gpu -q -x -p no:cacheprovider > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
        tail -5 "$OUT/sanitizer-$tool.log"
    done
fi

echo "== benchmarks"
python -m pytest "$SRC/benchmarks" --benchmark-only -q -p no:cacheprovider \
    ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
    --benchmark-json="$OUT/benchmarks.json" > "$OUT/benchmarks.log" 2>&1 || status=1
tail -40 "$OUT/benchmarks.log"
exit $status
