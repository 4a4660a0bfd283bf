"""Build script: the pure-Python packages always; the CUDA extension swift_kernels._C when it can.

The extension is built when a CUDA build of torch and a CUDA toolkit are present (CUDA_HOME, or the
toolkit that the nvcc on PATH belongs to). Otherwise the package installs without it and says so; every
op then runs on its Triton or PyTorch path.

Environment switches:
    SWIFT_KERNELS_NO_CUDA=1       never build the extension
    SWIFT_KERNELS_CUDA_ARCHS=...  the GPU architectures to compile for, separated by ';' or ',' (default
                                  "80;90a": the sm_80 cubin also runs on sm_86/sm_89); entries of
                                  TORCH_CUDA_ARCH_LIST (e.g. "8.9;9.0a") are added to them; 90a also
                                  builds the Hopper TMA + wgmma forward (used at run time only with
                                  SWIFT_KERNELS_HOPPER=1 until verified on a GPU)
    SWIFT_KERNELS_NO_BACKWARD=1   leave the attention backward kernels out (a shorter build; the extension
                                  then has no ``bwd`` and autograd falls back to another backend)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"swift-i2v setup: {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit folder, asking nvcc itself when CUDA_HOME is unset.

    The nvcc on PATH may be a wrapper script outside the toolkit; its --dryrun output names the real
    toolkit (a line ``TOP=<toolkit>/bin/..``).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        proc = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cuda_archs() -> list[str]:
    """Architectures to compile for, as nvcc spells them ("80", "90a").

    SWIFT_KERNELS_CUDA_ARCHS (default "80;90a") plus every entry of TORCH_CUDA_ARCH_LIST ("8.9", "9.0a",
    "8.6+PTX"; "+PTX" is ignored: we ship cubins only).
    """
    archs: list[str] = []

    def add(arch: str) -> None:
        arch = arch.strip().lower().replace("sm_", "").replace("compute_", "")
        if arch.endswith("+ptx"):
            arch = arch[: -len("+ptx")]
        arch = arch.replace(".", "")
        if not arch:
            return
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"unrecognised CUDA architecture {arch!r}")
        if int(re.sub(r"[af]$", "", arch)) < 80:
            raise ValueError(f"CUDA architecture {arch!r} is not supported (the kernels need sm_80 or newer)")
        if arch not in archs:
            archs.append(arch)

    for arch in re.split(r"[;, ]+", os.environ.get("SWIFT_KERNELS_CUDA_ARCHS", "80;90a")):
        add(arch)
    for arch in re.split(r"[;, ]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "")):
        add(arch)
    if not archs:
        raise ValueError("SWIFT_KERNELS_CUDA_ARCHS selects no architecture")
    return archs


def _extension_build():
    if _flag("SWIFT_KERNELS_NO_CUDA"):
        _log("SWIFT_KERNELS_NO_CUDA is set: installing without the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        _log("no CUDA sources in csrc/: installing the pure-Python package")
        return [], {}
    try:
        import torch
    except ImportError:
        _log("torch is not importable at build time: installing without the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build: installing without the CUDA extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None or not os.path.isdir(cuda_home):
        _log("no CUDA toolkit found (set CUDA_HOME): installing without the CUDA extension")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # must precede the import of cpp_extension, which reads it once
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = _cuda_archs()
    no_backward = _flag("SWIFT_KERNELS_NO_BACKWARD")
    if no_backward:
        sources = [src for src in sources if not os.path.basename(src).endswith("_bwd.cu")]
    _log(
        f"building swift_kernels._C with the CUDA toolkit in {cuda_home} for sm_{', sm_'.join(archs)}"
        + (" (no backward)" if no_backward else "")
    )
    defines = ["-DSWIFT_KERNELS_NO_BACKWARD"] if no_backward else []
    # The Hopper forward (csrc/attention/fba_fwd_sm90.cu: TMA + wgmma) has a body only in the sm_90a pass;
    # every other arch compiles it as an empty stub. The host side learns that sm_90a was built from this
    # define (the extension's HAS_SM90).
    nvcc_defines = ["-DSWIFT_KERNELS_SM90A"] if "90a" in archs else []
    # Explicit -gencode flags: torch.utils.cpp_extension then adds none of its own (it would otherwise
    # compile for every arch of TORCH_CUDA_ARCH_LIST or of the local GPU, which CI does not have).
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    ext = CUDAExtension(
        name="swift_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # torch's headers need C++20; the .cu files include no torch header and build as C++17.
            "cxx": ["-O3", "-std=c++20"] + defines,
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + defines + nvcc_defines + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
