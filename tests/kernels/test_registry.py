"""The registry of attention backends (swift_kernels/_registry.py): every backend is one record, and the dispatch
reads only the records.

Checked here: each registered record has its fields and agrees with the verified table's kernels; ``BACKENDS`` and
the attention family are the registry's; an explicit request of each backend on a CPU runs or raises what its
record says; a backend registered by a test (removed afterwards) is chosen when asked for, reaches its forward
and backward, takes part in the automatic choice by its flags, and its variants, missing backward and limits are
honoured; importing the package loads no backend module.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

from swift_kernels import BackendUnavailableError, _backend, _registry, flow_step, frame_block_attention, verified
from swift_kernels._registry import AttentionBackend
from swift_kernels.attention import api, reference
from swift_kernels.attention.plan import AttentionPlan
from swift_kernels.attention.torch_backends import reference_backward, reference_forward

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
BUILT_IN = ("torch", "triton", "cuda", "sdpa", "flex")
MASK = torch.tensor([[True, False], [True, True]])
BLOCK_TOKENS = 8


def _qkv(head_dim=16, dtype=torch.float32, batch=1, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 2 * BLOCK_TOKENS, 2, head_dim)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def _truth(q, k, v):
    return reference.forward(q, k, v, MASK, BLOCK_TOKENS, q.shape[-1] ** -0.5)[0]


# ---------------------------------------------------------------------------------------------------------
# The built-in records


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_record_has_its_fields(name):
    record = _registry.get(name)
    assert isinstance(record, AttentionBackend) and record.name == name
    assert callable(record.unavailable) and callable(record.unsupported) and callable(record.forward)
    assert callable(record.backward_missing)
    assert record.differentiable or callable(record.backward)
    assert isinstance(record.custom, bool) and isinstance(record.rank, int)
    assert isinstance(record.dense_first, bool) and isinstance(record.gpu_fallback, bool)
    assert record.variant is None or callable(record.variant)
    for variant, forward in record.variants.items():
        assert variant.startswith(name + "-") and callable(forward) and _registry.get(variant) is record
    if record.custom:  # our GPU kernels: the automatic choice needs the verified table, which must know them
        for kernel in (name, *record.variants):
            assert ("frame_block_attention", kernel) in verified.KERNELS


def test_backends_are_the_registry():
    assert _registry.names() == BUILT_IN
    assert _backend.BACKENDS == _registry.names()
    assert _backend.ATTENTION.backends == _registry.names()
    assert _backend.ATTENTION.custom == ("cuda", "triton")  # the extension first, then Triton
    assert _backend.ATTENTION.gpu_fallback == "flex"
    assert _registry.dense_first() == "sdpa"
    assert [r.name for r in _registry.records() if r.differentiable] == ["sdpa", "flex"]
    assert _registry.get("cuda-sm90") is _registry.get("cuda")
    with pytest.raises(KeyError):
        _registry.get("cuda-sm80")


@pytest.mark.parametrize("head_dim,dtype", [(16, torch.float32), (6, torch.float64)])
@pytest.mark.parametrize("name", BUILT_IN)
def test_explicit_request_on_cpu_runs_or_raises(name, head_dim, dtype):
    """backend=<name> on CPU tensors runs (and matches the reference, gradients too) or raises what the record
    says: BackendUnavailableError with its reason, or the error type of its input limit."""
    q, k, v = _qkv(head_dim, dtype, requires_grad=True)
    record = _registry.get(name)
    reason = record.unavailable(CPU)
    limit = record.unsupported(head_dim, dtype, CPU)
    if reason is not None:
        with pytest.raises(BackendUnavailableError, match=re.escape(f"backend {name!r} is unavailable: {reason}")):
            frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend=name)
        outcome = BackendUnavailableError
    elif limit is not None:
        with pytest.raises(limit[0], match=re.escape(f"backend {name!r} does not support {limit[1]}")):
            frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend=name)
        outcome = limit[0]
    else:
        with torch.no_grad():
            out = frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend=name)
            torch.testing.assert_close(out, _truth(q, k, v), rtol=1e-4, atol=1e-4)
        if name != "flex":  # FlexAttention has no backward on a CPU (PyTorch's own limit)
            out = frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend=name)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            want = frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="torch")
            for got, expect in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
                torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
        outcome = "runs"
    # What that is on a CPU: PyTorch's backends run anything; the extension needs a GPU; Triton needs the
    # interpreter and a power-of-two head_dim, and takes no fp64.
    triton = "runs" if head_dim == 16 else ValueError
    expected = {"torch": "runs", "sdpa": "runs", "flex": "runs", "cuda": BackendUnavailableError,
                "triton": triton if _backend.triton_interpreting() else BackendUnavailableError}
    assert outcome == expected[name]


def test_cuda_record_reports_a_build_without_backward(monkeypatch):
    from swift_kernels.attention import cuda_backend

    monkeypatch.setattr(cuda_backend, "extension", lambda: types.SimpleNamespace(HAS_BACKWARD=False))
    assert "no backward kernels" in _registry.get("cuda").backward_missing()
    monkeypatch.setattr(cuda_backend, "extension", lambda: types.SimpleNamespace(HAS_BACKWARD=True))
    assert _registry.get("cuda").backward_missing() is None


def test_records_check_their_shape():
    with pytest.raises(ValueError, match="without '-'"):
        AttentionBackend("a-b", forward=reference_forward, backward=reference_backward)
    with pytest.raises(ValueError, match="needs a backward"):
        AttentionBackend("nobackward", forward=reference_forward)
    with pytest.raises(ValueError, match="variant"):
        AttentionBackend("x", forward=reference_forward, backward=reference_backward,
                         variants={"y-1": reference_forward})
    with pytest.raises(ValueError, match="registered already"):
        _registry.register("torch", AttentionBackend("torch", forward=reference_forward, backward=reference_backward))
    with pytest.raises(ValueError, match="named"):
        _registry.register("other", AttentionBackend("x", forward=reference_forward, backward=reference_backward))
    assert "other" not in _registry.names()


def test_importing_the_package_loads_no_backend():
    """The registry names its backends without importing them; reading every record imports neither the Triton
    kernels nor the extension (torch itself may import triton)."""
    code = """
