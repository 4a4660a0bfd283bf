"""On a GPU machine, the interpreter tests run here, in a child process that sees no GPU (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import interpreter_broken_reason


def test_interpreter_tests_in_a_subprocess(request):
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: the interpreter tests run in this process")
    reason = interpreter_broken_reason()
    if reason:
        pytest.skip(reason)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", SWIFT_TESTS_INTERPRETER_ONLY="1")
    env["PYTHONPATH"] = os.path.dirname(here) + os.pathsep + env.get("PYTHONPATH", "")
    # the child selects the markers this run selects (its own default would be the fast suite only)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here, "-k", "not compile_for_sm90",
         "-m", request.config.option.markexpr],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
