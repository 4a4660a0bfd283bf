"""Shared machinery of the benchmark suite (pytest-benchmark).

Run::

    pytest benchmarks/ --benchmark-only                      # CPU: small sizes, a smoke run of everything
    pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/<device>-<date>.json   # GPU: real sizes

Every benchmark records in ``extra_info`` what it measured (case, implementation, shapes, dtype, device,
versions, allowed pairs, FLOPs, effective TFLOP/s). Implementations are ``"ours"`` (our backends) or
``"rival"`` (PyTorch SDPA, FlexAttention, FlashAttention); rivals run in the same session, on the same
inputs. When the JSON is written, each of our benchmarks gets ``speedup_vs_<rival>`` (the rival's median
time over ours: above 1 means ours is faster) for every rival measured in the same run, and every
benchmark gets ``share_of_gemm_peak`` when the GEMM benchmark ran too. The same table is printed at the end
of the run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import pytest
import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover - depends on the install
        return None


def environment() -> dict:
    """Device and software versions, recorded with every result."""
    if ON_GPU:
        props = torch.cuda.get_device_properties(DEVICE)
        device_name = props.name
        capability = f"{props.major}.{props.minor}"
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        capability = None
    return {
        "device": str(DEVICE),
        "device_name": device_name,
        "compute_capability": capability,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def timed(benchmark, fn, *, rounds: int | None = None, warmup_rounds: int | None = None):
    """Time ``fn()`` with ``benchmark.pedantic``; each call ends with a device synchronization so that the
    time covers the GPU work, not only the launches. Returns ``fn``'s last result."""
    if rounds is None:
        rounds = 10 if ON_GPU else 5
    if warmup_rounds is None:
        warmup_rounds = 2 if ON_GPU else 1

    def target():
        result = fn()
        synchronize()
        return result

    synchronize()
    return benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


# ---------------------------------------------------------------------------------------------------
# Results of this session: ratios to the rivals, share of the GEMM peak.
# ---------------------------------------------------------------------------------------------------

_RESULTS: list[dict] = []


class Recorder:
    """Fills ``benchmark.extra_info`` after a timed run and remembers the result for the summary."""

    def __call__(self, benchmark, *, flops: float, **info) -> None:
        if benchmark.stats is None:  # --benchmark-disable: the target ran once, untimed
            return
        stats = benchmark.stats.stats
        median, best = float(stats.median), float(stats.min)
        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(info)
        benchmark.extra_info["flops"] = float(flops)
        benchmark.extra_info["tflops_median"] = flops / median / 1e12
        benchmark.extra_info["tflops_best"] = flops / best / 1e12
        _RESULTS.append(
            {
                "name": benchmark.name,
                "group": benchmark.group,
                "extra_info": benchmark.extra_info,
                "stats": {"median": median, "min": best},
            }
        )


@pytest.fixture
def record() -> Recorder:
    """``record(benchmark, flops=..., **info)``: fill ``extra_info`` after a timed run."""
    return Recorder()


@pytest.fixture
def timer():
    """:func:`timed`: ``timer(benchmark, fn)`` times ``fn`` with a device synchronization per call."""
    return timed


def add_comparisons(entries: list[dict]) -> None:
    """Add ``speedup_vs_<rival>`` to our entries and ``share_of_gemm_peak`` to all, in place.

    ``entries`` are dicts with ``group``, ``extra_info`` (``role``, ``impl``, ``tflops_median``) and
    ``stats`` (``median``); pytest-benchmark's JSON entries have this shape.
    """
    peak = None
    for e in entries:
        if e["extra_info"].get("role") == "gemm":
            peak = max(peak or 0.0, e["extra_info"]["tflops_median"])
    by_group: dict[str, list[dict]] = {}
    for e in entries:
        by_group.setdefault(e.get("group") or "", []).append(e)
    for group in by_group.values():
        rivals = [e for e in group if e["extra_info"].get("role") == "rival"]
        for e in group:
            info = e["extra_info"]
            if peak and "tflops_median" in info and info.get("role") != "gemm":
                info["share_of_gemm_peak"] = info["tflops_median"] / peak
            if info.get("role") != "ours":
                continue
            for r in rivals:
                info[f"speedup_vs_{r['extra_info']['impl']}"] = r["stats"]["median"] / e["stats"]["median"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    add_comparisons(output_json.get("benchmarks", []))
    output_json["swift_environment"] = environment()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["swift_environment"] = environment()


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    entries = [dict(e, extra_info=dict(e["extra_info"])) for e in _RESULTS]
    add_comparisons(entries)
    tr = terminalreporter
    tr.section("swift-i2v attention benchmarks (effective TFLOP/s, median; speedup = rival time / ours)")
    for e in entries:
        info = e["extra_info"]
        ratios = "  ".join(f"{k[len('speedup_vs_'):]}={v:.2f}x" for k, v in info.items() if k.startswith("speedup_vs_"))
        share = f"  {100 * info['share_of_gemm_peak']:.0f}% of GEMM" if "share_of_gemm_peak" in info else ""
        tr.write_line(
            f"{(e['group'] or ''):<28} {info.get('impl', ''):<8} {1e3 * e['stats']['median']:10.3f} ms "
            f"{info['tflops_median']:9.3f} TFLOP/s{share}  {ratios}"
        )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    # Full-size cases marked `gpu` would try to build 14B-parameter models on a CPU: skip them there.
    if ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------------------------------------------
# Results streamed as they come (SWIFT_BENCH_PARTIAL=<file.jsonl>): pytest-benchmark writes its JSON only at
# the end of a session, and not at all when the session is interrupted (a device call that runs out of time).
# With the variable set, every finished benchmark appends one JSON line (name, outcome, stats, extra_info), so
# a run cut short still returns what it measured.
# ---------------------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    path = os.environ.get("SWIFT_BENCH_PARTIAL")
    if not path or call.when != "call":
        return
    report = outcome.get_result()
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is None:
        return
    stats = None
    meta = getattr(bench, "stats", None)
    if meta is not None and getattr(meta.stats, "data", None):
        st = meta.stats
        stats = {k: float(getattr(st, k)) for k in ("min", "max", "mean", "median", "stddev")}
        stats["rounds"] = int(st.rounds)
    line = {
        "name": item.nodeid,
        "outcome": report.outcome,
        "duration_s": float(call.duration),
        "group": getattr(bench, "group", None),
        "stats": stats,
        "extra_info": dict(getattr(bench, "extra_info", {}) or {}),
    }
    if report.failed:
        line["error"] = str(report.longrepr)[-2000:]
    with open(path, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
