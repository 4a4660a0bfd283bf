"""Public fused sampler step: :func:`flow_step`."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._backend import FLOW_STEP, choose_backend
from . import reference as ref_impl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_SEED_LIMIT = 2**63


class FlowStepResult(NamedTuple):
    """Result of :func:`flow_step` when extras are asked for.

    x: the new state (dtype of x, or of ``out`` when no ``ref`` is given);
    x0: the clean prediction ``x - sigma*v`` in ``x.dtype`` (``None`` unless ``return_x0=True``);
    model_input: the next model input, channel concat ``[new state, ref]`` (``None`` without ``ref``).
    """

    x: torch.Tensor
    x0: Optional[torch.Tensor]
    model_input: Optional[torch.Tensor]


def _as_float(name, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_float_tensor(name, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    mode: str = "renoise",
    seed: int | None = None,
    offset: int = 0,
    cond_mask: torch.Tensor | None = None,
    v_uncond: torch.Tensor | None = None,
    guidance: float | None = None,
    ref: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_x0: bool = False,
    backend: str | None = None,
):
    """One flow-matching sampler step, fused into one pass over the latents.

    ``x0 = x - sigma*v``; ``mode="euler"``: ``x + (sigma_next - sigma)*v``; ``mode="renoise"``:
    ``(1 - sigma_next)*x0 + sigma_next*eps``. On the last step (``sigma_next == 0``) the new state is
    x0 in both modes (the same bits as the returned x0). Math is fp32.

    Layouts: ``x`` is a latent ``[B, C, F, H, W]`` or a token sequence ``[B, L, C]`` (any other shape
    is accepted when neither ``cond_mask`` nor ``ref`` is given). ``v`` and ``v_uncond`` have x's shape.
    All input tensors must be contiguous and on one device.

    Args:
        sigma, sigma_next: noise levels of this step and the next, ``0 <= sigma_next <= sigma <= 1``
            (Python floats or one-element tensors, e.g. from :class:`FlowSchedule`).
        mode: ``"renoise"`` (DMD-style, fresh noise) or ``"euler"`` (deterministic).
        seed, offset: the noise of element i (flat index into x) is ``randn(seed, i + offset)``, a
            Philox4x32-10 draw computed inside the kernel: no noise tensor is stored and the same
            (seed, offset) gives the same noise on every run, device and backend (the torch and Triton
            backends agree bit for bit on the uniforms and to a few ulp on the normals). Give disjoint
            offset ranges (e.g. a running element count) to draws that must be independent. ``seed``
            is an int in ``[0, 2**63)``; ``None`` in renoise mode draws one from torch's default CPU
            generator (so ``torch.manual_seed`` makes runs reproducible; under ``torch.compile`` pass an
            explicit seed, as drawing one is a graph break). Ignored in euler mode.
        cond_mask: bool, marks conditioning elements, which are left unchanged (bit for bit, also in
            x0): per latent frame ``[F]`` or ``[B, F]`` for a latent; per token ``[L]`` or ``[B, L]``
            for tokens. It may live on any device (it is moved to x's).
        v_uncond, guidance: classifier-free guidance, ``v = v_uncond + guidance*(v - v_uncond)`` first.
        ref: with a latent x, the reference latent ``[B, C_ref, F, H, W]``; the op also writes the next
            model input ``cat([new state, ref], dim=1)`` in the same pass.
        out: where to write. Without ``ref``: the new state buffer (x's shape, any float dtype; may be
            x itself for an in-place update). With ``ref``: the model-input buffer
            ``[B, C + C_ref, F, H, W]``. Default: new tensors (model input in x.dtype).
        return_x0: also return x0 (in x.dtype).
        backend: ``None`` (``SWIFT_KERNELS_BACKEND`` if set, else the Triton kernel on a GPU where it is verified
            (:mod:`swift_kernels.verified`) and the reference elsewhere; float64 goes to the reference) or
            ``"torch"`` / ``"triton"``. An explicit request (argument or
            environment) that cannot run raises: ``BackendUnavailableError``, or ``TypeError`` for float64
            on Triton.

    Returns:
        The new state tensor when neither ``ref`` nor ``return_x0`` is given; otherwise a
        :class:`FlowStepResult` ``(x, x0, model_input)``. With ``ref``, the new state is the view
        ``model_input[:, :C]`` when the model input has x's dtype; otherwise it is a separate tensor in
        x.dtype (written in the same pass), so a float32 state can feed a bf16 model input buffer.
    """
    sigma, sigma_next, guidance, seed = _check_step(x, v, sigma, sigma_next, mode, v_uncond, guidance, offset, seed)
    _check_buffers(x, v, v_uncond, ref, out)
    mask2, G = _group_mask(x, cond_mask, ref)
    state, model_input, state_is_view, x0 = _outputs(x, ref, out, return_x0)
    chosen = _choose(backend, x, [t for t in (x, v, v_uncond, ref, out) if t is not None])

    # When the state is the view model_input[:, :C], the op writes it through model_input only.
    state_arg = None if (model_input is not None and state_is_view) else state
    _flow_step_op(
        x, v, v_uncond, ref, mask2, state_arg, model_input, x0, G,
        sigma, sigma_next, guidance if guidance is not None else 1.0, seed, offset, mode, chosen,
    )
    if model_input is None and not return_x0:
        return state
    return FlowStepResult(state, x0, model_input)


def _check_step(x, v, sigma, sigma_next, mode, v_uncond, guidance, offset, seed):
    """Check x, v (and v_uncond) and the step's numbers; returns ``(sigma, sigma_next, guidance, seed)`` as
    floats and an int, with a seed drawn from torch's generator when a renoise step needs one and none is given."""
    _check_float_tensor("x", x)
    _check_float_tensor("v", v)
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    sigma = _as_float("sigma", sigma)
    sigma_next = _as_float("sigma_next", sigma_next)
    if not 0.0 <= sigma_next <= sigma <= 1.0:
        raise ValueError(f"need 0 <= sigma_next <= sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    if mode not in ("renoise", "euler"):
        raise ValueError(f"mode must be 'renoise' or 'euler', got {mode!r}")
    if (v_uncond is None) != (guidance is None):
        raise ValueError("v_uncond and guidance must be given together (or neither)")
    if v_uncond is not None:
        _check_float_tensor("v_uncond", v_uncond)
        if v_uncond.shape != x.shape:
            raise ValueError(f"v_uncond must have the shape of x {tuple(x.shape)}, got {tuple(v_uncond.shape)}")
        guidance = _as_float("guidance", guidance)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if offset + x.numel() > _SEED_LIMIT:
        raise ValueError(f"offset + x.numel() must stay below 2**63, got offset={offset}")
    if mode == "renoise" and sigma_next != 0:
        if seed is None:
            seed = int(torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64).item())
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return sigma, sigma_next, guidance, seed


def _check_buffers(x, v, v_uncond, ref, out) -> None:
    """``ref`` and ``out`` are float tensors; every tensor is on x's device; the inputs are contiguous."""
    for name, t in (("ref", ref), ("out", out)):
        if t is not None:
            _check_float_tensor(name, t)
    tensors = {"v": v, "v_uncond": v_uncond, "ref": ref, "out": out}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in (("x", x), ("v", v), ("v_uncond", v_uncond), ("ref", ref)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _group_mask(x, cond_mask, ref) -> tuple[torch.Tensor | None, int]:
    """The kernel sees x as [B, R, S] (see _x3_shape) and the mask as one flag per G elements along S:
    returns ``(mask [B, n_groups] on x's device, or None; G)``."""
    latent = x.dim() == 5
    if latent:
        B, C, F, H, W = x.shape
    elif x.dim() == 3:
        B, L, C = x.shape
    else:
        if cond_mask is not None or ref is not None:
            raise ValueError(
                f"cond_mask and ref need x as a latent [B, C, F, H, W] or tokens [B, L, C], got shape {tuple(x.shape)}"
            )
        B = 1
    mask2, G = None, 1
    if cond_mask is not None:
        if not isinstance(cond_mask, torch.Tensor) or cond_mask.dtype != torch.bool:
            raise TypeError("cond_mask must be a bool tensor")
        groups = F if latent else L
        what = "frame" if latent else "token"
        if cond_mask.shape not in ((groups,), (B, groups)):
            raise ValueError(
                f"cond_mask must be per {what}: shape [{groups}] or [{B}, {groups}], got {tuple(cond_mask.shape)}"
            )
        # the mask is tiny (one flag per frame or token): moving it is cheap, so any device is accepted
        mask2 = cond_mask.to(x.device).expand(B, groups).contiguous()
        G = H * W if latent else C
    return mask2, G


def _outputs(x, ref, out, return_x0):
    """The buffers the op writes: ``(state, model_input or None, state_is_view, x0 or None)``, ``out`` checked
    (with ``ref``: the model-input buffer; the state is its view ``[:, :C]`` when the dtypes agree)."""
    if ref is not None:
        if x.dim() != 5:
            raise ValueError(f"ref needs x as a latent [B, C, F, H, W], got shape {tuple(x.shape)}")
        B, C, F, H, W = x.shape
        if ref.dim() != 5 or ref.shape[0] != B or tuple(ref.shape[2:]) != (F, H, W):
            raise ValueError(f"ref must have shape [{B}, C_ref, {F}, {H}, {W}], got {tuple(ref.shape)}")
        mi_shape = (B, C + ref.shape[1], F, H, W)
        if out is not None:
            if tuple(out.shape) != mi_shape:
                raise ValueError(f"with ref, out must be the model-input buffer of shape {list(mi_shape)}, got {tuple(out.shape)}")
            if tuple(out.stride()[1:]) != (F * H * W, H * W, W, 1):
                raise ValueError("out must have contiguous [F, H, W] planes per channel (e.g. a contiguous tensor)")
        model_input = out if out is not None else torch.empty(mi_shape, dtype=x.dtype, device=x.device)
        state_is_view = model_input.dtype == x.dtype
        state = model_input[:, :C] if state_is_view else torch.empty_like(x)
    else:
        model_input = None
        if out is not None:
            if out.shape != x.shape:
                raise ValueError(f"out must have the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
        state = out if out is not None else torch.empty_like(x)
        state_is_view = False
    x0 = torch.empty_like(x) if return_x0 else None
    return state, model_input, state_is_view, x0


def _choose(backend, x, floats) -> str:
    """The backend of the step (Triton takes no float64)."""

    def why_not(name):
        if name == "triton" and any(t.dtype not in _TRITON_FLOATS for t in floats):
            return TypeError, "float64 tensors (it takes fp16/bf16/fp32)"
        return None

    return choose_backend(FLOW_STEP, backend, x.device, why_not=why_not)


def _x3_shape(x: torch.Tensor) -> tuple[int, int, int]:
    """The [B, R, S] view the kernel works on: latent [B, C, F*H*W], tokens [B, 1, L*C], else [1, 1, N]."""
    if x.dim() == 5:
        return (x.shape[0], x.shape[1], x.shape[2] * x.shape[3] * x.shape[4])
    if x.dim() == 3:
        return (x.shape[0], 1, x.shape[1] * x.shape[2])
    return (1, 1, x.numel())


@torch.library.custom_op("swift_kernels::flow_step_", mutates_args=("state", "model_input", "x0"))
def _flow_step_op(
    x: torch.Tensor,
    v: torch.Tensor,
    v_uncond: Optional[torch.Tensor],
    ref: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    model_input: Optional[torch.Tensor],
    x0: Optional[torch.Tensor],
    group: int,
    sigma: float,
    sigma_next: float,
    guidance: float,
    seed: int,
    offset: int,
    step_mode: str,  # not "mode": that name clashes with torch's dispatch-mode plumbing under compile
    backend: str,
) -> None:
    """Validated core of :func:`flow_step` (a torch.library op so torch.compile keeps it as one node).

    Writes the new state into ``state`` (when given) and/or rows ``[:C]`` of ``model_input`` (with ``ref``
    into rows ``[C:]``), and x0 into ``x0``. ``mask`` is the per-group bool mask ``[B, n_groups]`` with
    ``group`` elements of x's [B, R, S] view per flag along S.
    """
    x3_shape = _x3_shape(x)
    cfg = v_uncond is not None
    if backend == "triton":
        from . import triton_kernels

        def view3(t):
            return t.reshape(t.shape[0], -1, x3_shape[2]) if t is not None else None

        triton_kernels.flow_step(
            x.reshape(x3_shape), v.reshape(x3_shape), v_uncond.reshape(x3_shape) if cfg else None, view3(ref), mask,
            group, state.view(x3_shape) if state is not None else None, view3(model_input),
            x0.view(x3_shape) if x0 is not None else None,
            sigma=sigma, sigma_next=sigma_next, mode=step_mode, guidance=guidance if cfg else None, seed=seed, offset=offset,
        )
        return
    elem_mask = None
    if mask is not None:
        # expand the per-group mask to x's [B, R, S] view
        m = mask.repeat_interleave(group, dim=1)  # [B, S]
        elem_mask = m[:, None, :].expand(x3_shape).reshape(x.shape)
    new, x0f = ref_impl.flow_step(
        x, v, sigma, sigma_next, mode=step_mode, seed=seed, offset=offset, elem_mask=elem_mask,
        v_uncond=v_uncond, guidance=guidance if cfg else None,
    )
    if x0 is not None:
        x0.copy_(x0f)
    if state is not None:
        state.copy_(new)
    if model_input is not None:
        C = x.shape[1]
        model_input[:, :C].copy_(new)
        model_input[:, C:].copy_(ref)


@_flow_step_op.register_fake
def _(x, v, v_uncond, ref, mask, state, model_input, x0, group, sigma, sigma_next, guidance, seed, offset, step_mode, backend):
    return None
