"""The end-to-end benchmark (benchmarks/e2e.py): its parts on small CPU sizes in the fast suite (the GEMM ceiling,
the random storage of the models, the gates of the compiled variant, the command line's errors), and its whole
dry run (the tiny models on the CPU, eager and compiled) in the slow suite, its JSON checked field by field and
its rates recomputed from the plan's FLOPs and the measured seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time

import pytest
import torch

from swift_model.generation.memory import PHASES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("swift_e2e", os.path.join(ROOT, "benchmarks", "e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_ceiling_on_the_cpu(e2e):
    rec = e2e.gemm_ceiling(torch.device("cpu"), 64, reps=3, warm=1)
    assert rec["n"] == 64 and rec["dtype"] == "float32" and rec["timer"] == "host clock" and rec["reps"] == 3
    assert rec["median_s"] > 0
    assert rec["tflops"] == pytest.approx(2 * 64**3 / rec["median_s"] / 1e12, rel=1e-12)


def test_random_storage_draws_every_tensor(e2e):
    """A meta module gets storage and the stated random values: matrices ~ N(0, 1/fan_in) (checked on the sample's
    standard deviation), norm weights 1, biases 0, integer buffers the positions, float buffers 0."""
    with torch.device("meta"):
        mod = torch.nn.Module()
        mod.proj = torch.nn.Linear(256, 512)
        mod.conv = torch.nn.Conv3d(8, 16, 3)
        mod.norm = torch.nn.LayerNorm(512)
        mod.gamma = torch.nn.Parameter(torch.empty(16, 1, 1, 1))  # the Wan VAE's RMS norm scale
        mod.register_buffer("position_ids", torch.zeros(1, 33, dtype=torch.long))
        mod.register_buffer("scale", torch.ones(7))
    out = e2e.random_storage(torch.device("cpu"))(mod, torch.float64)
    assert out is mod and not any(p.requires_grad for p in mod.parameters()) and not mod.training
    assert mod.proj.weight.dtype == torch.float64 and mod.position_ids.dtype == torch.long
    for weight, fan_in in ((mod.proj.weight, 256), (mod.conv.weight, 8 * 27)):
        assert weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)
        assert abs(weight.mean().item()) < 4 * fan_in**-0.5 / math.sqrt(weight.numel())
    assert torch.equal(mod.norm.weight, torch.ones(512, dtype=torch.float64))
    assert torch.equal(mod.gamma, torch.ones(16, 1, 1, 1, dtype=torch.float64))
    for bias in (mod.proj.bias, mod.conv.bias, mod.norm.bias):
        assert torch.equal(bias, torch.zeros_like(bias))
    assert torch.equal(mod.position_ids, torch.arange(33).unsqueeze(0))
    assert torch.equal(mod.scale, torch.zeros(7, dtype=torch.float64))


def test_command_line(e2e, capsys):
    args = e2e.parse_args(["--dry-run", "--variants", "compiled,eager"])
    assert args.variants == ["eager", "compiled"]  # eager first: compiling changes the shared models
    assert (args.frames, args.width, args.height, args.gemm_n) == (9, 128, 64, 256)
    args = e2e.parse_args([])
    assert (args.frames, args.width, args.height, args.gemm_n, args.memory) == (81, 2560, 1408, 8192, "auto")
    for bad in (["--variants", "eager,fused"], ["--variants", ""], ["--gemm-n", "8"], ["--memory", "huge"]):
        with pytest.raises(SystemExit):
            e2e.parse_args(bad)
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert e2e.main([]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no CUDA GPU") and err.count("\n") == 1


def test_compiled_variant_gate(e2e, monkeypatch):
    """The compiled variant runs where the pipeline takes compile= and the time limit holds two runs and the
    compilation; otherwise it is skipped with the reason."""
    args = e2e.parse_args(["--dry-run"])
    assert e2e._variant_gate("eager", args, e2e.Clock(None), None) is None
    eager = dict(status="ok", first_run_s=5.0)
    assert e2e._variant_gate("compiled", args, e2e.Clock(1e6), eager) is None
    reason = e2e._variant_gate("compiled", args, e2e.Clock(5.0), eager)
    assert reason.startswith("not enough time left (~30 s needed")
    monkeypatch.setenv("DEADLINE", str(time.time() + 3.0))  # the check's step deadline
    assert e2e.Clock(None).left() <= 3.0
    assert e2e._variant_gate("compiled", args, e2e.Clock(None), eager).startswith("not enough time left")
    monkeypatch.setattr(e2e, "compile_unsupported_reason", lambda: "no compile here")
    assert e2e._variant_gate("compiled", args, e2e.Clock(1e6), eager) == "no compile here"


def test_memory_auto_takes_fast_where_its_estimate_fits(e2e, monkeypatch):
    """``--memory auto``: fast where the plan's estimated peak is within FAST_SHARE of the device, else balanced;
    a profile asked for is planned as is."""
    peaks = {"fast": 60 * 2**30, "balanced": 34 * 2**30, "24gb": 6 * 2**30}
    planned = []

    def plan_of(spec, request, memory, device, dtype, vae_dtype):
        planned.append(memory)
        return dict(profile=memory, peak_bytes_estimate=peaks[memory])

    monkeypatch.setattr(e2e, "plan_of", plan_of)
    choose = lambda memory, device_bytes: e2e.choose_plan(None, None, memory, None, None, None, device_bytes)  # noqa
    plan, why = choose("auto", 80 * 10**9)  # an H100: 74.5 GiB, 85% of it 63.3
    assert plan["profile"] == "fast" and why.startswith("auto: fast's estimated peak 60.0 GiB is within 85%")
    plan, why = choose("auto", 64 * 2**30)
    assert plan["profile"] == "balanced" and "over 85% of the device's 64.0 GiB" in why
    assert planned == ["fast", "fast", "balanced"]
    plan, why = choose("24gb", 80 * 10**9)
    assert plan["profile"] == "24gb" and why == "asked for"
    assert choose("auto", None)[0]["profile"] == "fast"


def test_phase_seconds_names_the_phases(e2e):
    from swift_model.generation.pipeline import SECONDS_KEYS

    seconds = {key: float(i + 1) for i, key in enumerate(SECONDS_KEYS.values())}
    seconds.update(total=99.0, compile=3.0)
    named = e2e.phase_seconds(seconds)
    assert set(named) == {*PHASES, "total", "compile"}
    assert [named[p] for p in PHASES] == [float(i + 1) for i in range(len(PHASES))]


def _check_results(results: dict, variants: tuple[str, ...]) -> None:
    """Every field of a dry run's JSON, and every rate recomputed from the plan and the seconds."""
    assert results["kind"] == "swift-i2v e2e benchmark" and results["dry_run"] is True and results["schema"] == 1
    assert results["device"]["type"] == "cpu" and results["versions"]["torch"] == torch.__version__
    s = results["settings"]
    assert (s["frames"], s["width"], s["height"], s["steps"], s["memory"]) == (9, 128, 64, 4, "fast")
    assert s["memory_choice"] == "auto: fast (no device memory to fit)"
    assert s["weights"] == "random" and s["text_encoder"] is None and s["stage1"] == "tiny-i2v"
    plan = results["plan"]
    assert plan["profile"] == "fast" and set(plan["flops"]) == set(PHASES)
    assert all(f > 0 for p, f in plan["flops"].items() if p != "text_encoding")
    assert plan["flops_total"] == sum(plan["flops"].values()) and plan["peak_bytes_estimate"] > 0
    gemm = results["gemm"]
    assert gemm["tflops"] == pytest.approx(2 * gemm["n"] ** 3 / gemm["median_s"] / 1e12, rel=1e-12)
    assert "not_compared" in results["method_work"]  # a dry run is not at the size the work is counted at
    assert results["method_work"]["items_pflop"]["2K VAE decode"] == 5.403
    assert set(results["variants"]) == set(variants)
    for name, rec in results["variants"].items():
        if rec["status"] == "skipped":
            assert name == "compiled" and rec["reason"], rec
            continue
        assert rec["status"] == "ok", (name, rec)
        assert rec["latents_finite"] and rec["frames_shape"] == [9, 64, 128, 3]
        assert rec["first_run_s"] > 0 and rec["timed"] is True
        assert (rec["compile"] is None) == (name == "eager")
        rates = rec["rates"]
        assert list(rates) == [*PHASES, "total"]
        for p in PHASES:
            assert rates[p]["flops"] == plan["flops"][p] and rates[p]["seconds"] == rec["seconds"][p] > 0
            assert rates[p]["tflops"] == pytest.approx(plan["flops"][p] / rec["seconds"][p] / 1e12, rel=1e-12)
            assert rates[p]["share_of_ceiling"] == pytest.approx(rates[p]["tflops"] / gemm["tflops"], rel=1e-12)
        assert rates["total"]["seconds"] == rec["seconds"]["total"] >= max(rec["seconds"][p] for p in PHASES)
        assert rates["total"]["flops"] == plan["flops_total"]


@pytest.mark.slow
def test_dry_run_eager_and_compiled(e2e, tmp_path, capsys):
    """The whole benchmark on the tiny models on the CPU (compiled with inductor where the pipeline takes
    compile=), through its command line: the JSON written to --out is the one printed last."""
    out = tmp_path / "e2e.json"
    assert e2e.main(["--dry-run", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads(out.read_text(encoding="utf-8"))
    assert printed == results
    _check_results(results, ("eager", "compiled"))
    if e2e.compile_unsupported_reason() is None:
        rec = results["variants"]["compiled"]
        assert rec["status"] == "ok" and rec["first_run_compile"]["graphs"] > 0
        assert rec["compile"]["graphs"] == 0  # the timed run compiles nothing
