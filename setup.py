"""Build script: the pure-Python packages always; the CUDA extension swift_kernels._C when it can.

The extension is built when a CUDA build of torch and a CUDA toolkit are present (CUDA_HOME, or the
toolkit that the nvcc on PATH belongs to). Otherwise the package installs without it and says so; every
op then runs on its Triton or PyTorch path.

Environment switches:
    SWIFT_KERNELS_NO_CUDA=1       never build the extension
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


def _extension_build():
    if os.environ.get("SWIFT_KERNELS_NO_CUDA", "0") not in ("", "0"):
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

    _log(f"building swift_kernels._C with the CUDA toolkit in {cuda_home}")
    ext = CUDAExtension(
        name="swift_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
