"""The repository's GPU check (benchmarks/gpu_check.sh) dry-runs on a CPU: every step, tiny sizes, under a minute
(marked slow); the fast suite runs its correctness steps and summary in this process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from swift_kernels import verified

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = {"env.json", "steps.jsonl", "run.log", "checks.jsonl", "bench.jsonl", "kernels.jsonl", "results.json"}


@pytest.mark.interpreter
def test_gpu_check_steps_in_process(tmp_path, monkeypatch):
    """The steps of benchmarks/gpu_check.py at the dry run's sizes, called here (no script, no step limits): env,
    the Triton ops and SDPA attention against their references, and the summary that folds them into
    results.json."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("DRY", "1")
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for step in (["env"], ["ops"], ["attention", "sdpa"]):
        assert check.main(step) == 0
    results = check.summary()
    assert results["kind"] == "swift-i2v gpu check" and results["dry_run"] is True
    assert set(results["checks"]) == {"frame_block_attention/sdpa", "flow_step/triton", "adaln_modulate/triton",
                                      "gated_residual/triton", "qk_norm_rope/triton"}
    for key, entry in results["checks"].items():
        assert entry["passed"] and entry["cases"], (key, entry)
    assert json.loads((tmp_path / "results.json").read_text())["checks"] == results["checks"]
    with pytest.raises(ValueError, match="dry run"):
        verified.rows_from_results(results, "dry.json")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    from conftest import interpreter_broken_reason

    if interpreter_broken_reason():
        pytest.skip(interpreter_broken_reason())  # the dry run runs Triton in its interpreter
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    for var in ("SWIFT_KERNELS_BACKEND", "SWIFT_KERNELS_UNVERIFIED", "BUDGET_S"):
        env.pop(var, None)
    t0 = time.time()
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    elapsed = time.time() - t0
    log = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    assert set(os.listdir(tmp_path)) == FILES and len(FILES) <= 8
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["kind"] == "swift-i2v gpu check" and results["dry_run"] is True
    with open(tmp_path / "steps.jsonl", encoding="utf-8") as f:
        steps = {s["step"]: s for s in map(json.loads, f)}  # results.json has every step but the summary itself
    # the correctness steps come first and always run; later ones may be cut by the budget on a loaded machine
    for name in ("env", "c-triton", "c-ops", "c-torch", "summary"):
        assert steps[name].get("rc") == 0, (name, steps[name], log)
    assert steps["ext"]["skipped"] and steps["c-cuda"]["skipped"] and steps["t-gpu"]["skipped"]
    for key in ("frame_block_attention/triton", "frame_block_attention/sdpa", "frame_block_attention/flex",
                "flow_step/triton", "adaln_modulate/triton", "gated_residual/triton", "qk_norm_rope/triton"):
        assert results["checks"][key]["passed"], (key, results["checks"][key])
    # a later step may be cut by the 58 s budget on a loaded machine (killed by its timeout at the budget's end:
    # rc 124/137); any other non-zero status is a failure
    ran = [s for s in steps.values() if "rc" in s]
    assert all(s["rc"] == 0 or (s["rc"] in (124, 137) and s["end_at"] >= 58 - 5 - 10) for s in ran), ran
    if steps["b-fwd"].get("rc") == 0:
        assert any(b.get("kind") == "gemm" for b in results["bench"])
    # a dry run verifies nothing
    with pytest.raises(ValueError, match="dry run"):
        verified.rows_from_results(results, "dry.json")
    assert elapsed < 120, f"the dry run took {elapsed:.0f} s (its budget is 58 s)"