import sys
import torch
import swift_kernels
from swift_kernels import _backend, _registry
lazy = ("swift_kernels.attention.triton_backend", "swift_kernels.attention.cuda_backend",
        "swift_kernels.attention.torch_backends", "swift_kernels.attention.triton_kernels", "swift_kernels._C")
assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]
assert _backend.BACKENDS == ("torch", "triton", "cuda", "sdpa", "flex")
_backend.backend_unavailable_reason("triton", torch.device("cpu"))
_registry.records()
assert "swift_kernels.attention.triton_kernels" not in sys.modules
assert "swift_kernels._C" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# A backend registered by a test


@pytest.fixture
def register():
    """Registers records for one test (``register(record)``) and removes them afterwards; returns the calls their
    forwards and backwards log (see :func:`_logged`)."""
    added = []

    def register_(record):
        _registry.register(record.name, record)
        added.append(record.name)
        return record

    yield register_
    for name in added:
        _registry.unregister(name)
        _backend._warned.discard(f"fba-no-{name}-backward")


def _logged(calls, tag):
    """The reference's forward and backward, logging ``(tag, "forward"/"backward")`` into ``calls``."""

    def forward(q, k, v, t, scale):
        calls.append((tag, "forward"))
        return reference_forward(q, k, v, t, scale)

    def backward(dout, q, k, v, out, lse, t, scale):
        calls.append((tag, "backward"))
        return reference_backward(dout, q, k, v, out, lse, t, scale)

    return forward, backward


def test_registered_backend_is_chosen_when_asked_for(register, monkeypatch):
    calls = []
    forward, backward = _logged(calls, "dummy")
    register(AttentionBackend("dummy", forward=forward, backward=backward))
    assert "dummy" in _backend.ATTENTION.backends
    q, k, v = _qkv(requires_grad=True)
    out = frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="dummy")
    assert calls == [("dummy", "forward")]
    torch.testing.assert_close(out, _truth(q, k, v))
    out.sum().backward()
    assert calls == [("dummy", "forward"), ("dummy", "backward")]
    monkeypatch.setenv(_backend.ENV_VAR, "dummy")  # the environment's request too
    frame_block_attention(q, k, v, MASK, BLOCK_TOKENS)
    assert calls[-1] == ("dummy", "forward")
    monkeypatch.delenv(_backend.ENV_VAR)
    calls.clear()
    frame_block_attention(q, k, v, MASK, BLOCK_TOKENS)  # the automatic choice on a CPU: the reference
    assert calls == []
    with pytest.raises(ValueError, match=re.escape("'flex', 'dummy') or None, got 'bogus'")):
        frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="bogus")
    with pytest.raises(BackendUnavailableError, match="flow_step has no 'dummy' implementation"):
        flow_step(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), 0.5, 0.25, mode="euler", backend="dummy")


