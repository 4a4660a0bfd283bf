"""Build script: the pure-Python packages always; the CUDA extension swift_kernels._C when it can.

The extension is built when a CUDA build of torch and a CUDA toolkit are present (CUDA_HOME, or the
toolkit that the nvcc on PATH belongs to). Otherwise the package installs without it and says so; every
op then runs on its Triton or PyTorch path.

Environment switches:
    SWIFT_KERNELS_NO_CUDA=1       never build the extension
    SWIFT_KERNELS_CUDA_ARCHS=...  the GPU architectures to compile for ("8.0;9.0", "8.9", "9.0a", "8.6+PTX";
                                  ';', ',' or spaces between them); when unset, TORCH_CUDA_ARCH_LIST's
                                  (NGC containers set it); when both are unset, "8.0;9.0" (the sm_80 cubin
                                  also runs on 8.6 and 8.9). Entries below 8.0 are skipped with a note;
                                  9.0 builds sm_90a only (with the Hopper TMA + wgmma forward); +PTX adds
                                  PTX that newer GPUs compile at load time (see parse_cuda_archs)
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


# TORCH_CUDA_ARCH_LIST's architecture names, as torch.utils.cpp_extension understands them.
_NAMED_ARCHS = {
    "kepler+tesla": "3.7", "kepler": "3.5+PTX", "maxwell+tegra": "5.3", "maxwell": "5.0;5.2+PTX",
    "pascal": "6.0;6.1+PTX", "volta+tegra": "7.2", "volta": "7.0+PTX", "turing": "7.5+PTX",
    "ampere+tegra": "8.7", "ampere": "8.0;8.6+PTX", "ada": "8.9+PTX", "hopper": "9.0+PTX",
}
DEFAULT_ARCHS = "8.0;9.0"


def parse_cuda_archs(swift_archs: str | None, torch_arch_list: str | None) -> tuple[list[str], list[str]]:
    """The targets to compile for and the notes to print, from SWIFT_KERNELS_CUDA_ARCHS or else
    TORCH_CUDA_ARCH_LIST (else ``"8.0;9.0"``).

    Entries are separated by ``;``, ``,`` or spaces: ``8.0``, ``80``, ``sm_80``, ``9.0a``, ``8.6+PTX``, or an
    architecture name (``Ampere``, ``Hopper``). Targets come back as ``sm_XY`` (a cubin), ``sm_90a`` and
    ``compute_XY`` (PTX, from ``+PTX``). Rules:

    * below 8.0: skipped, with one note (the kernels use ``cp.async``, ``ldmatrix`` and bf16 ``mma.sync``);
    * ``9.0`` builds ``sm_90a`` only: the Hopper forward needs the "a" features, and a plain ``sm_90`` cubin
      beside it could be the one the driver loads, whose Hopper kernel has no body (it would trap);
    * ``X.Y+PTX`` adds ``compute_XY`` PTX (without the "a", so newer GPUs can compile it at load time).

    Raises ValueError for an entry that is not an architecture.
    """
    source = "SWIFT_KERNELS_CUDA_ARCHS" if (swift_archs or "").strip() else "TORCH_CUDA_ARCH_LIST"
    text = swift_archs if (swift_archs or "").strip() else (torch_arch_list or "").strip() or DEFAULT_ARCHS
    if not (torch_arch_list or "").strip() and source == "TORCH_CUDA_ARCH_LIST":
        source = "the default"
    entries: list[str] = []
    for entry in re.split(r"[;, ]+", text.strip()):
        entries += re.split(r"[;, ]+", _NAMED_ARCHS.get(entry.lower(), entry)) if entry else []
    targets: list[str] = []
    notes: list[str] = []
    skipped: list[str] = []
    for raw in entries:
        arch = raw.strip().lower()
        ptx = arch.endswith("+ptx")
        arch = arch[: -len("+ptx")] if ptx else arch
        arch = arch.replace("sm_", "").replace("compute_", "")
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)", arch) or re.fullmatch(r"(\d+)(\d)([af]?)", arch)
        if m is None:
            raise ValueError(f"{source}: unrecognised CUDA architecture {raw!r}")
        major, minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
        if (major, minor) < (8, 0):
            skipped.append(raw)
            continue
        if (major, minor) == (9, 0):
            suffix = "a"
        for target in [f"sm_{major}{minor}{suffix}"] + ([f"compute_{major}{minor}"] if ptx else []):
            if target not in targets:
                targets.append(target)
    if skipped:
        notes.append(f"skipping {', '.join(skipped)} from {source}: the kernels need compute capability 8.0 or newer")
    if source != "the default" and any(
        e.strip().lower().replace("sm_", "").startswith(("9.0", "90")) and "a" not in e.lower() for e in entries
    ):
        notes.append("9.0 builds sm_90a only (the Hopper kernels need it; no plain sm_90 cubin beside it)")
    return targets, notes


def _gencode(target: str) -> list[str]:
    """nvcc's -gencode flags of one target (the explicit form, which also assembles sm_90a code)."""
    kind, arch = target.split("_", 1)
    code = f"sm_{arch}" if kind == "sm" else f"compute_{arch}"
    return [f"-gencode=arch=compute_{arch},code={code}"]


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

    archs, notes = parse_cuda_archs(os.environ.get("SWIFT_KERNELS_CUDA_ARCHS"), os.environ.get("TORCH_CUDA_ARCH_LIST"))
    for note in notes:
        _log(note)
    if not archs:
        _log("no CUDA architecture the kernels can serve was named: installing without the CUDA extension")
        return [], {}
    no_backward = _flag("SWIFT_KERNELS_NO_BACKWARD")
    if no_backward:
        sources = [src for src in sources if not os.path.basename(src).endswith("_bwd.cu")]
    _log(
        f"building swift_kernels._C with the CUDA toolkit in {cuda_home} for {', '.join(archs)}"
        + (" (no backward)" if no_backward else "")
    )
    defines = ["-DSWIFT_KERNELS_NO_BACKWARD"] if no_backward else []
    # The Hopper forward (csrc/attention/fba_fwd_sm90.cu: TMA + wgmma) has a body only in the sm_90a pass;
    # every other arch compiles a kernel that traps. The host side learns that sm_90a was built from this
    # define (the extension's HAS_SM90), and which architectures were built from the next (its CUDA_ARCHS).
    nvcc_defines = ["-DSWIFT_KERNELS_SM90A"] if "sm_90a" in archs else []
    defines_cxx = [f"-DSWIFT_KERNELS_CUDA_ARCHS={','.join(archs)}"]
    # Explicit -gencode flags: torch.utils.cpp_extension then adds none of its own (it would otherwise
    # compile for every arch of TORCH_CUDA_ARCH_LIST or of the local GPU, which CI does not have).
    gencode = [flag for target in archs for flag in _gencode(target)]
    ext = CUDAExtension(
        name="swift_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # torch's headers need C++20; the .cu files include no torch header and build as C++17.
            "cxx": ["-O3", "-std=c++20"] + defines + defines_cxx,
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + defines + nvcc_defines + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__" or os.environ.get("SWIFT_KERNELS_SETUP_IMPORT") != "1":
    ext_modules, cmdclass = _extension_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
