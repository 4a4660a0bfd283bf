"""The planned FLOPs against the method's work, and achieved rates (swift_model/planning/performance.py): the
arithmetic against fp64 on fresh random numbers, the README table rendered from random plans and read back, the
README's own table consistent with the method's work, and bad input refused with the argument named."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from swift_model.generation.memory import PHASES
from swift_model.planning import performance as perf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
README = os.path.join(ROOT, "README.md")


def _random_plan(rng: random.Random, profile: str) -> dict:
    """A `swift-i2v plan --json`-shaped plan with random FLOPs per phase (a few TFLOP to 20 PFLOP)."""
    phases = {p: dict(peak_bytes=rng.randrange(1, 2**36), flops=rng.randrange(10**12, 2 * 10**16),
                      h2d_bytes=rng.randrange(0, 2**35)) for p in PHASES}
    return dict(profile=profile, phases=phases, peak_bytes=max(v["peak_bytes"] for v in phases.values()),
                flops=sum(v["flops"] for v in phases.values()), world_size=1,
                parallel=dict(ulysses=1, cfg_parallel=False, fsdp=False))


def test_method_work_is_the_stated_count():
    """17.13 PFLOP in five items, each held by phases of the run; about 21.7 s at 790 TFLOP/s."""
    assert perf.method_work_flops() == pytest.approx(17.133e15, rel=1e-12)
    assert {item for item, _, _ in perf.METHOD_WORK} == {"Stage I DiT", "360P VAE", "2K VAE encode",
                                                         "Stage II windows", "2K VAE decode"}
    for _, phases, _ in perf.METHOD_WORK:
        assert set(phases) <= set(PHASES)
    assert perf.floor_seconds(perf.GEMM_RATE_ESTIMATE) == pytest.approx(21.69, abs=0.01)


def test_achieved_tflops_against_fp64():
    rng = random.Random()
    for _ in range(50):
        flops, seconds = rng.uniform(0, 1e18), rng.uniform(1e-3, 1e3)
        assert perf.achieved_tflops(flops, seconds) == pytest.approx(flops / seconds / 1e12, rel=1e-15)
    assert perf.achieved_tflops(0, 1.0) == 0.0
    for flops, seconds, match in [(1e12, 0.0, "seconds"), (1e12, -1.0, "seconds"), (-1.0, 1.0, "flops"),
                                  (float("nan"), 1.0, "flops"), (1e12, float("inf"), "seconds")]:
        with pytest.raises(ValueError, match=match):
            perf.achieved_tflops(flops, seconds)
    with pytest.raises(TypeError, match="seconds"):
        perf.achieved_tflops(1e12, "1")
    with pytest.raises(TypeError, match="flops"):
        perf.achieved_tflops(True, 1.0)


def test_phase_rates_per_phase_total_and_share_of_ceiling():
    rng = random.Random()
    flops = {p: rng.randrange(1, 10**16) for p in PHASES}
    seconds = {p: rng.uniform(0.01, 60.0) for p in PHASES}
    seconds["total"] = sum(seconds.values()) + rng.uniform(0, 1)  # host work between the phases
    ceiling = rng.uniform(100, 1000)
    rates = perf.phase_rates(flops, seconds, ceiling)
    assert list(rates) == [*PHASES, "total"]
    for p in PHASES:
        assert rates[p]["flops"] == flops[p] and rates[p]["seconds"] == seconds[p]
        assert rates[p]["tflops"] == pytest.approx(flops[p] / seconds[p] / 1e12, rel=1e-12)
        assert rates[p]["share_of_ceiling"] == pytest.approx(rates[p]["tflops"] / ceiling, rel=1e-12)
    total = rates["total"]
    assert total["flops"] == sum(flops.values()) and total["seconds"] == seconds["total"]
    assert total["tflops"] == pytest.approx(sum(flops.values()) / seconds["total"] / 1e12, rel=1e-12)
    # without a total the phases' seconds add up; a phase that took no time gets no rate; no ceiling, no share
    del seconds["total"]
    seconds["text_encoding"] = 0.0
    rates = perf.phase_rates(flops, seconds)
    assert rates["total"]["seconds"] == pytest.approx(sum(seconds.values()), rel=1e-12)
    assert "tflops" not in rates["text_encoding"] and all("share_of_ceiling" not in r for r in rates.values())
    # only the phases both mappings have
    rates = perf.phase_rates(flops, {"stage2": 2.0})
    assert list(rates) == ["stage2", "total"] and rates["total"]["flops"] == flops["stage2"]


def test_phase_rates_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown phases"):
        perf.phase_rates({"stage3": 1.0}, {"stage3": 1.0})
    with pytest.raises(ValueError, match="no phase has both"):
        perf.phase_rates({"stage1": 1.0}, {"stage2": 1.0})
    with pytest.raises(ValueError, match=r"seconds\['stage1'\]"):
        perf.phase_rates({"stage1": 1.0}, {"stage1": -2.0})
    with pytest.raises(ValueError, match="ceiling_tflops"):
        perf.phase_rates({"stage1": 1.0}, {"stage1": 1.0}, 0.0)


def _parse_table(table: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return head, rows


def _pflop(cell: str) -> float:
    return float(re.match(r"\**([0-9.]+)", cell).group(1))


def _ratio(cell: str) -> float:
    return float(re.search(r"\(([0-9.]+)x\)", cell).group(1))


def test_render_table_of_random_plans_reads_back():
    rng = random.Random()
    plans = {p: _random_plan(rng, p) for p in ("fast", "balanced", "24gb")}
    head, rows = _parse_table(perf.render_table(plans))
    assert head[2:] == ["`fast` planned, PFLOP", "`balanced` planned, PFLOP", "`24gb` planned, PFLOP"]
    groups = {"`text_encoding`": ("text_encoding",), "`stage1`": ("stage1",), "`bridge`": ("bridge",),
              "`stage1` + `bridge`": ("stage1", "bridge"), "`stage2`": ("stage2",), "`decode`": ("decode",),
              "**whole run**": PHASES}
    work = {"`stage1` + `bridge`": 2.886 + 0.247 + 1.034, "`stage2`": 7.563, "`decode`": 5.403,
            "**whole run**": 17.133}
    for label, names in groups.items():
        for i, p in enumerate(plans):
            planned = sum(plans[p]["phases"][n]["flops"] for n in names) / 1e15
            cell = rows[label][1 + i]
            assert _pflop(cell) == pytest.approx(planned, abs=5e-4), (label, p)
            if label in work:
                assert _ratio(cell) == pytest.approx(planned / work[label], abs=5e-3), (label, p)
                assert _pflop(rows[label][0]) == pytest.approx(work[label], abs=5e-4)
            else:
                assert "x)" not in cell
    seconds_row = [r for k, r in rows.items() if k.startswith("seconds at")][0]
    assert float(seconds_row[0]) == pytest.approx(17.133e15 / 790e12, abs=0.05)
    for i, p in enumerate(plans):
        assert float(seconds_row[1 + i]) == pytest.approx(plans[p]["flops"] / 790e12, abs=0.05)


def test_render_table_refuses_incomplete_plans():
    plan = _random_plan(random.Random(), "fast")
    del plan["phases"]["decode"]
    with pytest.raises(ValueError, match="decode"):
        perf.render_table({"fast": plan})
    with pytest.raises(ValueError, match="empty"):
        perf.render_table({})


def test_update_readme_writes_between_the_markers(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(f"# title\n\nbefore\n\n{perf.BEGIN}\nold table\n{perf.END}\n\nafter\n", encoding="utf-8")
    table = perf.render_table({"balanced": _random_plan(random.Random(), "balanced")})
    assert perf.update_readme(str(page), table) is True
    text = page.read_text(encoding="utf-8")
    assert "old table" not in text and text.startswith("# title\n\nbefore\n") and text.endswith("\n\nafter\n")
    assert perf.read_table(str(page)) == table
    assert perf.update_readme(str(page), table) is False  # unchanged the second time
    page.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="README.md: no performance-table markers"):
        perf.update_readme(str(page), table)


def test_command_reads_saved_plans_and_reports_errors(tmp_path, capsys):
    rng = random.Random()
    paths = []
    for p in ("fast", "balanced", "24gb"):
        paths.append(str(tmp_path / f"{p}.json"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            json.dump(_random_plan(rng, p), f)
    assert perf.main(["--plans", *paths]) == 0
    assert capsys.readouterr().out.strip() == perf.render_table(perf.load_plans(paths))
    bad = tmp_path / "bad.json"
    bad.write_text("{\"phases\": 1}", encoding="utf-8")
    assert perf.main(["--plans", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.json" in err and err.count("\n") == 1


def test_readme_performance_table_is_consistent():
    """The README's table (refreshed by the command whenever the plan changes, so its planned figures are not
    pinned here) has every profile, its whole-run cells add up its phases, and its work column and seconds row
    are the method's work."""
    head, rows = _parse_table(perf.read_table(README))
    assert [h.split("`")[1] for h in head[2:]] == ["fast", "balanced", "24gb"]
    for i in range(1, 4):
        phases = sum(_pflop(rows[f"`{p}`"][i]) for p in PHASES)
        assert _pflop(rows["**whole run**"][i]) == pytest.approx(phases, abs=3e-3)
        assert _pflop(rows["`stage1` + `bridge`"][i]) == pytest.approx(
            _pflop(rows["`stage1`"][i]) + _pflop(rows["`bridge`"][i]), abs=2e-3)
        seconds = [r for k, r in rows.items() if k.startswith("seconds at")][0]
        assert float(seconds[i]) == pytest.approx(_pflop(rows["**whole run**"][i]) * 1e3 / 790, abs=0.06)
    assert _pflop(rows["**whole run**"][0]) == pytest.approx(perf.method_work_flops() / 1e15, abs=5e-4)
