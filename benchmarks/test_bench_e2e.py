"""The end-to-end benchmark (``benchmarks/e2e.py``) as pytest-benchmark entries.

On a CPU: its dry run, eager only (the tiny models at 128x64x9; a smoke run of the plumbing). On a GPU: the whole
generation at 2560x1408x81 with the presets' architectures and random weights, ``--memory auto``, eager then
compiled. ``extra_info`` holds the benchmark's JSON (seconds and achieved TFLOP/s per phase beside the measured
bf16 GEMM ceiling, the plan's FLOPs and estimated peak, the measured peak); the timed figure is one whole run of
the benchmark (plan, ceiling, build, a cold and a timed run per variant), so the phases' figures in
``extra_info`` are the numbers to read.
"""

import pytest
import torch

import e2e


def _run(benchmark, argv):
    args = e2e.parse_args(argv)
    results = benchmark.pedantic(lambda: e2e.run(args), rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    return results


def test_e2e_tiny_cpu(benchmark):
    results = _run(benchmark, ["--dry-run", "--variants", "eager"])
    rec = results["variants"]["eager"]
    assert rec["status"] == "ok" and rec["latents_finite"], rec
    assert rec["rates"]["total"]["flops"] == results["plan"]["flops_total"]


@pytest.mark.gpu
def test_e2e_full_size_gpu(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (full-size presets)")
    results = _run(benchmark, [])
    assert results["variants"]["eager"]["status"] == "ok", results["variants"]["eager"]
    assert results["method_work"]["seconds_at_ceiling"] > 0
