"""Helpers shared by the test modules (one place: no test module imports another)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- DiT weights and inputs ------------------------------------------------------------------------------------


def random_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh random weights everywhere (no zero biases, non-trivial norm weights): N(0, 1/fan_in); returns
    ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.5
            base = 1.0 if p.dim() == 1 and "norm" in name else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def diffusers_model(cfg, seed: int = 0):
    """diffusers' ``WanTransformer3DModel`` of ``cfg`` (a ``WanDiTConfig``) with :func:`random_init` weights."""
    import diffusers

    d = cfg.to_diffusers()
    d.pop("_class_name")
    return random_init(diffusers.WanTransformer3DModel(**d).eval(), seed)


def dit_inputs(cfg, B=2, Fr=3, H=4, W=6, seed=1, per_token=None):
    """``(latents, timesteps, context, clip_fea)`` of a DiT call on random data (``clip_fea`` ``None`` without
    image tokens); per-token timesteps for Wan2.2 TI2V-style configs, 0 on the image frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, Fr, H, W, generator=g)
    L = Fr * H * W // 4
    per_token = cfg.per_token_timestep if per_token is None else per_token
    if per_token:
        # Wan2.2 TI2V: the image frame is clean (t = 0), the others carry the step's timestep
        t = (torch.rand(B, 1, generator=g) * 1000).expand(B, L).clone()
        t[:, : H * W // 4] = 0
    else:
        t = torch.rand(B, generator=g) * 1000
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(B, cfg.image_len, cfg.image_dim, generator=g) if cfg.image_dim else None
    return x, t, ctx, clip


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, rtol=2e-5):
    """Equal to fp32 rounding: max error relative to the output's scale."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= rtol * scale + 1e-6, f"max error {err:.3e} vs scale {scale:.3e}"


# -- the CSG rules, written out element by element (deliberately naive: loops and membership tests) ------------


def naive_segments(T, A, M):
    """``[(start, end)]`` of the segments of M blocks after A anchors in a clip of T blocks."""
    segs = []
    start = A
    while start < T:
        segs.append((start, min(start + M, T)))
        start += M
    return segs


def naive_window(T, A, M, NL, NR, s):
    """Clip blocks of segment s's window (anchors excluded), in clip order."""
    start, end = naive_segments(T, A, M)[s]
    return [b for b in range(T) if b >= A and start - NL <= b < end + NR]


def naive_role(T, A, M, s, b):
    """The role of clip block ``b`` in segment ``s``'s window: left neighbour, own block or right neighbour."""
    from swift_kernels.attention.layout import ROLE_LEFT, ROLE_OWN, ROLE_RIGHT

    start, end = naive_segments(T, A, M)[s]
    if b < start:
        return ROLE_LEFT
    if b < end:
        return ROLE_OWN
    return ROLE_RIGHT
