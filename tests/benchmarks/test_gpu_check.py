"""The repository's GPU check (benchmarks/gpu_check.sh) dry-runs on a CPU: every step, tiny sizes, under a minute
(marked slow); the fast suite runs its correctness steps and summary in this process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
    for name in ("env", "c-torch", "mem", "c-triton", "c-ops", "summary"):
        assert steps[name].get("rc") == 0, (name, steps[name], log)
    assert steps["multi"]["skipped"] == "fewer than two GPUs"
    memory = [c for c in _jsonl(tmp_path / "checks.jsonl") if c["op"] == "memory"]
    assert [c["case"] for c in memory] == ["run", "run", "latents bitwise 24gb vs balanced"], memory
    assert all(c["passed"] for c in memory), memory
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
    if steps["e2e"].get("rc") == 0:  # the last step: on a loaded machine the budget skips it
        assert [b["status"] for b in results["bench"] if b.get("kind") == "e2e"] == ["ok"]
    # a dry run verifies nothing
    with pytest.raises(ValueError, match="dry run"):
        verified.rows_from_results(results, "dry.json")
    assert elapsed < 120, f"the dry run took {elapsed:.0f} s (its budget is 58 s)"


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- the budget: the end-to-end step comes after the correctness and memory steps, within the budget ---------------

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
BUDGET_S, RESERVE_S = 510, 15  # gpu_check.sh's defaults on a GPU


def _header_rows() -> dict[str, tuple[int, int]]:
    """``name -> (limit, estimate)`` of every row of gpu_check.sh's step table (a row may span several comment
    lines; its last ``LIMIT ~ESTIMATE`` pair is the row's)."""
    with open(SCRIPT, encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("# Steps, most valuable first"):text.index("set -uo pipefail")]
    rows, name = {}, None
    for line in table.splitlines():
        m = re.match(r"^#   (\S+)\s", line)
        if m:
            name = m.group(1)
        pair = re.search(r"\s(\d+)\s+~(\d+)\s*$", line)
        if name and pair:
            rows[name] = (int(pair.group(1)), int(pair.group(2)))
    return rows


def test_gpu_check_runs_the_memory_step_first_and_within_the_budget():
    """What matters first runs first: the build, PyTorch's kernels the automatic choice takes, then the memory step,
    before any of our kernels' checks and any benchmark; and the steps' estimates up to the memory step fit the
    GPU budget (less the summary's reserve), so it always starts. Every step the script runs has a header row whose
    limit is the script's."""
    names = [n for n, _ in _steps_in_script()]
    assert names.index("c-torch") < names.index("mem") < names.index("multi")
    after = [n for n in names if n.startswith(("c-cuda", "c-sm90", "c-triton", "c-ops", "b-", "t-", "vae", "e2e"))]
    assert after and all(names.index("mem") < names.index(n) for n in after), names
    rows = _header_rows()
    limits = dict(_steps_in_script())
    for name, limit in limits.items():
        base = "ext" if name.startswith("ext") else name
        if base == "ext":
            continue  # ext-carried / ext-build / ext-check: one "ext" row (its limit is the build's)
        assert rows.get(name, (None,))[0] == limit, (name, rows.get(name), limit)
    before_mem = ["env", "ext"] + names[names.index("env") + 1:names.index("mem") + 1]
    before_mem = list(dict.fromkeys(n for n in before_mem if not n.startswith("ext-")))
    spent = sum(rows[n][1] for n in before_mem)
    assert spent <= BUDGET_S - RESERVE_S, (before_mem, spent)
    assert rows["ext"][0] == max(limits[n] for n in limits if n.startswith("ext"))


def _steps_in_script() -> list[tuple[str, int]]:
    """``(name, limit)`` of every ``step NAME LIMIT ...`` call of gpu_check.sh, in the order it runs them."""
    with open(SCRIPT, encoding="utf-8") as f:
        return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^\s*(?:if .*?then\s+)?step (\S+) (\d+) ", f.read(),
                                                                   re.M)]


