"""The activation memory of one Stage II training step, counted on fake tensors (planning layer).

:func:`training_activation_bytes` runs the DiT's own forward and backward (the code ``swift-i2v train`` runs) at
the real size on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data) under the
live-storage tracker of :mod:`swift_model.planning.tracker`, and reports the most bytes the step's activations
hold at once: the checkpointed block inputs, one block's recomputed activations and its backward's transients,
the embedding, head and loss. The weights are counted apart (they are subtracted), and so are the gradients:
each is dropped the moment autograd has written it, so a gradient counts only while it is being made (the
trainer's offloaded optimiser does the same; the resident gradients of the other modes are added by
:mod:`swift_model.training.memory`).

Two stand-ins keep the count that of a GPU:

- the self-attention is replaced, on the fake model's own blocks, by what a fused attention kernel keeps for
  its backward (FlashAttention, FlexAttention and our kernels alike): ``q``, ``k``, ``v``, the output and an
  fp32 log-sum-exp per head and token, with ``dq``, ``dk``, ``dv`` made in the backward; the PyTorch reference
  a CPU runs instead holds each query block's scores in fp32, memory no GPU kernel allocates;
- the loss is the flow-matching loss's arithmetic (fp32 squared error of the noisy blocks' predicted
  channels against a target of that shape).

The fused DiT ops (AdaLN, gated residual, q/k norm with RoPE) are custom ops that save the same inputs on every
device, so they count as they run. Everything here is an **estimate**: the caching allocator's fragmentation,
the CUDA context and library workspaces are not counted.
"""

from __future__ import annotations

import torch

from swift_kernels import CSGLayout, plan_attention

from ..nets.config import WanDiTConfig
from ..nets.dit import FrameTimesteps, WanDiT, keeps_fp32
from .tracker import LiveStorageTracker

__all__ = ["training_activation_bytes"]


class _FusedAttentionMemory(torch.autograd.Function):
    """The allocations of a fused attention kernel on its inputs' shapes (fake tensors only: no arithmetic)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(q, k, v, spec):
    return _FusedAttentionMemory.apply(q, k, v)


def _fake_model(config: WanDiTConfig, dtype: torch.dtype) -> WanDiT:
    """The DiT of ``config`` with fake CPU parameters (call inside the fake mode): ``dtype``, except the
    parameters Wan keeps in fp32; in training form (unfused block boundary)."""
    with torch.device("meta"):
        model = WanDiT(config)
    for name, p in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        target = torch.float32 if keeps_fp32(name) else dtype
        setattr(module, leaf, torch.nn.Parameter(torch.empty(p.shape, dtype=target, device="cpu")))
    model.train()
    model.block_boundary = "unfused"
    for blk in model.blocks:  # the planner's own instances: the stand-in attention is theirs alone
        blk.attention = _fused_attention
    return model


def training_activation_bytes(config: WanDiTConfig, layout: CSGLayout, latent_size: tuple[int, int], *,
                              batch: int = 1, dtype: torch.dtype = torch.bfloat16, checkpointing: bool = True) -> int:
    """The peak bytes of the activations of one training forward and backward of the DiT ``config`` (its input
    already as wide as the data's state plus ``z_ref`` channels) on ``batch`` sequences laid out by ``layout``
    (a packed training layout: the noisy blocks are those of role "own") over latent frames of ``latent_size``
    ``(h, w)``, computing in ``dtype`` with per-block activation checkpointing or without. Weights and finished
    gradients are not included (see the module docstring). An **estimate** made on fake tensors; a few seconds at
    the 5B's real size.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from swift_kernels.attention.layout import ROLE_OWN

    if not isinstance(config, WanDiTConfig):
        raise TypeError(f"config must be a WanDiTConfig, got {type(config).__name__}")
    if not isinstance(layout, CSGLayout):
        raise TypeError(f"layout must be a CSGLayout, got {type(layout).__name__}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    P = layout.block_tokens
    pt, ph, pw = config.patch_size
    h, w = latent_size
    if h % ph or w % pw or (h // ph) * (w // pw) != P:
        raise ValueError(f"latent_size {latent_size} is not a block of the layout ({P} tokens of patch "
                         f"{config.patch_size})")
    n = layout.num_tokens // P
    roles = layout.block_roles.tolist()
    noisy = [i for i, r in enumerate(roles) if r == ROLE_OWN]
    timesteps = FrameTimesteps(tuple(500.0 if i in noisy else 0.0 for i in range(n)))
    positions = tuple(int(b) for b in layout.block_ids.tolist())
    plan = plan_attention(layout, device="cpu")
    tracker = LiveStorageTracker("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(config, dtype)
        model.checkpoint_blocks = checkpointing
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_drop_grad)
        weights = list(model.parameters())
        with tracker:
            tracker.track(*weights)
            base = tracker.live_bytes
            # the batch as the trainer hands it over: fp32 inputs, per-token timesteps, the fp32 target
            inputs = torch.empty((batch, config.in_channels, n * pt, h, w))
            token_timesteps = torch.empty((batch, n * P))
            target = torch.empty((batch, config.out_channels, len(noisy) * pt, h, w))
            context = torch.empty((batch, config.text_len, config.text_dim))
            out = model(inputs, timesteps, context, attention_plan=plan, frame_positions=positions)
            index = torch.tensor(noisy, dtype=torch.long)
            pred = out[:, : config.out_channels].index_select(2, index).float()
            loss = (pred - target).square().mean()
            del out, pred
            loss.backward()
            del loss, inputs, token_timesteps, target, context
    return int(tracker.peak_bytes - base)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None
