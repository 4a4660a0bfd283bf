"""The verified-kernel table: loader, updater from a GPU check's results, README table generated from it."""

from __future__ import annotations

import json
import os

import pytest

from swift_kernels import verified

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _results(**over):
    passed = {"passed": True, "cases": [{"name": "window bf16 fwd", "passed": True}]}
    failed = {"passed": False, "cases": [{"name": "clip fp16 bwd", "passed": False}]}
    data = {
        "kind": "swift-i2v gpu check", "dry_run": False, "date": "2026-03-04T10:00:00Z",
        "device": {"name": "NVIDIA H200", "cc": "9.0"},
        "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "python": "3.12.3"},
        "checks": {
            "frame_block_attention/cuda": passed,
            "frame_block_attention/triton": failed,
            "frame_block_attention/flex": passed,  # PyTorch's: needs no row
            "flow_step/triton": passed,
            "adaln_modulate/triton": {"passed": True, "cases": []},  # nothing checked: verifies nothing
        },
    }
    data.update(over)
    return data


def test_package_table_starts_empty_and_loads():
    """Nothing has run on a GPU yet: the committed table has no rows, and nothing is verified."""
    assert verified.read_table() == ()
    assert not verified.is_verified("frame_block_attention", "cuda", (9, 0), "2.11.0")


def test_rows_from_results():
    rows = verified.rows_from_results(_results(), "benchmarks/results/h200.json")
    assert {(r.op, r.backend) for r in rows} == {("frame_block_attention", "cuda"), ("flow_step", "triton")}
    assert all((r.cc, r.torch, r.date, r.results) == ("9.0", "2.11", "2026-03-04", "benchmarks/results/h200.json")
               for r in rows)
    with pytest.raises(ValueError, match="dry run"):
        verified.rows_from_results(_results(dry_run=True), "x.json")
    with pytest.raises(ValueError, match="cc"):
        verified.rows_from_results(_results(device={"name": "cpu"}), "x.json")
    with pytest.raises(ValueError, match="gpu_check"):
        verified.rows_from_results({"checks": {}}, "x.json")


def test_update_round_trip_and_cli(tmp_path, capsys):
    table = tmp_path / "table.json"
    verified.write_table([], table)
    res = tmp_path / "h200.json"
    res.write_text(json.dumps(_results()))
    assert verified.main(["update", str(res), "--table", str(table)]) == 0
    rows = verified.read_table(table)
    assert len(rows) == 2 and "verified: frame_block_attention / cuda on 9.0" in capsys.readouterr().out
    # a later run replaces the rows of the same key
    res2 = tmp_path / "h200-later.json"
    res2.write_text(json.dumps(_results(date="2026-05-06")))
    verified.update(str(res2), str(table))
    rows = verified.read_table(table)
    assert len(rows) == 2 and {r.date for r in rows} == {"2026-05-06"}
    text = verified.render_table(rows)
    assert "verified on compute capability 9.0 with torch 2.11 (2026-05-06" in text
    assert verified.main(["update", str(tmp_path / "missing.json"), "--table", str(table)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "rows": [{"op": "nope", "backend": "x", "cc": "9.0", "torch": "2.11",
                                                     "date": "d", "results": "r"}]}))
    with pytest.raises(ValueError, match="unknown kernel"):
        verified.read_table(bad)


def test_readme_table_is_generated_from_the_verified_table():
    """README.md's "What has run where" table is exactly `python -m swift_kernels.verified readme README.md`'s."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = verified.readme_section(f.read())
    assert section == verified.render_table(), "run: python -m swift_kernels.verified readme README.md"
    assert "**untested**" in section
