"""The package on the platforms users have: no Unix-only module at import time (native Windows has no
``resource``, ``fcntl``, ``termios``, ``pwd`` or ``grp``), and the diffusers range pyproject.toml declares is the
one this suite runs against."""

from __future__ import annotations

import os
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: the backport the package requires there
    import tomli as tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")

# Every module of both packages is imported with the Unix-only modules made unimportable (``sys.modules[name] =
# None`` makes ``import name`` raise ImportError, as on Windows); ``__main__`` modules run the CLI, so they are left
# out. Then the one caller of ``resource`` (the CPU peak memory of a report) must still answer.
_SCRIPT = f"""
import importlib, pkgutil, sys
for name in {UNIX_ONLY!r}:
    sys.modules[name] = None
import swift_kernels, swift_model
failed = []
for pkg in (swift_model, swift_kernels):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append(f"{{info.name}}: {{exc}}")
import torch
from swift_model.generation.pipeline import _peak_memory
assert _peak_memory(torch.device("cpu")) == 0
print("\\n".join(failed) if failed else "ok")
"""


def test_imports_without_unix_only_modules():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout


def _requirement(name: str, requirements: list[str]) -> str:
    found = [r for r in requirements if r.split(";")[0].strip().startswith(name)]
    assert len(found) == 1, f"{name} must be required exactly once, got {found}"
    return found[0]


def test_diffusers_range_is_the_tested_one():
    """An upper bound on diffusers, and the installed (tested) version inside the range."""
    packaging = pytest.importorskip("packaging.requirements", reason="packaging is not installed")
    from importlib.metadata import version

    from packaging.version import Version

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    for requirements in (project["dependencies"], project["optional-dependencies"]["test"]):
        spec = packaging.Requirement(_requirement("diffusers", requirements)).specifier
        assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"diffusers has no upper bound: {spec}"
        assert Version(version("diffusers")) in spec, f"the installed diffusers {version('diffusers')} is outside {spec}"
