"""A small, self-contained demo of ``csg_attention``: ``python -m swift_kernels.demo``.

Lays out a short clip the way Conditional Segment-wise Generation does (an anchor frame, segments of M
frames, neighbours on each side), runs ``csg_attention`` and PyTorch's own scaled-dot-product attention
with the equivalent dense token mask, and prints the largest difference and both timings. Runs on the
CPU in seconds; on a GPU it uses the automatic backend choice (see ``swift_kernels._backend``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .attention import CSGLayout, csg_attention, plan_attention


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, for the GPU kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=9, help="latent frames in the clip (default 9)")
    parser.add_argument("--block-tokens", type=int, default=220, help="tokens per frame (default 220)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--segment-blocks", type=int, default=2)
    parser.add_argument("--neighbors", default="1,0", help="left,right neighbour frames (default 1,0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        left, right = (int(x) for x in args.neighbors.split(","))
        layout = CSGLayout(args.blocks, args.block_tokens, args.segment_blocks, neighbors=(left, right), mode="clip")
    except ValueError as exc:
        parser.error(str(exc))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (1, layout.num_tokens, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))

    token_block = torch.arange(layout.num_tokens, device=device) // layout.block_tokens
    dense_mask = layout.block_mask.to(device)[token_block[:, None], token_block[None, :]]

    plan = plan_attention(layout, device=device)  # built once; every call below reuses its tables

    def ours():
        return csg_attention(q, k, v, plan)

    def sdpa():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense_mask
        )
        return out.transpose(1, 2)

    # The truth in fp64 on the same inputs, so both are judged against one reference.
    expect = F.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2), attn_mask=dense_mask
    ).transpose(1, 2)
    err_ours = (ours().double() - expect).abs().max().item()
    err_sdpa = (sdpa().double() - expect).abs().max().item()
    t_ours, t_sdpa = _time(ours, args.repeats), _time(sdpa, args.repeats)

    pairs = plan.allowed_pairs
    density = pairs / layout.num_tokens**2
    print(f"swift_kernels demo on {device} ({dtype}): {layout}")
    print(f"  tokens {layout.num_tokens}, heads {args.heads}, head_dim {args.head_dim}, mask density {density:.1%}")
    print(f"  csg_attention      max |error| vs fp64: {err_ours:.2e}   time {t_ours * 1e3:8.2f} ms")
    print(f"  PyTorch SDPA+mask  max |error| vs fp64: {err_sdpa:.2e}   time {t_sdpa * 1e3:8.2f} ms")
    print(f"  speed-up {t_sdpa / t_ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
