"""The layering of ``swift_model``: every module's imports (top-level and inside functions) point to its own
layer or an earlier one, and the import graph has no cycle.

Layers, first to last: key naming -> file reading -> the DiT and the other networks -> loading (weights,
LoRA) -> the stages -> the pipeline -> the CLI -> the package's ``__init__`` (the facade).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

LAYERS: dict[str, int] = {
    "keys": 1,                                              # key naming
    "files": 2, "video": 2,                                 # reading (and writing) files
    "config": 3, "dit": 3, "vae": 3, "encoders": 3,         # the networks
    "vae_tiling": 3,                                        # tiles and blending of the VAE passes
    "parallel": 3,                                          # sequence parallelism, FSDP2 (under the DiT)
    "checkpoint": 4, "lora": 4, "preflight": 4,             # loading
    "csg": 5, "bridge": 5,                                  # the stages
    "memory": 5,                                            # what each phase keeps on the device
    "packing": 5, "transition": 5, "dataset": 5,            # training sequences, references, prepared data
    "train_config": 5,
    "distributed": 5, "vae_parallel": 5,                    # torchrun, process groups, CFG parallel, VAE tiles
    "pipeline": 6, "planner": 6,                            # the pipeline, and its estimate on fake tensors
    "plan_ranks": 6,                                        # the estimate of one rank: fake group, FSDP model
    "prepare": 6, "train": 6, "export": 6,                  # the training runs, beside the pipeline
    "lora_train": 6,                                        # Stage I's low-resolution LoRA
    "cli": 7, "train_cli": 7,
    "__init__": 8,
}


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` for every ``*.py`` of ``package`` (top level only),
    counting imports anywhere in the file: at the top, inside functions, inside ``if``/``try``. A name
    imported from the package itself (``from . import X`` where X is no module) counts as ``__init__``."""
    name = package.name
    modules = {p.stem for p in package.glob("*.py")}

    def target(mod: str | None, level: int, alias: str | None) -> str | None:
        if level == 0:
            if mod is None or not (mod == name or mod.startswith(name + ".")):
                return None
            parts = mod.split(".")[1:]
        elif level == 1:
            parts = mod.split(".") if mod else []
        else:  # beyond the package: not ours
            return None
        if parts:
            return parts[0] if parts[0] in modules else None
        return alias if alias in modules else "__init__"

    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    edges.add(target(a.name, 0, None))
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    edges.add(target(node.module, node.level, a.name))
        edges.discard(None)
        edges.discard(path.stem)
        graph[path.stem] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (one representative per back edge)."""
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def layering_problems(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Human-readable violations: modules with no layer, imports of a later layer, import cycles."""
    problems = [f"{m} has no layer" for m in sorted(graph) if m not in layers]
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if m in layers and d in layers and layers[d] > layers[m]:
                problems.append(f"{m} (layer {layers[m]}) imports {d} (layer {layers[d]})")
    problems += ["import cycle: " + " -> ".join(c) for c in cycles(graph)]
    return problems


def test_swift_model_layers_one_way():
    graph = import_graph(ROOT / "swift_model")
    assert set(graph) == set(LAYERS), "new modules need a place in LAYERS (and in the README's architecture)"
    assert layering_problems(graph, LAYERS) == []
    # the edges that the layering is about exist (the check is not vacuous)
    assert {"keys", "files"} <= graph["checkpoint"] and "dit" in graph["checkpoint"] and "lora" in graph["checkpoint"]
    assert "files" in graph["lora"] and "files" in graph["vae"] and "files" in graph["encoders"]


def test_swift_kernels_never_imports_swift_model():
    for path in (ROOT / "swift_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n == "swift_model" or n.startswith("swift_model.") for n in names), path


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / f"{name}.py").write_text(text)
    return pkg


def test_the_check_catches_lazy_cycles_and_upward_imports(tmp_path):
    """The shape of the old cycle: a later layer imports the DiT, and the DiT imports it back inside a
    function (``WanDiT.from_pretrained`` importing the loader lazily). Both the cycle and the upward import
    must be reported, as must an import of the package facade from a submodule."""
    pkg = _package(tmp_path, {
        "__init__": "from .loader import load\n",
        "keys": "",
        "model": "import torch\n\nclass M:\n    @classmethod\n    def load(cls):\n"
                 "        from .loader import load\n        return load()\n",
        "loader": "from .model import M\nfrom . import keys\n\ndef load():\n    return M()\n",
        "helper": "from pkg import load\n",
    })
    graph = import_graph(pkg)
    assert graph["model"] == {"loader"} and graph["loader"] == {"model", "keys"} and graph["helper"] == {"__init__"}
    layers = {"keys": 1, "model": 3, "loader": 4, "helper": 4, "__init__": 8}
    problems = layering_problems(graph, layers)
    assert "model (layer 3) imports loader (layer 4)" in problems
    assert "helper (layer 4) imports __init__ (layer 8)" in problems
    assert any(p.startswith("import cycle:") and "model" in p and "loader" in p for p in problems)
    assert layering_problems({**graph, "model": set(), "helper": set()}, layers) == []
    # a module without a layer is reported too
    assert layering_problems({"new": set()}, layers) == ["new has no layer"]


def test_from_pretrained_works_after_importing_the_dit_module_alone(tmp_path):
    """``WanDiT.from_pretrained`` reaches the loader through the hook the loading layer registers: importing
    ``swift_model.dit`` runs the package's ``__init__`` first, which imports the loader."""
    code = ("import sys\nfrom swift_model.dit import WanDiT, _pretrained_loader\n"
            "from swift_model.config import WanDiTConfig\n"
            "import swift_model.checkpoint as ck\n"
            "assert _pretrained_loader is ck.load_dit\n"
            "m = WanDiT(WanDiTConfig.preset('tiny-t2v'))\n"
            "ck.save_dit(m, sys.argv[1])\n"
            "assert type(WanDiT.from_pretrained(sys.argv[1], device='cpu')) is WanDiT\n"
            "class Sub(WanDiT):\n    pass\n"
            "assert type(Sub.from_pretrained(sys.argv[1], device='cpu')) is Sub\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


if __name__ == "__main__":  # python tests/test_layering.py [package folder]: print the problems of a package
    pkg = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "swift_model"
    for p in layering_problems(import_graph(pkg), LAYERS):
        print(p)