def test_registered_backend_is_gone_afterwards():
    assert "dummy" not in _registry.names()
    with pytest.raises(ValueError, match="backend must be one of"):
        frame_block_attention(*_qkv(), MASK, BLOCK_TOKENS, backend="dummy")


def test_registered_limits_are_honoured(register):
    forward, backward = _logged([], "limited")
    register(AttentionBackend("offline", unavailable=lambda device: "it is switched off", forward=forward,
                              backward=backward))
    register(AttentionBackend(
        "limited", unsupported=lambda head_dim, dtype, device: (ValueError, "head_dim 16") if head_dim == 16 else None,
        forward=forward, backward=backward,
    ))
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match="frame_block_attention: backend 'offline' is unavailable: "
                                                      "it is switched off"):
        frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="offline")
    with pytest.raises(ValueError, match="frame_block_attention: backend 'limited' does not support head_dim 16"):
        frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="limited")
    assert _backend.backend_unavailable_reason("offline", CPU) == "it is switched off"


def test_empty_batch_goes_to_the_reference_unless_differentiable(register):
    calls = []
    forward, backward = _logged(calls, "kernel")
    register(AttentionBackend("kernel", forward=forward, backward=backward))

    def own_op(q, k, v, plan, scale):
        assert isinstance(plan, AttentionPlan)
        calls.append(("own", "forward"))
        return q * scale

    register(AttentionBackend("own", forward=own_op, differentiable=True))
    q, k, v = _qkv()
    frame_block_attention(q[:0], k[:0], v[:0], MASK, BLOCK_TOKENS, backend="kernel")
    assert calls == []  # nothing to launch: the reference ran
    assert torch.equal(frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="own"), q * 16**-0.5)
    frame_block_attention(q[:0], k[:0], v[:0], MASK, BLOCK_TOKENS, backend="own")
    assert calls == [("own", "forward")] * 2


def test_variant_runs_its_forward_and_shares_the_backward(register):
    calls = []
    forward, backward = _logged(calls, "plain")
    fast, _ = _logged(calls, "fast")
    register(AttentionBackend("dummy", forward=forward, backward=backward, variant=lambda device: "dummy-fast",
                              variants={"dummy-fast": fast}))
    q, k, v = _qkv(requires_grad=True)
    assert api._choose_backend("dummy", CPU, 16, torch.float32, False, False) == "dummy-fast"
    frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="dummy").sum().backward()
    assert calls == [("fast", "forward"), ("plain", "backward")]


def test_missing_backward_falls_back_to_the_reference(register):
    calls = []
    forward, backward = _logged(calls, "dummy")
    register(AttentionBackend("dummy", forward=forward, backward=backward,
                              backward_missing=lambda: "the dummy build has no backward kernels"))
    q, k, v = _qkv(requires_grad=True)
    out = frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="dummy")
    with pytest.warns(UserWarning, match="the dummy build has no backward kernels; using the reference"):
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert calls == [("dummy", "forward")]
    want = torch.autograd.grad(frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="torch").sum(), (q, k, v))
    for got, expect in zip(grads, want):
        torch.testing.assert_close(got, expect)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        torch.autograd.grad(frame_block_attention(q, k, v, MASK, BLOCK_TOKENS, backend="dummy").sum(), (q, k, v))


@pytest.mark.parametrize("rank,chosen", [(3, "dummy"), (0, "triton")])
def test_registered_kernel_takes_part_in_the_automatic_choice(register, monkeypatch, rank, chosen):
    """On a (mocked) GPU a custom record is chosen only where verified, in rank order among ours."""
    forward, backward = _logged([], "dummy")
    register(AttentionBackend("dummy", forward=forward, backward=backward, custom=True, rank=rank))
    monkeypatch.setattr(_backend, "gpu_present", lambda: True)
    monkeypatch.setattr(_backend, "device_capability", lambda device: (9, 0) if device.type == "cuda" else None)
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    for var in (_backend.ENV_VAR, _backend.UNVERIFIED_ENV, "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    minor = verified.torch_minor(torch.__version__)
    rows = ()
    monkeypatch.setattr(verified, "_package_rows", lambda: rows)
    assert api._choose_backend(None, CUDA, 128, torch.bfloat16, False, False) == "flex"  # nothing verified
    rows = tuple(verified.VerifiedRow("frame_block_attention", b, "9.0", minor, "2026-01-01", "x.json")
                 for b in ("dummy", "triton"))
    assert api._choose_backend(None, CUDA, 128, torch.bfloat16, False, False) == chosen
    assert api._choose_backend(None, CUDA, 128, torch.bfloat16, False, True) == "sdpa"  # dense plans first