def test_gpu_check_runs_e2e_after_the_correctness_and_memory_steps():
    """The order and limits of the steps, in the script, its header and the README's table: ``e2e`` follows every
    correctness, speed and memory step and precedes the summary; its limit is stated alike everywhere."""
    steps = _steps_in_script()
    names = [n for n, _ in steps]
    assert names[-2:] == ["e2e", "summary"], names
    for earlier in ("env", "c-cuda", "c-sm90", "c-triton", "c-ops", "c-torch", "mem", "b-fwd", "b-ops", "b-bwd",
                    "t-gpu", "vae", "t-mem"):
        assert names.index(earlier) < names.index("e2e"), earlier
    limits = dict(steps)
    with open(SCRIPT, encoding="utf-8") as f:
        header = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#   (\S+)\s.*?\s(\d+)\s+(?:~|0-|untimed)",
                                                                  f.read(), re.M)}
    for name in ("c-sm90", "c-triton", "c-ops", "b-ops", "b-bwd", "t-gpu", "vae", "t-mem", "e2e"):  # one-line rows
        assert header.get(name) == limits[name], (name, header.get(name), limits[name])
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        row = [ln for ln in f if ln.startswith("| `e2e` |")]
    assert len(row) == 1 and f"| {limits['e2e']} s |" in row[0]


def _stub_run(tmp_path, budget: int, sleep: float) -> tuple[dict, list[str], float]:
    """gpu_check.sh --dry-run with a stand-in Python that records its arguments and sleeps ``sleep`` seconds per
    step: the script's own budgeting, without the steps' work."""
    tmp_path.mkdir()
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\necho \"$*\" >> \"$STUB_LOG\"\nsleep \"$STUB_SLEEP\"\n", encoding="utf-8")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(stub), BUDGET_S=str(budget), STUB_SLEEP=str(sleep),
               STUB_LOG=str(tmp_path / "calls.log"))
    t0 = time.time()
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "steps.jsonl", encoding="utf-8") as f:
        steps = {s["step"]: s for s in map(json.loads, f)}
    with open(tmp_path / "calls.log", encoding="utf-8") as f:
        calls = f.read().splitlines()
    return steps, calls, elapsed


@pytest.mark.distributed
def test_gpu_check_budget_runs_e2e_when_time_is_left_and_skips_it_when_not(tmp_path):
    """With time to spare every dry-run step runs, e2e among them and before the summary; with a budget the steps
    exhaust first, e2e is skipped for the budget (never started late), the summary still runs, and the whole
    check ends within its budget."""
    steps, calls, _ = _stub_run(tmp_path / "roomy", budget=58, sleep=0)
    assert steps["e2e"]["rc"] == 0 and steps["summary"]["rc"] == 0
    ran = [c.split()[1] for c in calls if c.startswith("benchmarks/gpu_check.py")]
    assert ran[-2:] == ["e2e", "summary"] and ran[0] == "env", ran

    steps, calls, elapsed = _stub_run(tmp_path / "tight", budget=14, sleep=1.5)
    assert steps["e2e"] == {"step": "e2e", "skipped": "budget"}
    assert steps["summary"]["rc"] == 0 and not any(c.split()[1:2] == ["e2e"] for c in calls)
    assert elapsed < 14 + 5, elapsed


@pytest.mark.slow
def test_gpu_check_e2e_step_in_process(tmp_path, monkeypatch, capsys):
    """The e2e step of benchmarks/gpu_check.py at the dry run's sizes (the tiny models, eager): one bench.jsonl line
    with its rates, read back by the summary."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("DRY", "1")
    monkeypatch.setenv("DEADLINE", str(time.time() + 600))
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["e2e"]) == 0
    results = check.summary()
    (line,) = [b for b in results["bench"] if b.get("kind") == "e2e"]
    assert line["variant"] == "eager" and line["status"] == "ok", line
    assert line["rates"]["total"]["flops"] == sum(line["plan_flops"].values())
    assert line["settings"]["frames"] == 9 and line["gemm_tflops"] > 0
    assert "e2e eager text_encoding" in capsys.readouterr().out
