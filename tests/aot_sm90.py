"""Compile every production Triton kernel config ahead of time for Hopper (sm_90) and report its resources.

Run as a script with the interpreter off (the tests do, in a subprocess: ``run_aot`` in helpers.py):
``python tests/aot_sm90.py attention|ops`` prints one JSON line per kernel config (registers, stack frame,
shared memory) and then ``AOT-OK``, or lines starting ``OVER-LIMIT`` and exit code 3 when a config passes the
limits below. No GPU is needed: ``triton.compile`` with a ``GPUTarget`` runs ptxas, and ``cuobjdump -res-usage``
(shipped with Triton) reads the cubin.

Limits, and why:
- registers <= 255: the hardware cap; a kernel there is at the edge and usually spills.
- stack frame (spilled registers, local memory) per thread: attention <= 1,536 bytes (today's worst, the bf16
  dK/dV pass at head_dim 128, spills 1,256 bytes: register pressure of two D-wide fp32 accumulators; the limit
  stops it from growing unnoticed) and 0 for the elementwise ops (they hold one row, there is no reason to
  spill). An fp32 attention config spills 34-61 KB at head_dim 128, which is why fp32 attention never runs on a
  GPU and is not a production config.
- shared memory <= 160 KB per block: leaves room for two CTAs' worth of L1 on an H100/H200 (227 KB usable per
  block, 228 KB per SM); the production configs use at most about 86 KB.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile

LIMITS = {
    "attention": {"regs": 255, "stack": 1536, "shared": 160 * 1024},
    "ops": {"regs": 255, "stack": 64, "shared": 160 * 1024},
}


def _cuobjdump() -> str | None:
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict:
    """REG and STACK of the one kernel in a cubin, from ``cuobjdump -res-usage``."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=120).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def compile_sm90(fn, sig: dict, const: dict, num_warps: int, num_stages: int = 3) -> dict:
    """Compile ``fn`` for sm_90 with argument types ``sig`` and constexprs ``const``; its resource report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {n: ("constexpr" if n in const else sig[n]) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, full, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    assert "cubin" in k.asm
    report = {"kernel": fn.__name__, "warps": num_warps, "stages": num_stages, "shared": k.metadata.shared,
              "const": {n: v for n, v in const.items() if not isinstance(v, str) or len(v) < 16}}
    report.update(_resources(k.asm["cubin"]))
    return report


def sm90_compile(fn, sig: dict, const: dict, num_warps: int, num_stages: int = 3):
    """:func:`compile_sm90` of these arguments, as a job for :func:`reports` to run."""
    return functools.partial(compile_sm90, fn, sig, const, num_warps, num_stages)


def attention_jobs():
    from swift_kernels.attention import triton_kernels as K
    from swift_kernels.attention.tiles import SPARSE_BLOCK
    from swift_kernels.attention.triton_backend import _GPU_CONFIG_16BIT as C

    def arg_type(name, dt):
        if name in ("Lse", "Delta"):
            return "*fp32"
        if name == "mask_tab":
            return "*i8"
        if name in ("num", "idx", "full_num", "full_idx"):
            return "*i32"
        if name in ("qk_scale", "scale"):
            return "fp32"
        if name in ("Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ"):
            return "*" + dt
        return "i32"  # strides and sizes

    def comp(fn, dt, const, warps, stages):
        return sm90_compile(fn, {n: arg_type(n, dt) for n in fn.arg_names}, const, warps, stages)

    for dt in ("bf16", "fp16"):
        for d in (64, 128):
            for two in (True, False):
                common = dict(HEAD_DIM=d, TWO_BLOCKS=two, PRECISION="tf32", SPARSE=SPARSE_BLOCK)
                yield comp(K.fwd_kernel, dt, dict(common, BLOCK_M=C.fwd_m, BLOCK_N=C.fwd_n), C.fwd_warps, C.fwd_stages)
                yield comp(K.bwd_dkdv_kernel, dt, dict(common, BLOCK_M=C.dkdv_m, BLOCK_N=C.dkdv_n), C.dkdv_warps,
                           C.dkdv_stages)
                yield comp(K.bwd_dq_kernel, dt, dict(common, BLOCK_M=C.dq_m, BLOCK_N=C.dq_n), C.dq_warps, C.dq_stages)
            yield sm90_compile(K.bwd_preprocess_kernel, {n: ("*" + dt if n in ("Out", "dOut") else "*fp32" if n == "Delta"
                                                              else "i32") for n in K.bwd_preprocess_kernel.arg_names},
                               dict(HEAD_DIM=d, BLOCK_M=64), 4, 1)


def ops_jobs():
    from swift_kernels.dit_ops import triton_kernels as K
    from swift_kernels.sampler import triton_kernels as S

    i = "i32"
    for dt in ("bf16", "fp16"):
        sig = dict(x_ptr=f"*{dt}", v_ptr=f"*{dt}", vu_ptr=f"*{dt}", ref_ptr=f"*{dt}", mask_ptr="*i1", state_ptr="*fp32",
                   mi_ptr=f"*{dt}", x0_ptr=f"*{dt}", R=i, S=i, R_REF=i, G=i, NG=i, s_sb=i, s_sr=i, mi_sb=i, mi_sr=i,
                   sigma="fp32", coef_a="fp32", coef_b="fp32", guidance="fp32", seed="i64", offset="i64")
        for mode, aligned in ((0, True), (1, True), (1, False), (2, True)):
            yield sm90_compile(S._flow_step_kernel, sig, dict(MODE=mode, HAS_CFG=True, HAS_MASK=True, HAS_REF=True,
                                                              WRITE_STATE=True, WRITE_MI_STATE=True, WRITE_X0=True,
                                                              ALIGNED=aligned, BLOCK=1024), 4)
        sig = dict(x_ptr=f"*{dt}", sh_ptr="*fp32", sc_ptr="*fp32", out_ptr=f"*{dt}", idx_ptr="*i64", L=i, C=i, sxb=i,
                   sxl=i, shb=i, shl=i, scb=i, scl=i, sib=i, sil=i, eps="fp32")
        for indexed in (False, True):
            yield sm90_compile(K._adaln_kernel, sig, dict(INDEXED=indexed, BLOCK_C=4096), 8)
        sig = dict(x_ptr=f"*{dt}", y_ptr=f"*{dt}", g_ptr="*fp32", sh_ptr="*fp32", sc_ptr="*fp32", nx_ptr=f"*{dt}",
                   mod_ptr=f"*{dt}", idx_ptr="*i32", L=i, C=i, sxb=i, sxl=i, syb=i, syl=i, sgb=i, sgl=i, shb=i, shl=i,
                   scb=i, scl=i, sib=i, sil=i, eps="fp32")
        for fused in (False, True):
            for indexed in (False, True):
                yield sm90_compile(K._gated_residual_kernel, sig, dict(FUSED=fused, INDEXED=indexed, BLOCK_C=4096), 8)
        sig = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", wq_ptr=f"*{dt}", wk_ptr=f"*{dt}", f_ptr="*fp32", qo_ptr=f"*{dt}",
                   ko_ptr=f"*{dt}", L=i, H=i, HD=i, sqb=i, sql=i, sqh=i, skb=i, skl=i, skh=i, sfb=i, sfl=i, eps="fp32")
        yield sm90_compile(K._qk_norm_rope_kernel, sig, dict(D=128, BLOCK_H=32), 8)


_JOBS: list = []  # the compiles of this run; the pool's forked workers inherit them and run them by index


def _run_job(i: int) -> dict:
    return _JOBS[i]()


def reports(which: str):
    """The resource report of every config of ``which``, in order. The configs compile in parallel, one forked
    process per core: most of a compile is LLVM and ptxas, one config at a time per core."""
    _JOBS[:] = attention_jobs() if which == "attention" else ops_jobs()
    workers = min(len(os.sched_getaffinity(0)), len(_JOBS))
    if workers <= 1:
        yield from map(_run_job, range(len(_JOBS)))
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # nothing runs in threads yet: safe to fork
        yield from pool.imap(_run_job, range(len(_JOBS)))


def main(which: str) -> int:
    limits = LIMITS[which]
    over = []
    for rep in reports(which):
        print(json.dumps(rep), flush=True)
        for key, limit in limits.items():
            if key in rep and rep[key] > limit:
                over.append(f"OVER-LIMIT {rep['kernel']} {rep['const']}: {key} {rep[key]} > {limit}")
        if "regs" not in rep:
            print("NO-RESOURCE-REPORT (cuobjdump missing): registers and spills not checked", flush=True)
    for line in over:
        print(line)
    if over:
        return 3
    print("AOT-OK")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1]))
